"""Save a variant as a torch.export program file (.pt2)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import example_inputs
from ..errors import PostDiffError
from ..variants import Variant, variant_input_specs


def save_pt2(variant: Variant, path: Path) -> Path:
    """Re-export the rewritten graph (flat tensor inputs, tuple output) and save it."""
    params = list(variant.module.parameters())
    device = params[0].device if params else torch.device("cpu")
    args = tuple(a.to(device) for a in example_inputs(variant_input_specs(variant)))
    try:
        with torch.no_grad():
            program = torch.export.export(variant.module, args, strict=False)
    except Exception as err:  # torch.export reports many error types
        raise PostDiffError(f"torch.export failed for variant {variant.spec.name}: {type(err).__name__}: {err}")
    torch.export.save(program, str(path))
    return path
