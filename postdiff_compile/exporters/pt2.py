"""The pt2 format: a variant as a torch.export program file (.pt2), opened by the torch backend.

A program is saved without its weights and read back as data only (pt2_archive.py): nothing in the file is
unpickled; its weights come from the artifact's weights file (weights_file.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import example_inputs
from ..errors import PostDiffError
from ..variants import Variant, variant_input_specs
from .formats import VariantJob, major_minor
from .manifest import MANIFEST, file_entry
from .weights_file import FILE, PARAM_PREFIX



def export_variant(variant: Variant) -> torch.export.ExportedProgram:
    """The rewritten graph re-exported with flat tensor inputs and a tuple output, once for every format (pt2, aoti
    and the ONNX exporter start from it). Squeezes of dimensions larger than 1 are dropped first: no-ops in torch,
    errors in ONNX (passes/noop_squeeze.py)."""
    from ..passes.noop_squeeze import drop_noop_squeezes

    params = list(variant.module.parameters())
    device = params[0].device if params else torch.device("cpu")
    args = tuple(a.to(device) for a in example_inputs(variant_input_specs(variant)))
    try:
        with torch.no_grad():
            return torch.export.export(drop_noop_squeezes(variant.module), args, strict=False)
    except Exception as err:  # torch.export reports many error types
        raise PostDiffError(f"torch.export failed for variant {variant.spec.name}: {type(err).__name__}: {err}")


def save_pt2(variant: Variant, path: Path, program: torch.export.ExportedProgram | None = None) -> Path:
    """Write the program without its weights and sample inputs. The weights are in the artifact's weights file
    (bound at open: `bind_weights`); torch stores sample inputs as a pickle, and an artifact holds data only
    (pt2_archive.py refuses any archive torch would have to unpickle). The caller's program is not changed."""
    program = program if program is not None else export_variant(variant)
    # torch writes a meta tensor as zero bytes and reads it back as zeros: the program keeps every weight's name,
    # shape and dtype, and none of its bytes.
    skeleton = torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict={k: _meta(v) for k, v in program.state_dict.items()}, range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph, example_inputs=None, constants=program.constants,
        verifiers=program.verifiers)
    torch.export.save(skeleton, str(path))
    return path


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return torch.nn.Parameter(meta, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else meta


def bind_weights(program: torch.export.ExportedProgram, weights: dict[str, torch.Tensor] | None, path: Path) -> None:
    """Give a program saved by save_pt2 its weights (by state-dict name), shared with every other program bound to
    the same dict: one copy in memory for all variants. Format version 1 programs hold their own (`weights` None)."""
    if weights is None:
        return
    for name, placeholder in program.state_dict.items():
        tensor = weights.get(name.removeprefix(PARAM_PREFIX))
        if tensor is None or tensor.shape != placeholder.shape or tensor.dtype != placeholder.dtype:
            found = "missing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
            raise PostDiffError(f"the program's weight {name.removeprefix(PARAM_PREFIX)!r} "
                                f"({placeholder.dtype} {list(placeholder.shape)}) is {found} in the weights file", path)
        program.state_dict[name] = torch.nn.Parameter(tensor, requires_grad=False) \
            if isinstance(placeholder, torch.nn.Parameter) else tensor


def program_of(job: VariantJob) -> torch.export.ExportedProgram:
    """The variant re-exported once for every format that starts from the program (pt2, aoti, onnx)."""
    if job.program is None:
        with job.build.timed(f"export {job.tag}"):
            job.program = export_variant(job.variant)
    return job.program


def write(job: VariantJob) -> dict:
    program = program_of(job)
    with job.build.timed(f"save pt2 {job.tag}"):
        return {**file_entry(save_pt2(job.variant, job.build.folder / f"{job.stem}.pt2", program)), "weights": FILE}


def check_file(path: Path) -> None:
    from .pt2_archive import check_pt2

    check_pt2(path.read_bytes(), path)


def check_toolchain(folder: Path, manifest: dict, device: torch.device) -> None:
    built = manifest["toolchain"]["torch"]
    if major_minor(built) > major_minor(torch.__version__):
        raise PostDiffError(f"the .pt2 programs were saved by torch {built}, newer than this torch "
                            f"{torch.__version__}; torch.export programs load on the same or a newer torch",
                            Path(folder) / MANIFEST)


def open_file(path: Path, device: torch.device, sha256: str | None = None, weights=None):
    from .pt2_archive import load_program

    program = load_program(path, sha256)   # checked as data first: nothing in the file is unpickled
    bind_weights(program, weights.tensors(device) if weights is not None else None, path)
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
