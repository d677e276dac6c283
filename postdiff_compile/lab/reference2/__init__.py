"""Reference model 2 (issue 25): a latent diffusion model built like Stable Diffusion from diffusers parts and
trained here on the procedural scenes at 64x64: `model.py` (parts, pipeline assembly, folders),
`train_vae.py` and `train_unet.py` (the two training jobs, each resumable across sittings), `checkpoint.py`
(atomic checkpoints, log, loss curve, the resumable loop), `snapshot.py` (a committed training state) and
`ship.py` (a trained model into the package). docs/reference2.md has the design and the plan.

The shipped model (`weights/`, a diffusers pipeline folder in float16) is the CLI's embedded default.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS = "weights"


def shipped_folder() -> Path:
    """The shipped model's diffusers pipeline folder (its vae/ is also what train_unet encodes with)."""
    from importlib import resources

    return Path(str(resources.files("postdiff_compile.lab.reference2") / WEIGHTS))


def is_model2_folder(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / "model_index.json").read_text()).get("postdiff_family") == "scenes64"
    except (OSError, ValueError):
        return False


def load_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Reference model 2 (the shipped one, or one `train_unet` wrote: WORK/model) as a StableDiffusionPipeline."""
    from diffusers import DDIMScheduler

    from ...errors import PostDiffError
    from .model import load_parts, make_pipeline

    folder = Path(folder) if folder is not None else shipped_folder()
    if not is_model2_folder(folder):
        raise PostDiffError("not a reference-model-2 folder (model_index.json without postdiff_family 'scenes64'); "
                            "train one with python -m postdiff_compile.lab.reference2.train_unet", folder)
    scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return make_pipeline(load_parts(folder, dtype), scheduler)
