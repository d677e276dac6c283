"""The reference models trained here, by family: which one a folder holds, where each ships, and loading it. What the
CLI's default model, `run`'s prompt encoding and decoding, the server, and study/tune/samples (in the driver and in
each worker of a sweep: sweep.py) go through, so that none of them names one model.

scenes64 (model 2, latent, 64x64: lab/reference2) is the default since issue 25; scenes32 (model 1, pixel space,
32x32: lab/reference) is kept for its study's history (docs/study.md).
"""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_FAMILY = "scenes64"
LAB_FAMILIES = ("scenes32", "scenes64")
DESCRIPTIONS = {"scenes32": "reference model 1 (scenes32: 32x32 pixel-space SD1.5-block U-Net, trained here)",
                "scenes64": "reference model 2 (scenes64: 64x64 latent diffusion, SD1.5-block U-Net and VAE, "
                            "trained here)"}


def family_of(folder: str | Path | None) -> str | None:
    """The lab family of a pipeline folder (its model_index.json's postdiff_family), or None for any other."""
    if folder is None:
        return None
    try:
        family = json.loads((Path(folder) / "model_index.json").read_text()).get("postdiff_family")
    except (OSError, ValueError, AttributeError):
        return None
    return family if family in LAB_FAMILIES else None


def lab_family(folder: str | Path | None) -> str:
    """The family study, tune and samples run under: the folder's, the default's for None; a folder that is no
    reference model is model 1's to load, whose loader says what it expected."""
    return DEFAULT_FAMILY if folder is None else family_of(folder) or "scenes32"


def shipped_folder(family: str = DEFAULT_FAMILY) -> Path:
    """The pipeline folder the package ships for a lab family."""
    if family == "scenes64":
        from .reference2 import shipped_folder as model2
        return model2()
    from .reference import reference_folder
    return reference_folder()


def load_lab_pipeline(folder: str | Path | None):
    """The reference model in `folder` (None: the shipped default) as a float32 StableDiffusionPipeline."""
    if lab_family(folder) == "scenes64":
        from .reference2 import load_pipeline
    else:
        from .reference import load_pipeline
    return load_pipeline(folder)
