"""A sample grid: the same prompts and noise through the baseline and each preset, side by side (PNG)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import PRESETS
from .evaluate import PromptSet, Sampler, generate
from .study import write_text_atomic

TILE = 128          # each image is shown at 128x128 (32x32 at 4x, 64x64 at 2x), nearest neighbour: pixels stay pixels
LABEL_HEIGHT = 18


def grid_columns(family: str, steps: int) -> list[Sampler]:
    return [Sampler("baseline", steps=steps)] + [Sampler(name, steps=steps, config=PRESETS[name].for_family(family))
                                                 for name in PRESETS if name != "none"]


def sample_grid(pipe, family: str, prompts: PromptSet, steps: int, guidance: float, stage) -> tuple:
    """(PIL image, captions): a row per prompt, a column per sampler."""
    from PIL import Image, ImageDraw

    columns = grid_columns(family, steps)
    images = [generate(pipe, s, prompts, guidance, stage(f"{s.name}", len(prompts.captions))) for s in columns]
    n, cell = len(prompts.captions), TILE
    pad = 4
    width = len(columns) * (cell + pad) + 30
    sheet = Image.new("RGB", (width, LABEL_HEIGHT + n * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, sampler in enumerate(columns):
        draw.text((30 + c * (cell + pad) + 2, 3), sampler.name, fill="black")
        for r in range(n):
            pixels = (images[c][r].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (30 + c * (cell + pad), LABEL_HEIGHT + r * (cell + pad)))
    for r in range(n):
        draw.text((8, LABEL_HEIGHT + r * (cell + pad) + cell // 2 - 6), str(r + 1), fill="black")
    return sheet, prompts.captions


def write_grid(sheet, captions: list[str], path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    text = path.with_suffix(".md")
    rows = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
    write_text_atomic(text, f"Rows of {path.name}:\n\n{rows}\n")
    return [path, text]
