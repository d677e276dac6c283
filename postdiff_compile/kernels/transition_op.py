"""The transition as the custom op `postdiff::resolution_transition`, so that torch.export and
torch.compile see one opaque node instead of a dozen eager ops.

    (Tensor sample, Tensor model_output, Tensor? noise, SymInt height, SymInt width, str prediction_type,
     float alpha_bar_t, float alpha_bar_next, str renoise, float clamp_x0, SymInt? seed) -> Tensor

For prediction_type "flow" the two levels are the flow sigmas (x = (1 - sigma) x0 + sigma noise), passed in the
alpha_bar_t / alpha_bar_next slots (`TransitionParams.flow`).

CPU (and any device without a kernel of its own): `transition_reference`. CUDA: the fused Triton kernel
when triton imports, else the reference. Noise from a seed differs by device: the Triton kernel draws
Philox normals (`transition_triton.philox_normal`); the reference path draws
torch.randn(generator=torch.Generator(device).manual_seed(seed)), another stream. Same seed, same
device, same numbers; across devices only the distribution matches.

Registration is lazy (importing postdiff_compile registers nothing and imports no triton): call
`ensure_registered()` before loading an exported program that contains the op; `resolution_transition`
calls it itself.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch

from .transition_ref import TransitionParams, check_inputs, transition_reference

OP_NAME = "postdiff::resolution_transition"


def resolution_transition(sample: torch.Tensor, model_output: torch.Tensor, size: tuple[int, int],
                          params: TransitionParams, noise: torch.Tensor | None = None,
                          seed: int | None = None) -> torch.Tensor:
    """x_t' at full resolution `size` through the custom op. "fresh" takes exactly one of `noise` and
    `seed`; "predicted" takes neither."""
    ensure_registered()
    check_inputs(sample, model_output, size, params, noise, seed)
    return torch.ops.postdiff.resolution_transition(
        sample, model_output, noise, size[0], size[1], params.prediction_type, params.alpha_bar_t,
        params.alpha_bar_next, params.renoise, params.clamp_x0, seed)


@functools.cache
def kernel_available(device) -> bool:
    """Whether the op runs the fused Triton kernel for tensors on `device` (CUDA with triton only;
    on CPU the op runs the reference even under TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module(f"{__package__}.transition_triton")
    except ImportError:
        return False
    return True


def _params(prediction_type, alpha_bar_t, alpha_bar_next, renoise, clamp_x0) -> TransitionParams:
    return TransitionParams(prediction_type, alpha_bar_t, alpha_bar_next, renoise, clamp_x0)


def _reference_impl(sample, model_output, noise, height, width, prediction_type, alpha_bar_t, alpha_bar_next,
                    renoise, clamp_x0, seed):
    params = _params(prediction_type, alpha_bar_t, alpha_bar_next, renoise, clamp_x0)
    size = (height, width)
    if seed is None:
        return transition_reference(sample, model_output, size, params, noise)
    check_inputs(sample, model_output, size, params, noise, seed)
    generator = torch.Generator(sample.device).manual_seed(seed)
    noise = torch.randn((sample.shape[0], sample.shape[1], height, width), generator=generator,
                        device=sample.device, dtype=torch.float32)
    # The reference computes in float32 anyway: feeding it float32 inputs keeps the noise unrounded.
    return transition_reference(sample.float(), model_output.float(), size, params, noise).to(sample.dtype)


def _cuda_impl(sample, model_output, noise, height, width, prediction_type, alpha_bar_t, alpha_bar_next,
               renoise, clamp_x0, seed):
    if not kernel_available(sample.device):
        return _reference_impl(sample, model_output, noise, height, width, prediction_type, alpha_bar_t,
                               alpha_bar_next, renoise, clamp_x0, seed)
    from .transition_triton import transition_triton

    params = _params(prediction_type, alpha_bar_t, alpha_bar_next, renoise, clamp_x0)
    return transition_triton(sample, model_output, (height, width), params, noise=noise, seed=seed)


def _fake_impl(sample, model_output, noise, height, width, prediction_type, alpha_bar_t, alpha_bar_next,
               renoise, clamp_x0, seed):
    params = _params(prediction_type, alpha_bar_t, alpha_bar_next, renoise, clamp_x0)
    check_inputs(sample, model_output, (height, width), params, noise, seed)
    return sample.new_empty((sample.shape[0], sample.shape[1], height, width))


def _op(sample: torch.Tensor, model_output: torch.Tensor, noise: Optional[torch.Tensor], height: int, width: int,
        prediction_type: str, alpha_bar_t: float, alpha_bar_next: float, renoise: str, clamp_x0: float,
        seed: Optional[int]) -> torch.Tensor:
    return _reference_impl(sample, model_output, noise, height, width, prediction_type, alpha_bar_t,
                           alpha_bar_next, renoise, clamp_x0, seed)


@functools.cache
def ensure_registered() -> None:
    """Register `postdiff::resolution_transition` once per process (idempotent)."""
    try:
        torch.ops.postdiff.resolution_transition  # registered already, e.g. by a reloaded copy of this module
        return
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op(OP_NAME, _op, mutates_args=())
    op.register_kernel("cuda", _cuda_impl)
    op.register_fake(_fake_impl)
