"""Test-session setup that must happen before any test module is imported."""
import os
from pathlib import Path

# One intra-op thread per test process (pytest-xdist runs two): the tests run tiny models whose ops are too small to split, and on these 2-core
# machines a second thread mostly waits on the other core. Measured (one peer-parity case, test_families'
# SDXL presets): quiet machine 5.8 s / 16.0 s with 1 thread against 6.7 s / 18.3 s with 2; with the other
# core busy 5.5 s against 10.0 s. Set before torch is imported so OpenMP starts with it; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU the Triton kernels run in Triton's interpreter. The variable is read when triton.language
# defines its own jit functions (tl.randn, ...), i.e. when triton is first imported, which torch may do
# for an earlier test module; so it is set here, before collection, not in the kernel tests' module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- expensive things built once per test run -------------------------------------------------------------

import pytest  # noqa: E402

# One local Ray instance for every Ray test of the run (tests/ray_support.py; started only by a test that asks).
from ray_support import ray_sweep  # noqa: E402, F401

TINY_RESOLUTION = (128, 128)   # latent 16x16, low resolution 8x8
TINY_STEPS = 20


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, worker_id):
    """artifact(preset, formats="pt2,onnx") -> folder: the tiny SD1.5-layout U-Net (seed 0, DDIM, 20 steps,
    128x128) compiled with that preset, shared by test_artifact, test_refit and test_cpp_runner. One folder for the
    whole run, both xdist workers included: a request is served by any artifact of the preset built with at least
    the formats asked for, else compiled with exactly those (a lock per preset: a worker that asks for what the other
    is building waits for it). Rebuilding with the union of the formats, per worker as before, compiled the fast
    preset's AOTInductor packages twice when test_cpp_runner and test_refit shared a worker. Tests must copy a folder
    before changing it."""
    from filelock import FileLock
    from tiny_models import tiny_sd_pipeline

    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.exporters.formats import parse_formats
    from postdiff_compile.config import ConfigRequest

    # xdist's workers have their own base folders in one folder of the run; a run without xdist has its own base.
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "tiny-artifacts"
    root.mkdir(exist_ok=True)
    unet = None

    def artifact(preset: str, formats: str = "pt2,onnx") -> Path:
        nonlocal unet
        wanted = set(parse_formats(formats))
        with FileLock(str(root / f"{preset}.lock")):
            for folder in sorted(root.glob(f"{preset}-*")):   # complete folders only: compile_artifact moves them in
                if folder.is_dir() and wanted <= set(folder.name.split("-")[1:]):
                    return folder
            out = root / f"{preset}-{'-'.join(sorted(wanted))}"
            unet = unet if unet is not None else tiny_sd_pipeline("sd15").unet
            compile_artifact(unet, ConfigRequest(preset), out, resolution=TINY_RESOLUTION, steps=TINY_STEPS,
                             formats=",".join(sorted(wanted)))
            return out

    return artifact
