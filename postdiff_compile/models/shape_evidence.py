"""What every detector works with: tensor shapes read so that a hostile or damaged header ends detection
with evidence (never a KeyError or IndexError), and what a detector reports, a Detection or NotMatched."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Detection:
    family: str
    layout: str                 # "ldm" (also SGM), "diffusers", "pixart_original", "sd3_original", "flux_original"
    prefix: str                 # what the denoiser's tensor names start with in the file
    config: dict                # diffusers config of the denoiser, inferred from the shapes
    prediction_type: str
    evidence: list[str] = field(default_factory=list)
    # A custom model (a folder's or an in-memory one) matched to its closest family: what differs from it.
    differs: list[str] = field(default_factory=list)
    # The VAE factor of the pipeline the denoiser came with, where one came with it (None: the family's).
    vae_scale_factor: int | None = None


class NotMatched(Exception):
    """The shapes are not the architecture a detector reads; `evidence` says what it found up to there."""

    def __init__(self, evidence: list[str]):
        self.evidence = evidence


class _Dims(tuple):
    """A tensor's shape whose missing dimension is a detection miss, not an IndexError."""
    name = ""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except IndexError:
            raise NotMatched([f"tensor {self.name} has shape {list(self)}, too few dimensions"]) from None


class CheckedShapes(dict):
    """Shapes as detection reads them: a missing sibling tensor or dimension ends detection with evidence
    (a hostile or damaged header must give the unknown-architecture error, never a KeyError)."""

    def __init__(self, shapes: Shapes):
        super().__init__()
        for name, shape in shapes.items():
            dims = _Dims(shape)
            dims.name = name
            self[name] = dims

    def __missing__(self, key: str):
        raise NotMatched([f"tensor {key} is missing"])


def count_blocks(s: Shapes, prefix: str) -> int:
    """How many numbered blocks `prefix` has: one more than the highest number after it."""
    number = re.compile(r"([0-9]{1,9})\.")
    found = {int(m[1]) for k in s if k.startswith(prefix) and (m := number.match(k, len(prefix)))}
    return max(found) + 1 if found else 0


# Plausibility bounds: a header can claim any count, and building a model of a million blocks (even on the
# meta device) would hang; every released checkpoint is far inside these.
_BOUNDS = {"levels": (1, 8), "layers_per_block": (1, 16), "attention_depth": (0, 64), "channels": (1, 1 << 16),
           "num_layers": (1, 256), "patch_size": (1, 16), "in_channels": (1, 1024), "out_channels": (1, 1024),
           "context_dim": (1, 1 << 16), "guidance_embedding": (0, 1 << 16), "adm_channels": (1, 1 << 16),
           "pos_embed_max_size": (1, 1024)}   # SD3's positional table is built (sin-cos) with the model


def bounded(evidence: list[str], **values: int | list[int] | None) -> None:
    """NotMatched if any of `values` (named as in _BOUNDS) is outside its plausibility bounds."""
    for name, value in values.items():
        low, high = _BOUNDS[name]
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not low <= v <= high:
                raise NotMatched(evidence + [f"{name.replace('_', ' ')} {v} outside [{low}, {high}]"])
