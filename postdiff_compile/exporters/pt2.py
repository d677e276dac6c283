"""Save a variant as a torch.export program file (.pt2)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import example_inputs
from ..errors import PostDiffError
from ..variants import Variant, cache_specs


def save_pt2(variant: Variant, path: Path) -> Path:
    """Re-export the rewritten graph (flat tensor inputs, tuple output) and save it."""
    args = example_inputs(cache_specs(variant))
    try:
        with torch.no_grad():
            program = torch.export.export(variant.module, args, strict=False)
    except Exception as err:  # torch.export reports many error types
        raise PostDiffError(f"torch.export failed for variant {variant.spec.name}: {type(err).__name__}: {err}")
    torch.export.save(program, str(path))
    return path
