"""One artifact variant file opened on a backend, callable like an in-memory variant.

Each returns a `BackendVariant`: called with torch tensors in the order of `.inputs`, it returns torch
tensors in the order of `.outputs` on the runner's device, so that the denoising loop does not know which
backend it drives.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PostDiffError

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")
FORMAT_OF = {"torch": "pt2", "onnxruntime": "onnx", "tensorrt": "tensorrt", "aoti": "aoti"}


@dataclass
class BackendVariant:
    id: str
    inputs: list[str]
    outputs: list[str]
    run: Callable[..., tuple[torch.Tensor, ...]]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.run(*inputs))


def open_torch(path: Path, device: torch.device) -> Callable:
    try:
        module = torch.export.load(str(path)).module()
    except Exception as err:  # torch.export.load raises several types for a bad archive
        raise PostDiffError(f"torch.export cannot load the program: {type(err).__name__}: {err}", path) from None
    module.to(device)

    def run(*inputs):
        with torch.no_grad():
            return module(*inputs)
    return run


def open_onnxruntime(path: Path, device: torch.device) -> Callable:
    from ..exporters.onnx_export import onnx_session, run_session

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
    session = onnx_session(path, providers)
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        return [t.to(device) for t in run_session(session, names, inputs)]
    return run


def open_tensorrt(path: Path, device: torch.device) -> Callable:
    from ..exporters.tensorrt_export import EngineRunner

    engine = EngineRunner(path)
    return lambda *inputs: engine(*inputs)


def open_aoti(path: Path, device: torch.device) -> Callable:
    from ..exporters.aoti import load_aoti

    # The package runs on the device it was compiled for (checked against the manifest before this).
    model = load_aoti(path)

    def run(*inputs):
        # The compiled code assumes the strides it was traced with (contiguous); the loop's expanded
        # timestep has stride 0.
        with torch.no_grad():
            return model(*(t.contiguous() for t in inputs))
    return run


OPENERS = {"torch": open_torch, "onnxruntime": open_onnxruntime, "tensorrt": open_tensorrt, "aoti": open_aoti}


def open_variant(backend: str, folder: Path, entry: dict, device: torch.device) -> BackendVariant:
    file = entry["files"][FORMAT_OF[backend]]
    run = OPENERS[backend](Path(folder) / file["file"], device)
    return BackendVariant(entry["id"], [i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]], run)
