"""The aoti format: a variant compiled ahead of time with AOTInductor into a self-contained package (.aoti.pt2).

The package holds the generated C++ (or CUDA) code compiled into a shared library for the device the variant's
weights are on, without the weights: they are the artifact's weights file, given to the package at open through
AOTInductor's constant loading (`load_constants`, by state-dict name; the C++ runner does the same). Python loads it with `torch._inductor.aoti_load_package`,
C++ with `torch::inductor::AOTIModelPackageLoader` (runtimes/cpp). Inputs and outputs are the variant's,
flat and in the manifest's order.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PostDiffError
from .formats import VariantJob, major_minor
from .manifest import MANIFEST, file_entry, graph_entries
from .weights_file import FILE, PARAM_PREFIX


# Constants outside the shared library; `always_keep_tensor_constants`: without it inductor writes small tensors
# (biases of 8 elements or fewer) into the generated code as literals, where new weights could not reach them.
EXTERNAL_CONSTANTS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}


def save_aoti(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile `program` (see pt2.export_variant) and write the package, without its weights, to `path`."""
    import torch._inductor

    try:
        with torch.no_grad():
            # Inductor's defaults otherwise: compiling the wrapper at -O0 saved 8% of the time on the tiny model's
            # full+write_dc@b2_8x8 (49.9 s against 54.0 s, two runs each, fresh caches, 2 CPU cores) and
            # left the call time within noise (10.2 / 13.6 ms against 10.2 / 10.0 ms): not worth a setting.
            written = torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                               inductor_configs=dict(EXTERNAL_CONSTANTS))
    except Exception as err:  # inductor raises compiler and lowering errors of many types
        raise PostDiffError(f"AOTInductor failed: {type(err).__name__}: {str(err)[:2000]}", path) from None
    return Path(written)


def load_aoti(path: Path, weights: dict[str, torch.Tensor] | None = None):
    """The package as a callable: positional tensors in, a list of tensors out. A format-2 package gets its
    constants from `weights` (by state-dict name), which it uses in place: the caller keeps them alive."""
    import torch._inductor

    try:
        model = torch._inductor.aoti_load_package(str(path))
    except Exception as err:  # a damaged archive or a library built for another torch/device
        raise PostDiffError(f"AOTInductor cannot load the package: {type(err).__name__}: {err}", path) from None
    if weights is not None:
        constants = {}
        for name in model.get_constant_fqns():
            tensor = weights.get(name.removeprefix(PARAM_PREFIX))
            if tensor is None:
                raise PostDiffError(f"the package's constant {name.removeprefix(PARAM_PREFIX)!r} is not in the "
                                    "weights file", path)
            constants[name] = tensor
        try:
            model.load_constants(constants, check_full_update=True, user_managed=True)
        except Exception as err:  # a shape or dtype the package was not compiled for
            raise PostDiffError(f"AOTInductor cannot take the weights: {type(err).__name__}: {str(err)[:300]}",
                                path) from None
    return model


def write(job: VariantJob) -> dict:
    from .pt2 import program_of

    program = program_of(job)
    build = job.build
    with build.timed(f"compile aoti {job.tag}"):
        path = save_aoti(program, build.folder / f"{job.stem}.aoti.pt2")
    with build.timed(f"verify aoti {job.tag}"):
        got = load_aoti(path, build.weights.tensors(build.device))(*[t.to(build.device).contiguous() for t in job.feed])
        verification = job.verify(got, "AOTInductor package")
    return {**file_entry(path), "weights": FILE, "device": build.device.type,
            "compile_seconds": round(build.stages[f"compile aoti {job.tag}"], 1), "verification": verification}


def check_toolchain(folder: Path, manifest: dict, device: torch.device) -> None:
    # A package is a shared library compiled against this torch's C++ API for one device.
    built = manifest["toolchain"]["torch"]
    if major_minor(built) != major_minor(torch.__version__):
        raise PostDiffError(f"the AOTInductor packages were compiled with torch {built}, this is torch "
                            f"{torch.__version__}; recompile with --format aoti here", Path(folder) / MANIFEST)
    for variant in graph_entries(manifest):
        package = variant["files"]["aoti"]
        if package["device"] != device.type:
            raise PostDiffError(f"the AOTInductor package was compiled for {package['device']}, asked to run "
                                f"on {device.type}", Path(folder) / package["file"])


def open_file(path: Path, device: torch.device, sha256: str | None = None, weights=None):
    # The package runs on the device it was compiled for (checked against the manifest before this).
    model = load_aoti(path, weights.tensors(device) if weights is not None else None)

    def run(*inputs):
        # The compiled code assumes the strides it was traced with (contiguous); the loop's expanded
        # timestep has stride 0.
        with torch.no_grad():
            return model(*(t.contiguous() for t in inputs))
    return run
