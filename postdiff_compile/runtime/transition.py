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
from ..kernels.transition_ref import PREDICTION_TYPES
from ..passes.cross_attn import CACHE as CROSS_ATTN
from ..resolution import resize_tokens

# Stateless schedulers: nothing to restart. Every other scheduler must take set_begin_index, so that its
# step counter lands on the switch step after its history (DPM-Solver++'s model outputs, ...) is cleared by
# set_timesteps. PNDM has neither: its PLMS warm-up repeats the first timestep and cannot start mid-schedule.
_STATELESS = ("DDIMScheduler", "DDPMScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler")


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
    """Refuse schedulers the transition's equations do not describe, with what to use instead."""
    name = type(scheduler).__name__
    config = scheduler.config
    instead = ("; set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) (or DPM-Solver++, Euler, "
               "UniPC), or turn mixed resolution off with low_res_fraction=0")
    if not any(cls.__name__ in _STATELESS for cls in type(scheduler).__mro__) and \
            not hasattr(scheduler, "set_begin_index"):
        raise PostDiffError(f"mixed resolution restarts the scheduler at the switch step, and {name} cannot start "
                            f"mid-schedule (no set_begin_index){instead}")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise PostDiffError(f"mixed resolution needs the scheduler's alphas_cumprod; {name} has none{instead}")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES or config.get("use_flow_sigmas"):
        raise PostDiffError(f"mixed resolution re-noises on the diffusion (not flow-matching) path; {name} is "
                            f"configured for {config.get('prediction_type')!r}"
                            f"{' with flow sigmas' if config.get('use_flow_sigmas') else ''}{instead}")


def sigma_space(scheduler: Any) -> bool:
    """Whether the scheduler's latent is x0 + sigma * noise (Euler and the other k-diffusion schedulers)
    rather than x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0


def alpha_bars(scheduler: Any, timesteps: torch.Tensor, step: int) -> tuple[float, float]:
    """abar at step `step` (the last low-resolution one) and at step `step + 1`.

    A scheduler with its own sigma table (Euler, DPM-Solver++, UniPC, ...) is asked for its noise level,
    sigma_i = sqrt((1 - abar) / abar), so Karras, exponential or beta sigmas give the level the scheduler
    really uses (their timesteps are rounded); the others (DDIM, DDPM, LCM) index alphas_cumprod.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(timesteps) + 1:
        return tuple(float(1 / (1 + sigmas[i].double() ** 2)) for i in (step, step + 1))
    return tuple(float(scheduler.alphas_cumprod[int(timesteps[i])]) for i in (step, step + 1))


def switch_resolution(scheduler: Any, switch: Switch, latents: torch.Tensor, model_output: torch.Tensor,
                      timesteps: torch.Tensor, caches: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full-resolution latent for step `switch.step` from the guided output of step `switch.step - 1`.

    `caches` is updated in place: cross-attention entries are resized, DeepCache features (which the
    plan never reads across the switch) are dropped.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from ..kernels.transition_op import resolution_transition
    from ..kernels.transition_ref import TransitionParams

    abar, abar_next = alpha_bars(scheduler, timesteps, switch.step - 1)
    params = TransitionParams(switch.prediction_type, abar, abar_next, switch.renoise, switch.clamp_x0)
    # In sigma space x = x_t / sqrt(abar): the same equations on x_t, scaled back at the next level.
    to_vp, from_vp = (abar ** 0.5, abar_next ** -0.5) if sigma_space(scheduler) else (1.0, 1.0)
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
    sample = latents * to_vp if to_vp != 1.0 else latents
    full = resolution_transition(sample, model_output.to(latents.dtype), switch.size, params, noise=noise, seed=seed)
    if from_vp != 1.0:
        full = full * from_vp
    for name in list(caches):
        if name.startswith(CROSS_ATTN + ":"):
            caches[name] = resize_tokens(caches[name], low, switch.size)
        else:
            del caches[name]
    if switch.restart_scheduler is not None:
        switch.restart_scheduler(switch.step)
    return full
