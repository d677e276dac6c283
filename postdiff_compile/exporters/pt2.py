"""Save a variant as a torch.export program file (.pt2)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import example_inputs
from ..errors import PostDiffError
from ..variants import Variant, variant_input_specs


def export_variant(variant: Variant) -> torch.export.ExportedProgram:
    """The rewritten graph re-exported with flat tensor inputs and a tuple output."""
    params = list(variant.module.parameters())
    device = params[0].device if params else torch.device("cpu")
    args = tuple(a.to(device) for a in example_inputs(variant_input_specs(variant)))
    try:
        with torch.no_grad():
            return torch.export.export(variant.module, args, strict=False)
    except Exception as err:  # torch.export reports many error types
        raise PostDiffError(f"torch.export failed for variant {variant.spec.name}: {type(err).__name__}: {err}")


def save_pt2(variant: Variant, path: Path, program: torch.export.ExportedProgram | None = None) -> Path:
    """Write the program without its sample inputs: torch stores them as a pickle, and an artifact holds data
    only (runtime/pt2_archive.py refuses any archive torch would have to unpickle). The weights are raw tensor
    bytes already. The caller's program keeps its sample inputs (AOTInductor compiles from them)."""
    program = program if program is not None else export_variant(variant)
    sample = program.example_inputs
    program.example_inputs = None
    try:
        torch.export.save(program, str(path))
    finally:
        program.example_inputs = sample
    return path
