"""The mixed-resolution transition, as plain torch: the equations the fused kernel must reproduce.

At the switch from low to full resolution, the (guided) model output of the last low-resolution step at
timestep t gives a prediction of x0; x0 is upsampled bilinearly to the full latent size and re-noised to
t', the first full-resolution timestep (PostDiff, arXiv 2508.06160, Sec. 3.2):

    x_t' = sqrt(abar_t') * up(x0) + sqrt(1 - abar_t') * noise

with noise either fresh ("fresh": a given [B, C, H, W] tensor) or the noise the model predicted,
upsampled the same way ("predicted"). `up` is F.interpolate(mode="bilinear", align_corners=False).
All arithmetic is float32; the result has the input dtype.

Flow matching (prediction type "flow": SD3, FLUX) has x_sigma = (1 - sigma) x0 + sigma noise and a model that
predicts the velocity v = noise - x0. Then x0 = x - sigma v, noise = x + (1 - sigma) v, and the re-noised latent
is x_sigma' = (1 - sigma') up(x0) + sigma' noise. Both cases are one computation on the coefficients of
x = a x0 + b noise: (sqrt(abar), sqrt(1 - abar)) on the diffusion path, (1 - sigma, sigma) on the flow path
(`TransitionParams.coefficients`).

Bytes: the fused transition must read sample and model_output once at low resolution (2 * B*C*h*w
elements), read the noise at full resolution ("fresh" only, B*C*H*W) and write the output (B*C*H*W).
This eager version moves several times that: each line below is its own pass over memory, plus upcasts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RENOISE_MODES
from ..errors import PostDiffError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TransitionParams:
    """What the transition needs to know about the scheduler and the model.

    alpha_bar_t: scheduler.alphas_cumprod at t, the last low-resolution timestep, in (0, 1).
    alpha_bar_next: at t', the first full-resolution timestep, in (0, 1].
    For prediction_type "flow" these two hold the flow noise levels instead, sigma_t in (0, 1] and sigma_next in
    [0, sigma_t) (make them with `TransitionParams.flow`; the op and the manifest name them sigma there).
    clamp_x0: > 0 clamps x0 to [-clamp_x0, clamp_x0] before the upsample; 0 is off. The predicted noise
    is always taken from the unclamped prediction (clamping x0 must not leak into eps).
    """

    prediction_type: str
    alpha_bar_t: float
    alpha_bar_next: float
    renoise: str = "fresh"
    clamp_x0: float = 0.0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise PostDiffError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.renoise not in RENOISE_MODES:
            raise PostDiffError(f"renoise {self.renoise!r} is not one of {RENOISE_MODES}")
        if self.prediction_type == "flow":
            # x0 = x - sigma v and noise = x + (1 - sigma) v divide by nothing: sigma_t = 1 (pure noise) is fine.
            if not 0.0 < self.alpha_bar_t <= 1.0:
                raise PostDiffError(f"sigma_t must be in (0, 1], got {self.alpha_bar_t}")
            if not 0.0 <= self.alpha_bar_next < self.alpha_bar_t:
                raise PostDiffError(f"sigma_next must be in [0, sigma_t), got {self.alpha_bar_next}")
        # Both ends excluded: x0 from epsilon divides by sqrt(abar), eps from x0 by sqrt(1 - abar).
        elif not 0.0 < self.alpha_bar_t < 1.0:
            raise PostDiffError(f"alpha_bar_t must be in (0, 1), got {self.alpha_bar_t}")
        elif not 0.0 < self.alpha_bar_next <= 1.0:
            raise PostDiffError(f"alpha_bar_next must be in (0, 1], got {self.alpha_bar_next}")
        if not self.clamp_x0 >= 0.0 or math.isinf(self.clamp_x0):  # `not >=` also catches NaN
            raise PostDiffError(f"clamp_x0 must be a finite number >= 0 (0 = off), got {self.clamp_x0}")

    @classmethod
    def flow(cls, sigma_t: float, sigma_next: float, renoise: str = "fresh", clamp_x0: float = 0.0) -> TransitionParams:
        """The flow-matching transition from noise level sigma_t to sigma_next."""
        return cls("flow", sigma_t, sigma_next, renoise, clamp_x0)

    def coefficients(self) -> tuple[float, float, float, float]:
        """(a_t, b_t, a_next, b_next) of x = a x0 + b noise at the two levels."""
        if self.prediction_type == "flow":
            s, sn = self.alpha_bar_t, self.alpha_bar_next
            return 1.0 - s, s, 1.0 - sn, sn
        a, an = self.alpha_bar_t, self.alpha_bar_next
        return math.sqrt(a), math.sqrt(1 - a), math.sqrt(an), math.sqrt(1 - an)


def check_inputs(sample: torch.Tensor, model_output: torch.Tensor, size, params: TransitionParams,
                 noise: torch.Tensor | None, seed: int | None = None) -> tuple[int, int]:
    """Raise PostDiffError (a ValueError) on inputs the transition cannot take; return (H, W).

    "fresh" takes exactly one of `noise` and `seed` (the fast paths draw noise from a seed; the reference
    takes a tensor only). Looks at shapes, dtypes and devices only, so it also runs on fake tensors.
    """
    if sample.dim() != 4:
        raise PostDiffError(f"sample must be 4-D [B, C, h, w], got shape {tuple(sample.shape)}")
    if model_output.shape != sample.shape:
        raise PostDiffError(f"model_output shape {tuple(model_output.shape)} differs from sample shape "
                            f"{tuple(sample.shape)} (pass the guided output, not the CFG batch)")
    if sample.dtype not in DTYPES:
        raise PostDiffError(f"sample dtype {sample.dtype} is not one of float32, float16, bfloat16")
    if model_output.dtype != sample.dtype:
        raise PostDiffError(f"model_output dtype {model_output.dtype} differs from sample dtype {sample.dtype}")
    if model_output.device != sample.device:
        raise PostDiffError(f"model_output is on {model_output.device}, sample on {sample.device}")
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(map(_positive_int, size)):
        raise PostDiffError(f"size must be two positive ints (H, W), got {size!r}")
    full = (sample.shape[0], sample.shape[1], size[0], size[1])
    if params.renoise == "predicted":
        if noise is not None or seed is not None:
            raise PostDiffError('renoise="predicted" takes no noise tensor and no seed (it upsamples the '
                                'predicted noise)')
    elif (noise is None) == (seed is None):
        raise PostDiffError('renoise="fresh" needs a noise tensor of shape [B, C, H, W]' if seed is None else
                            'renoise="fresh" takes a noise tensor or a seed, not both')
    elif seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise PostDiffError(f"seed must be an int in [0, 2**63), got {seed!r}")
    else:
        if tuple(noise.shape) != full:
            raise PostDiffError(f"noise shape {tuple(noise.shape)} is not the output shape {full}")
        if noise.dtype != sample.dtype:
            raise PostDiffError(f"noise dtype {noise.dtype} differs from sample dtype {sample.dtype}")
        if noise.device != sample.device:
            raise PostDiffError(f"noise is on {noise.device}, sample on {sample.device}")
    return size[0], size[1]


def _positive_int(s) -> bool:
    # Symbolic sizes (torch.export with dynamic shapes) are taken as they are.
    return isinstance(s, torch.SymInt) or (isinstance(s, int) and not isinstance(s, bool) and s > 0)


def predict_x0_and_noise(sample: torch.Tensor, model_output: torch.Tensor,
                         params: TransitionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) in float32 from the sample x_t and the model output at timestep t.

    x0 is clamped when params.clamp_x0 > 0; eps always comes from the unclamped prediction.
    """
    x, m = sample.float(), model_output.float()
    a = params.alpha_bar_t
    if params.prediction_type == "flow":   # m is the velocity noise - x0; a holds sigma_t
        x0 = x - a * m
        eps = x + (1 - a) * m
    elif params.prediction_type == "epsilon":
        x0 = (x - math.sqrt(1 - a) * m) / math.sqrt(a)
        eps = m
    elif params.prediction_type == "v_prediction":
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * m
        eps = math.sqrt(a) * m + math.sqrt(1 - a) * x
    else:  # "sample"
        x0 = m
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    if params.clamp_x0 > 0:
        x0 = x0.clamp(-params.clamp_x0, params.clamp_x0)
    return x0, eps


def transition_reference(sample: torch.Tensor, model_output: torch.Tensor, size: tuple[int, int],
                         params: TransitionParams, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t' at full resolution `size` = (H, W) from the last low-resolution step (module docstring)."""
    size = check_inputs(sample, model_output, size, params, noise)
    x0, eps = predict_x0_and_noise(sample, model_output, params)
    x0_up = F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
    if params.renoise == "predicted":
        noise = F.interpolate(eps, size=size, mode="bilinear", align_corners=False)
    _, _, a_next, b_next = params.coefficients()
    out = a_next * x0_up + b_next * noise.float()
    return out.to(sample.dtype)
