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


def open_torch(path: Path, device: torch.device, sha256: str | None = None) -> Callable:
    from ..exporters.pt2_archive import load_program

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


def open_onnxruntime(path: Path, device: torch.device, sha256: str | None = None) -> Callable:
    from ..exporters.onnx_export import onnx_session, run_session

    check_external_data(path)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
    session = onnx_session(path, providers)
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        return [t.to(device) for t in run_session(session, names, inputs)]
    return run


def check_external_data(path: Path) -> None:
    """Every tensor the graph keeps outside it lives in the artifact's shared weights file: onnxruntime would
    read any path an edited graph names (`../../etc/passwd`) and a hash of the graph does not stop an edit."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    from ..exporters.weights_file import FILE

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf and onnx raise several types for a damaged file
        raise PostDiffError(f"not an ONNX graph: {type(err).__name__}: {str(err)[:200]}", path) from None
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location != FILE:
                raise PostDiffError(f"the ONNX tensor {tensor.name[:80]!r} reads its data from {str(location)[:80]!r}; "
                                    f"an artifact's graphs read only {FILE} beside them", path)


def open_tensorrt(path: Path, device: torch.device, sha256: str | None = None) -> Callable:
    from ..exporters.tensorrt_export import EngineRunner

    engine = EngineRunner(path)
    return lambda *inputs: engine(*inputs)


def open_aoti(path: Path, device: torch.device, sha256: str | None = None) -> Callable:
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
    from ..exporters.manifest import member

    file = entry["files"][FORMAT_OF[backend]]
    path = member(folder, file["file"], f"{FORMAT_OF[backend]} graph of variant {entry['id']}")
    run = OPENERS[backend](path, device, file["sha256"])
    return BackendVariant(entry["id"], [i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]], run)
