"""The reference text-to-image model trained here (issue 8): data, text encoder, training, loading.

`load_pipeline()` gives the shipped model as a diffusers StableDiffusionPipeline (pixel space, 32x32),
offline: its weights are inside the package.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

WEIGHTS = "weights"


def reference_folder() -> Path:
    """The shipped model's diffusers pipeline folder."""
    return Path(str(resources.files("postdiff_compile.lab.reference") / WEIGHTS))


def is_reference_folder(path: str | Path) -> bool:
    import json

    index = Path(path) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("postdiff_family") == "scenes32"
    except (OSError, ValueError):
        return False


def load_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The reference model (the shipped one, or one `train` wrote to `folder`) as a StableDiffusionPipeline."""
    from ...errors import PostDiffError
    from .model import load_parts, make_pipeline

    folder = Path(folder) if folder is not None else reference_folder()
    if not is_reference_folder(folder):
        raise PostDiffError("not a reference-model folder (model_index.json without postdiff_family "
                            "'scenes32'); train one with python -m postdiff_compile.lab.reference.train", folder)
    scheduler = None
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return make_pipeline(load_parts(folder, dtype), scheduler)
