"""The embedded default model: reference model 2, trained here (postdiff_compile/lab/reference2), shipped inside the
package as a diffusers pipeline folder, so `postdiff-compile` with no SOURCE compiles a real, trained text-to-image
model offline in seconds."""
from __future__ import annotations

from pathlib import Path

from ..errors import PostDiffError
from ..lab.reference_models import DEFAULT_FAMILY, DESCRIPTIONS, family_of, shipped_folder

DESCRIPTION = DESCRIPTIONS[DEFAULT_FAMILY]


def embedded_default_path() -> Path:
    folder = shipped_folder(DEFAULT_FAMILY)
    if family_of(folder) != DEFAULT_FAMILY:
        raise PostDiffError("the package's reference model is missing; reinstall postdiff-compile", folder)
    return folder
