"""The mixed-resolution transition as one fused Triton kernel (reference: transition_ref.py).

One pass over the output: each program takes a block of output elements, finds their 4 bilinear source
taps, reads sample and model_output there (the low-resolution inputs are a quarter of the output or
more, so the repeated tap reads mostly hit cache), predicts x0 (and eps) per tap, blends, adds the noise
and writes once. Minimum traffic: 2 * B*C*h*w reads + B*C*H*W noise reads ("fresh" from a tensor) +
B*C*H*W writes; the seeded and "predicted" modes read no noise.

On CPU this runs only under TRITON_INTERPRET=1 (set before this module is imported).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..errors import PostDiffError
from .transition_ref import PREDICTION_TYPES, TransitionParams, check_inputs

# Noise sources (constexpr codes).
NOISE_TENSOR, NOISE_SEED, NOISE_PREDICTED = 0, 1, 2
_BLOCK = 1024
_INT32_MAX = 2**31 - 1


@triton.jit
def _x0_eps(sample_ptr, model_ptr, idx, mask, sqrt_a, sqrt_1ma, clamp,
            PRED: tl.constexpr, CLAMP: tl.constexpr, NEED_EPS: tl.constexpr):
    """x0 (clamped) and eps (from the unclamped x0) at one bilinear tap, in float32."""
    x = tl.load(sample_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(model_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:  # epsilon
        x0 = (x - sqrt_1ma * m) / sqrt_a
        eps = m
    elif PRED == 1:  # v_prediction
        x0 = sqrt_a * x - sqrt_1ma * m
        eps = sqrt_a * m + sqrt_1ma * x
    elif PRED == 3:  # flow: m is the velocity noise - x0; sqrt_a, sqrt_1ma hold 1 - sigma, sigma
        x0 = x - sqrt_1ma * m
        eps = x + sqrt_a * m
    else:  # sample
        x0 = m
        eps = x0
        if NEED_EPS:  # masked lanes read 0 and sqrt_1ma > 0: no division by zero anywhere
            eps = (x - sqrt_a * x0) / sqrt_1ma
    if CLAMP:
        x0 = tl.minimum(tl.maximum(x0, -clamp), clamp)
    return x0, eps


@triton.jit
def _source_index(o, scale, n_in):
    """F.interpolate(bilinear, align_corners=False) along one axis: taps i0, i1 and the weight of i1."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # truncation is floor: src >= 0
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, lam


# A new seed per image must not mean a new compile (Triton specialises ints on divisibility by 16).
@triton.jit(do_not_specialize=["seed"])
def _transition_kernel(sample_ptr, model_ptr, noise_ptr, out_ptr, seed, n_out, h, w, H, W, scale_h, scale_w,
                       sqrt_a, sqrt_1ma, sqrt_an, sqrt_1man, clamp,
                       PRED: tl.constexpr, NOISE: tl.constexpr, CLAMP: tl.constexpr, INT64: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # linear index into the contiguous [B, C, H, W] output
    mask = offs < n_out
    ox = offs % W
    oy = (offs // W) % H
    base = (offs // (H * W)) * (h * w)  # start of this (b, c) plane in the low-resolution inputs

    y0, y1, ly = _source_index(oy, scale_h, h)
    x0i, x1i, lx = _source_index(ox, scale_w, w)
    NEED_EPS: tl.constexpr = NOISE == 2
    a00, e00 = _x0_eps(sample_ptr, model_ptr, base + y0 * w + x0i, mask, sqrt_a, sqrt_1ma, clamp, PRED, CLAMP, NEED_EPS)
    a01, e01 = _x0_eps(sample_ptr, model_ptr, base + y0 * w + x1i, mask, sqrt_a, sqrt_1ma, clamp, PRED, CLAMP, NEED_EPS)
    a10, e10 = _x0_eps(sample_ptr, model_ptr, base + y1 * w + x0i, mask, sqrt_a, sqrt_1ma, clamp, PRED, CLAMP, NEED_EPS)
    a11, e11 = _x0_eps(sample_ptr, model_ptr, base + y1 * w + x1i, mask, sqrt_a, sqrt_1ma, clamp, PRED, CLAMP, NEED_EPS)
    # Same weights and order as ATen's kernels: rows first, then the two rows.
    x0_up = (1.0 - ly) * ((1.0 - lx) * a00 + lx * a01) + ly * ((1.0 - lx) * a10 + lx * a11)

    if NOISE == 0:
        noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 1:
        noise = tl.randn(seed, offs)
    else:
        noise = (1.0 - ly) * ((1.0 - lx) * e00 + lx * e01) + ly * ((1.0 - lx) * e10 + lx * e11)
    out = sqrt_an * x0_up + sqrt_1man * noise
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _philox_normal_kernel(out_ptr, seed, n, INT64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.randn(seed, offs).to(out_ptr.dtype.element_ty), mask=offs < n)


def _ratio(n_in: int, n_out: int) -> float:
    # ATen's scale: float(input_size) / output_size, divided in float32 (correctly rounded).
    return (torch.tensor(n_in, dtype=torch.float32) / n_out).item()


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def transition_triton(sample: torch.Tensor, model_output: torch.Tensor, size: tuple[int, int],
                      params: TransitionParams, noise: torch.Tensor | None = None,
                      seed: int | None = None) -> torch.Tensor:
    """The fused transition. "fresh" takes exactly one of `noise` (a [B, C, H, W] tensor) and `seed`
    (Philox noise, see `philox_normal`); "predicted" takes neither."""
    H, W = check_inputs(sample, model_output, size, params, noise, seed)
    B, C, h, w = sample.shape
    sample, model_output = sample.contiguous(), model_output.contiguous()
    out = torch.empty((B, C, H, W), dtype=sample.dtype, device=sample.device)
    n_out = out.numel()
    if n_out == 0:
        return out
    if params.renoise == "predicted":
        mode, noise_arg = NOISE_PREDICTED, out  # never read
    elif seed is not None:
        mode, noise_arg = NOISE_SEED, out
    else:
        mode, noise_arg = NOISE_TENSOR, noise.contiguous()
    coef_t, noise_t, coef_next, noise_next = params.coefficients()
    with _device_guard(out.device):
        _transition_kernel[(triton.cdiv(n_out, _BLOCK),)](
            sample, model_output, noise_arg, out, 0 if seed is None else seed,
            n_out, h, w, H, W, _ratio(h, H), _ratio(w, W),
            # Python floats arrive as fp32, rounded as ATen rounds a scalar operand of a float32 op.
            coef_t, noise_t, coef_next, noise_next, params.clamp_x0,
            PRED=PREDICTION_TYPES.index(params.prediction_type), NOISE=mode, CLAMP=params.clamp_x0 > 0,
            INT64=max(n_out, sample.numel()) + _BLOCK > _INT32_MAX, BLOCK=_BLOCK)
    return out


def philox_normal(shape, seed: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise as `transition_triton(seed=seed)` draws it for an output of `shape`:
    element i of the contiguous tensor is tl.randn(seed, i)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise PostDiffError(f"seed must be an int in [0, 2**63), got {seed!r}")
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    n = out.numel()
    if n:
        with _device_guard(out.device):
            _philox_normal_kernel[(triton.cdiv(n, _BLOCK),)](out, seed, n, INT64=n + _BLOCK > _INT32_MAX,
                                                             BLOCK=_BLOCK)
    return out
