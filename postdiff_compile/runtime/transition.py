"""The transition from low to full resolution, between two variant calls.

The equations are in kernels/transition_ref.py; this module feeds them from the scheduler (its noise levels at
the last low-resolution timestep and the next one, schedulers.py), draws the fresh noise reproducibly and
resizes the cross-attention cache. The denoising loop restarts the scheduler afterwards.
"""
from __future__ import annotations

from typing import Any

import torch

from ..caches import CROSS_ATTN
from ..plan import Transition
from ..resolution import resize_tokens
from ..schedulers import sigma_space, transition_levels


def apply_transition(scheduler: Any, transition: Transition, latents: torch.Tensor, model_output: torch.Tensor,
                     timesteps: torch.Tensor, caches: dict[str, torch.Tensor], generator: Any = None) -> torch.Tensor:
    """The full-resolution latent for step L = `transition.switch_step` from the guided output of step L - 1.

    `generator` (a torch.Generator, a list of them, one per image, or None) draws the fresh noise.

    `caches` is updated in place: attn2 outputs are resized, the text-stream entries of SD3's cross-attention
    cache kept, DeepCache features and attention broadcasts (which the plan never reads across the switch) dropped.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from ..kernels.transition_op import resolution_transition
    from ..kernels.transition_ref import TransitionParams

    level, level_next = transition_levels(scheduler, timesteps, transition.switch_step - 1)
    params = TransitionParams(transition.prediction_type, level, level_next, transition.renoise, transition.clamp_x0)
    # In sigma space x = x_t / sqrt(abar): the same equations on x_t, scaled back at the next level. Flow-matching
    # schedulers have no init_noise_sigma, so they are not in sigma space: their levels are the flow sigmas.
    to_vp, from_vp = (level ** 0.5, level_next ** -0.5) if sigma_space(scheduler) else (1.0, 1.0)
    shape = (latents.shape[0], latents.shape[1], *transition.full_latent)
    noise = seed = None
    if transition.renoise == "fresh":
        if generator is None and latents.is_cuda:
            # No generator to reproduce: the kernel draws the noise itself (Philox) from a seed taken from the
            # global generator, instead of a separate randn launch and a full-size noise tensor.
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        else:
            # The draw diffusers' prepare_latents makes, for the full-resolution shape.
            noise = randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    low = (latents.shape[2], latents.shape[3])
    sample = latents * to_vp if to_vp != 1.0 else latents
    full = resolution_transition(sample, model_output.to(latents.dtype), transition.full_latent, params, noise=noise, seed=seed)
    if from_vp != 1.0:
        full = full * from_vp
    for name in list(caches):
        if name.startswith(CROSS_ATTN + ":") and name.endswith(".attn2"):
            caches[name] = resize_tokens(caches[name], low, transition.full_latent)
        elif not name.startswith(CROSS_ATTN + ":"):
            del caches[name]
        # other cross-attention entries (SD3's text keys and values, the pooled text embedding) have no image
        # tokens: the same at every resolution, kept as they are
    return full
