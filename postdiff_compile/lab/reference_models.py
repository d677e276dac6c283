"""Which reference model a folder holds, and loading it: what study, tune and samples run on, in the driver and in
each worker of a sweep (sweep.py)."""
from __future__ import annotations

from pathlib import Path


def lab_family(folder: str | Path | None) -> str:
    """scenes64 for a reference-model-2 folder (train_unet's WORK/model), else scenes32 (model 1, the default)."""
    from .reference2 import is_model2_folder

    return "scenes64" if folder is not None and is_model2_folder(folder) else "scenes32"


def load_lab_pipeline(folder: str | Path | None):
    """The reference model in `folder` (None: the shipped model 1) as a StableDiffusionPipeline."""
    if lab_family(folder) == "scenes64":
        from .reference2 import load_pipeline
    else:
        from .reference import load_pipeline
    return load_pipeline(folder)
