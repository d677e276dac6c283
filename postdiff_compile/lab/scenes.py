"""Procedural captioned scenes: the training data of the reference model (issue 8), unlimited and
deterministic from a seed.

A scene is 1 to 3 objects on a background, RGB at 32x32 (or any multiple of 8: `render(scene, 64)`). Each
object has a shape, a colour, a size and one cell of a 3x3 grid; the background has a pattern and a colour.
Where things are and what colour they are is low-frequency structure; the shape of a small object and a
striped or checked background are high-frequency detail, so both halves of the spectrum matter to a model
that gets the caption right.

Captions use a small fixed vocabulary, objects in reading order (row by row):
    "small red circle top left, large blue square center, on striped grey"
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SUPERSAMPLE = 4       # shapes are rasterised at 4x and averaged: anti-aliased edges
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.86, 0.16, 0.16), "green": (0.16, 0.70, 0.24), "blue": (0.16, 0.31, 0.86),
           "yellow": (0.90, 0.82, 0.16), "purple": (0.59, 0.24, 0.78), "white": (0.95, 0.95, 0.95)}
OBJECT_SIZES = {"small": 0.30, "large": 0.48}          # half-extent, in grid-cell sides
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PATTERNS = ("plain", "striped", "checked")
BACKGROUNDS = {"grey": (0.45, 0.45, 0.45), "black": (0.06, 0.06, 0.06), "beige": (0.80, 0.74, 0.60),
               "teal": (0.10, 0.45, 0.45)}
MAX_OBJECTS = 3


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str          # one of POSITIONS: a cell of the 3x3 grid
    offset: tuple[float, float] = (0.0, 0.0)   # jitter of the centre inside its cell, in cell units, |.| <= 0.15

    @property
    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]       # in reading order of their cells
    pattern: str
    background: str

    @property
    def caption(self) -> str:
        pattern = "" if self.pattern == "plain" else f"{self.pattern} "
        return ", ".join(o.words for o in self.objects) + f", on {pattern}{self.background}"


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted; the tokenizer's vocabulary."""
    words = {*SHAPES, *COLOURS, *OBJECT_SIZES, *PATTERNS, *BACKGROUNDS, "on"} - {"plain"}   # plain goes unsaid
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def random_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    objects = []
    for cell in cells:
        objects.append(SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=list(OBJECT_SIZES)[rng.integers(len(OBJECT_SIZES))], position=POSITIONS[cell],
            offset=tuple(float(v) for v in rng.uniform(-0.15, 0.15, size=2))))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(tuple(objects), PATTERNS[rng.integers(len(PATTERNS))], background)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres in [0, 1) at n x n.
    axis = (np.arange(n) + 0.5) / n
    return np.meshgrid(axis, axis, indexing="ij")   # y, x


def _mask(obj: SceneObject, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    row, col = divmod(POSITIONS.index(obj.position), 3)
    cy, cx = (row + 0.5 + obj.offset[0]) / 3, (col + 0.5 + obj.offset[1]) / 3
    r = OBJECT_SIZES[obj.size] / 3                   # half-extent in image units
    dy, dx = (y - cy) / r, (x - cx) / r
    if obj.shape == "circle":
        return dy ** 2 + dx ** 2 <= 1.0
    if obj.shape == "square":
        return (np.abs(dy) <= 0.85) & (np.abs(dx) <= 0.85)
    if obj.shape == "triangle":                      # apex up, base at dy = 0.8
        return (dy <= 0.8) & (dy >= -1.0 + 2 * np.abs(dx) * 0.9)
    arm = 0.33                                       # cross: two bars
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= 1.0)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= 1.0))


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as float32 [3, size, size] in [0, 1]. Patterns scale with `size` (stripes 2 pixels wide at 32,
    4 at 64), so every size shows the same scene; `size` must be a multiple of 8 (the checks' period at 32 / 4)."""
    if size % 8 or size <= 0:
        raise ValueError(f"scene size must be a positive multiple of 8, got {size}")
    unit = size // 16                    # 2 at 32: the pattern's length unit in pixels
    y, x = _grid(size)
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    index = np.arange(size)
    if scene.pattern == "striped":       # diagonal stripes one unit wide, half as bright
        shade = np.where(((index[:, None] + index[None, :]) // unit) % 2 == 0, 1.0, 0.55)
    elif scene.pattern == "checked":     # checks two units wide
        shade = np.where(((index[:, None] // (2 * unit) + index[None, :] // (2 * unit)) % 2) == 0, 1.0, 0.55)
    else:
        shade = np.ones((size, size))
    image = base[:, None, None] * shade[None].astype(np.float32)
    ys, xs = _grid(size * SUPERSAMPLE)
    for obj in scene.objects:
        cover = _mask(obj, ys, xs).astype(np.float32)
        cover = cover.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)[:, None, None]
        image = image * (1 - cover) + colour * cover
    return image.astype(np.float32)


def make_batch(seed: int, n: int, size: int = SIZE) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` scenes from `seed`: images float32 [n, 3, size, size] in [-1, 1], captions, scenes.

    The same (seed, n) always gives the same batch, on any machine (numpy's PCG64 and float32 arithmetic).
    """
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes]) * 2 - 1
    return images.astype(np.float32), [s.caption for s in scenes], scenes
