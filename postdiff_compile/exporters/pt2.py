"""The pt2 format: a variant as a torch.export program file (.pt2), opened by the torch backend.

A program is read back as data only (pt2_archive.py): nothing in the file is unpickled."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import example_inputs
from ..errors import PostDiffError
from ..variants import Variant, variant_input_specs
from .formats import VariantJob, major_minor
from .manifest import MANIFEST, file_entry


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
    only (pt2_archive.py refuses any archive torch would have to unpickle). The weights are raw tensor
    bytes already. The caller's program keeps its sample inputs (AOTInductor compiles from them)."""
    program = program if program is not None else export_variant(variant)
    sample = program.example_inputs
    program.example_inputs = None
    try:
        torch.export.save(program, str(path))
    finally:
        program.example_inputs = sample
    return path


def program_of(job: VariantJob) -> torch.export.ExportedProgram:
    """The variant re-exported once for every format that starts from the program (pt2, aoti)."""
    if job.program is None:
        with job.build.timed(f"export {job.tag}"):
            job.program = export_variant(job.variant)
    return job.program


def write(job: VariantJob) -> dict:
    program = program_of(job)
    with job.build.timed(f"save pt2 {job.tag}"):
        return file_entry(save_pt2(job.variant, job.build.folder / f"{job.stem}.pt2", program))


def check_file(path: Path) -> None:
    from .pt2_archive import check_pt2

    check_pt2(path.read_bytes(), path)


def check_toolchain(folder: Path, manifest: dict, device: torch.device) -> None:
    built = manifest["toolchain"]["torch"]
    if major_minor(built) > major_minor(torch.__version__):
        raise PostDiffError(f"the .pt2 programs were saved by torch {built}, newer than this torch "
                            f"{torch.__version__}; torch.export programs load on the same or a newer torch",
                            Path(folder) / MANIFEST)


def open_file(path: Path, device: torch.device, sha256: str | None = None):
    from .pt2_archive import load_program

    program = load_program(path, sha256)   # checked as data first: nothing in the file is unpickled
    try:
        module = program.module()
    except Exception as err:  # unlifting reports several types for a bad program
        raise PostDiffError(f"torch.export cannot rebuild the program: {type(err).__name__}: {str(err)[:300]}",
                            path) from None
    module.to(device)

    def run(*inputs):
        with torch.no_grad():
            return module(*inputs)
    return run
