"""The denoising loop: text embeddings in, latents out, walking a plan over captured variants.

It follows StableDiffusionPipeline.__call__ step for step (scale_model_input, the CFG combination,
scheduler.step with the same extra arguments), so that with every feature off it reproduces diffusers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..capture import Bucket
from ..plan import Step
from .variants import VariantStore


@dataclass
class DenoiseRequest:
    latents: torch.Tensor                 # [B, C, h, w], already scaled by init_noise_sigma
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor           # [B, L, D]
    negative_prompt_embeds: torch.Tensor | None
    guidance_scale: float
    guidance_rescale: float = 0.0
    extra_step_kwargs: dict | None = None


def denoise(store: VariantStore, scheduler, plan: list[Step], req: DenoiseRequest,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    latents = req.latents
    embeds = req.prompt_embeds.to(latents.dtype)
    if any(step.cfg for step in plan):
        if req.negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance needs negative_prompt_embeds")
        cfg_embeds = torch.cat([req.negative_prompt_embeds.to(latents.dtype), embeds])
    kwargs = req.extra_step_kwargs or {}
    for step, t in zip(plan, req.timesteps):
        model_input = torch.cat([latents] * 2) if step.cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        context = cfg_embeds if step.cfg else embeds
        bucket = Bucket(model_input.shape[0], model_input.shape[2], model_input.shape[3], context.shape[1],
                        model_input.dtype)
        variant = store.get(step.variant, bucket)
        timestep = t.to(torch.float32).expand(model_input.shape[0])
        noise_pred = variant(model_input, timestep, context)
        if step.cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + req.guidance_scale * (text - uncond)
            if req.guidance_rescale > 0:
                noise_pred = rescale_noise_cfg(noise_pred, text, req.guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step(step.index)
    return latents
