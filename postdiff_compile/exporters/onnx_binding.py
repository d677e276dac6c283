"""An onnxruntime session called through I/O binding: inputs are bound where the torch tensors already are and
outputs are written into buffers allocated once per session, so that a step on a GPU costs no copy through the
host and no output allocation (onnx_export.open_file uses it on CUDA). The outputs are the same tensors on every
call: a caller must be done with one call's outputs before it calls the same variant again (the denoising loop
is, runtime/denoise.py)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

_ELEMENT = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
            torch.int32: np.int32, torch.bool: np.bool_}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
          "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def bound_runner(session, device: torch.device) -> Callable[..., list[torch.Tensor]] | None:
    """A run(*inputs) over `session` with preallocated outputs, or None when an output's shape or type is not fixed
    in the graph (the caller then falls back to session.run)."""
    outputs = session.get_outputs()
    if not all(o.type in _TORCH and all(isinstance(d, int) for d in o.shape) for o in outputs):
        return None
    kind, index = device.type, device.index or 0
    buffers = [torch.empty(tuple(o.shape), dtype=_TORCH[o.type], device=device) for o in outputs]
    binding = session.io_binding()
    for o, buffer in zip(outputs, buffers):
        binding.bind_output(o.name, kind, index, _ELEMENT[buffer.dtype], tuple(buffer.shape), buffer.data_ptr())
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        # Contiguous tensors on the session's device, kept alive (in `held`) until the run returns.
        held = [t.detach().to(device).contiguous() for t in inputs]
        for name, t in zip(names, held):
            if t.dtype not in _ELEMENT:
                raise TypeError(f"input {name}: onnxruntime binding has no element type for {t.dtype}")
            binding.bind_input(name, kind, index, _ELEMENT[t.dtype], tuple(t.shape), t.data_ptr())
        session.run_with_iobinding(binding)
        return buffers
    return run
