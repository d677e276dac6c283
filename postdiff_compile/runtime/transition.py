"""The switch from low to full resolution, between two variant calls.

The equations are in kernels/transition_ref.py; this module feeds them from the scheduler (alphas_cumprod
at the last low-resolution timestep and the next one), draws the fresh noise reproducibly, resizes the
cross-attention cache and restarts the scheduler's history at the switch step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PostDiffError
from ..passes.cross_attn import CACHE as CROSS_ATTN
from ..resolution import resize_tokens

# Stateless first-order schedulers: nothing to restart. Every other scheduler must take set_begin_index, so
# that its step counter lands on the switch step after its history (DPM-Solver++'s model outputs, ...) is
# cleared by set_timesteps.
_STATELESS = ("DDIMScheduler", "DDPMScheduler")


@dataclass
class Switch:
    """What the denoising loop needs to cross from low to full resolution after step `step - 1`."""
    step: int                               # L: the first full-resolution step
    size: tuple[int, int]                   # the full latent size
    prediction_type: str
    renoise: str = "fresh"
    clamp_x0: float = 0.0
    generator: Any = None                   # torch.Generator, a list of them (one per image), or None
    restart_scheduler: Callable[[int], None] | None = None   # called with L after the transition


def check_scheduler(scheduler: Any) -> None:
    """Refuse schedulers the transition's equations do not describe."""
    name = type(scheduler).__name__
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0 or not hasattr(scheduler, "alphas_cumprod"):
        raise PostDiffError(
            f"mixed resolution needs a scheduler whose latents are x_t = sqrt(abar) x0 + sqrt(1 - abar) noise "
            f"(DDIM, DDPM, DPM-Solver++, UniPC, LCM); {name} works in sigma space")
    if name not in _STATELESS and not hasattr(scheduler, "set_begin_index"):
        raise PostDiffError(f"mixed resolution restarts the scheduler at the switch step, and {name} has no "
                            "set_begin_index; use DDIM, DPM-Solver++, UniPC or LCM")


def switch_resolution(scheduler: Any, switch: Switch, latents: torch.Tensor, model_output: torch.Tensor,
                      t: torch.Tensor, t_next: torch.Tensor, caches: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full-resolution latent at `t_next` from the last low-resolution step's guided output at `t`.

    `caches` is updated in place: cross-attention entries are resized, DeepCache features (which the
    plan never reads across the switch) are dropped.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from ..kernels.transition_op import resolution_transition
    from ..kernels.transition_ref import TransitionParams

    abar = scheduler.alphas_cumprod
    params = TransitionParams(switch.prediction_type, float(abar[int(t)]), float(abar[int(t_next)]),
                              switch.renoise, switch.clamp_x0)
    shape = (latents.shape[0], latents.shape[1], *switch.size)
    noise = seed = None
    if switch.renoise == "fresh":
        if switch.generator is None and latents.is_cuda:
            # No generator to reproduce: the kernel draws the noise itself (Philox) from a seed taken from the
            # global generator, instead of a separate randn launch and a full-size noise tensor.
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        else:
            # The draw diffusers' prepare_latents makes, for the full-resolution shape.
            noise = randn_tensor(shape, generator=switch.generator, device=latents.device, dtype=latents.dtype)
    low = (latents.shape[2], latents.shape[3])
    full = resolution_transition(latents, model_output.to(latents.dtype), switch.size, params, noise=noise, seed=seed)
    for name in list(caches):
        if name.startswith(CROSS_ATTN + ":"):
            caches[name] = resize_tokens(caches[name], low, switch.size)
        else:
            del caches[name]
    if switch.restart_scheduler is not None:
        switch.restart_scheduler(switch.step)
    return full
