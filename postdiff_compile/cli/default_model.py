"""The embedded default model: the reference model trained here (postdiff_compile/lab/reference), shipped inside
the package as a diffusers pipeline folder, so `postdiff-compile` with no SOURCE compiles a real, trained
text-to-image model offline in seconds."""
from __future__ import annotations

from pathlib import Path

from ..errors import PostDiffError

DESCRIPTION = "the reference model (scenes32: 32x32 pixel-space SD1.5-block UNet, trained here)"


def embedded_default_path() -> Path:
    from ..lab.reference import is_reference_folder, reference_folder

    folder = reference_folder()
    if not is_reference_folder(folder):
        raise PostDiffError("the package's reference model is missing; reinstall postdiff-compile", folder)
    return folder
