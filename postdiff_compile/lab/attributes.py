"""What a scene's caption says, as classification targets, and how to score predictions against it.

Every cell of the 3x3 grid has three slots (colour, shape, size; class 0 = no object there) and the
image has two more (background colour, pattern). A generated image is scored against the scene its
prompt was made from:

- `caption_match`: the fraction of images whose attributes all match their caption (every captioned
  object has the right colour, shape and size in its cell, no object where the caption has none, the
  right background and pattern): the CLIP-score analogue, and a strict one.
- `attribute_accuracy`: the fraction of the caption's individual statements that hold (three per object,
  two for the background), plus one per cell the caption leaves empty, so that a model that paints
  objects everywhere is marked down.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import BACKGROUNDS, COLOURS, OBJECT_SIZES, PATTERNS, POSITIONS, SHAPES, Scene

CELLS = len(POSITIONS)
# (name, classes) of each head; class 0 of the cell heads means "no object in this cell".
CELL_HEADS = (("colour", 1 + len(COLOURS)), ("shape", 1 + len(SHAPES)), ("size", 1 + len(OBJECT_SIZES)))
IMAGE_HEADS = (("background", len(BACKGROUNDS)), ("pattern", len(PATTERNS)))


def targets(scenes: list[Scene]) -> np.ndarray:
    """int64 [n, 3 * CELLS + 2]: per cell colour, shape, size (0 = empty), then background and pattern."""
    out = np.zeros((len(scenes), 3 * CELLS + 2), dtype=np.int64)
    colours, sizes, backgrounds = list(COLOURS), list(OBJECT_SIZES), list(BACKGROUNDS)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = POSITIONS.index(obj.position)
            out[i, 3 * cell:3 * cell + 3] = (1 + colours.index(obj.colour), 1 + SHAPES.index(obj.shape),
                                             1 + sizes.index(obj.size))
        out[i, -2:] = (backgrounds.index(scene.background), PATTERNS.index(scene.pattern))
    return out


@dataclass(frozen=True)
class AttributeScores:
    caption_match: float          # fraction of images matching their caption in every attribute
    attribute_accuracy: float     # fraction of the captions' statements that hold
    per_image_match: np.ndarray   # bool [n]
    # The statements by kind: each attribute over the captioned objects, "empty" over the cells the caption
    # leaves empty, background and pattern over the images. Empty cells are most statements, so a model that
    # draws little scores well on attribute_accuracy; `colour` is where a weak model shows what it learned.
    breakdown: dict[str, float]

    def to_json(self) -> dict:
        return {"caption_match": self.caption_match, "attribute_accuracy": self.attribute_accuracy,
                **{f"acc_{k}": v for k, v in self.breakdown.items()}}


def score(predicted: np.ndarray, wanted: np.ndarray) -> AttributeScores:
    """Score predicted targets [n, 3 * CELLS + 2] against the captions' targets of the same layout."""
    predicted, wanted = np.asarray(predicted), np.asarray(wanted)
    if predicted.shape != wanted.shape:
        raise ValueError(f"predicted {predicted.shape} and wanted {wanted.shape} differ")
    cells_p = predicted[:, :3 * CELLS].reshape(-1, CELLS, 3)
    cells_w = wanted[:, :3 * CELLS].reshape(-1, CELLS, 3)
    occupied = cells_w[:, :, 0] > 0
    object_ok = (cells_p == cells_w) & occupied[:, :, None]             # three statements per object
    empty_ok = (cells_p[:, :, 0] == 0) & ~occupied                        # one per empty cell
    image_ok = predicted[:, -2:] == wanted[:, -2:]
    statements = 3 * occupied.sum(1) + (~occupied).sum(1) + 2
    correct = object_ok.sum((1, 2)) + empty_ok.sum(1) + image_ok.sum(1)
    match = correct == statements
    breakdown = {name: float((cells_p[:, :, i] == cells_w[:, :, i])[occupied].mean()) if occupied.any() else 1.0
                 for i, (name, _) in enumerate(CELL_HEADS)}
    breakdown["empty"] = float(empty_ok[~occupied].mean()) if (~occupied).any() else 1.0
    breakdown.update({name: float(image_ok[:, i].mean()) for i, (name, _) in enumerate(IMAGE_HEADS)})
    return AttributeScores(float(match.mean()), float(correct.sum() / statements.sum()), match, breakdown)
