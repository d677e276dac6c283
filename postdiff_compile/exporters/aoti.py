"""The aoti format: a variant compiled ahead of time with AOTInductor into a self-contained package (.aoti.pt2).

The package holds the generated C++ (or CUDA) code compiled into a shared library, with the weights,
for the device the variant's weights are on. Python loads it with `torch._inductor.aoti_load_package`,
C++ with `torch::inductor::AOTIModelPackageLoader` (runtimes/cpp). Inputs and outputs are the variant's,
flat and in the manifest's order.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PostDiffError
from .formats import VariantJob, major_minor
from .manifest import MANIFEST, file_entry


def save_aoti(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile `program` (see pt2.export_variant) and write the package to `path`."""
    import torch._inductor

    try:
        with torch.no_grad():
            # Inductor's defaults: compiling the wrapper at -O0 saved 8% of the time on the tiny model's
            # full+write_dc@b2_8x8 (49.9 s against 54.0 s, two runs each, fresh caches, 2 CPU cores) and
            # left the call time within noise (10.2 / 13.6 ms against 10.2 / 10.0 ms): not worth a setting.
            written = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as err:  # inductor raises compiler and lowering errors of many types
        raise PostDiffError(f"AOTInductor failed: {type(err).__name__}: {str(err)[:2000]}", path) from None
    return Path(written)


def load_aoti(path: Path):
    """The package as a callable: positional tensors in, a list of tensors out."""
    import torch._inductor

    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as err:  # a damaged archive or a library built for another torch/device
        raise PostDiffError(f"AOTInductor cannot load the package: {type(err).__name__}: {err}", path) from None


def write(job: VariantJob) -> dict:
    from .pt2 import program_of

    program = program_of(job)
    build = job.build
    with build.timed(f"compile aoti {job.tag}"):
        path = save_aoti(program, build.folder / f"{job.stem}.aoti.pt2")
    with build.timed(f"verify aoti {job.tag}"):
        got = load_aoti(path)(*[t.to(build.device).contiguous() for t in job.feed])
        verification = job.verify(got, "AOTInductor package")
    return {**file_entry(path), "device": build.device.type,
            "compile_seconds": round(build.stages[f"compile aoti {job.tag}"], 1), "verification": verification}


def check_toolchain(folder: Path, manifest: dict, device: torch.device) -> None:
    # A package is a shared library compiled against this torch's C++ API for one device.
    built = manifest["toolchain"]["torch"]
    if major_minor(built) != major_minor(torch.__version__):
        raise PostDiffError(f"the AOTInductor packages were compiled with torch {built}, this is torch "
                            f"{torch.__version__}; recompile with --format aoti here", Path(folder) / MANIFEST)
    for variant in manifest["variants"]:
        package = variant["files"]["aoti"]
        if package["device"] != device.type:
            raise PostDiffError(f"the AOTInductor package was compiled for {package['device']}, asked to run "
                                f"on {device.type}", Path(folder) / package["file"])


def open_file(path: Path, device: torch.device, sha256: str | None = None):
    # The package runs on the device it was compiled for (checked against the manifest before this).
    model = load_aoti(path)

    def run(*inputs):
        # The compiled code assumes the strides it was traced with (contiguous); the loop's expanded
        # timestep has stride 0.
        with torch.no_grad():
            return model(*(t.contiguous() for t in inputs))
    return run
