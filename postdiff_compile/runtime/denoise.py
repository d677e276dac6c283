"""The denoising loop: text embeddings in, latents out, walking a plan over captured variants.

It follows StableDiffusionPipeline.__call__ step for step (scale_model_input, the CFG combination,
scheduler.step with the same extra arguments), so that with every feature off it reproduces diffusers.
Caches live in a dict local to one call: nothing a call writes can be read by the next one (the stale
state that DeepCacheSDHelper keeps across calls, peers.md 1.7).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..capture import Bucket
from ..caches import CROSS_ATTN
from ..plan import Plan
from ..schedulers import restart, set_begin, step_kwargs
from .transition import apply_transition


class VariantSource(Protocol):
    """Where the loop gets a step's graph: the in-memory VariantStore, or an artifact's files on a backend.
    What it returns is called with the inputs its `.inputs` names and returns what its `.outputs` names. Its
    outputs may be the same buffers at every call (onnxruntime's bound outputs, a CUDA graph's static ones): they
    hold until the same variant is called again, which the plan's rules make safe for the caches; the noise
    prediction is copied where a scheduler could keep it."""

    def get(self, name: str, bucket: Bucket, cache_branch: int = 0) -> Any: ...


@dataclass(kw_only=True)
class DenoiseRequest:
    latents: torch.Tensor                 # [B, C, h, w], already scaled by init_noise_sigma
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor           # [B, L, D]
    negative_prompt_embeds: torch.Tensor | None
    guidance_scale: float | torch.Tensor   # a tensor [B]: one scale per image (a server's batch of requests)
    guidance_rescale: float = 0.0
    extra_step_kwargs: dict | None = None
    added_cond: dict[str, torch.Tensor] | None = None           # SDXL text_embeds/time_ids, PixArt resolution/...
    negative_added_cond: dict[str, torch.Tensor] | None = None  # the same for the negative half
    latent_input: str = "sample"          # the denoiser's latent input name ("hidden_states" for PixArt)
    generator: Any = None                 # draws the transition's fresh noise (as the pipeline's own draws)
    restart_scheduler: Callable[[int], None] | None = None   # called with the switch step after the transition
    # Inputs shared by every image of the batch that depend on the step's latent size at most: FLUX's rotary
    # positions (txt_ids, img_ids), given the latent (h, w).
    shared_inputs: Callable[[tuple[int, int]], dict[str, torch.Tensor]] | None = None
    # diffusers' callback_on_step_end, (step index, timestep, latents) -> latents, and pipe.interrupt's reader: a
    # step that starts interrupted is skipped (step_callbacks.py)
    after_step: Callable[[int, Any, torch.Tensor], torch.Tensor] | None = None
    interrupted: Callable[[], bool] | None = None
    # Channels appended to the scaled latent input for a latent size, [B, k, h, w] (an inpainting U-Net's mask and
    # masked image latents); doubled on CFG steps
    extra_channels: Callable[[tuple[int, int]], torch.Tensor] | None = None
    # The ControlNet residuals of a step, (index, steps, cfg, scaled latent input, t, context, added conditioning)
    # -> inputs by name
    residuals: Callable[..., dict[str, torch.Tensor]] | None = None


def per_image(guidance_scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scale per image broadcast over the rest of `like`'s dimensions, in its dtype; a float as it is."""
    if not isinstance(guidance_scale, torch.Tensor):
        return guidance_scale
    return guidance_scale.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


def reduce_cross_attn(value: torch.Tensor, mode: str, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """One attn2 output of a CFG batch -> the cached tensor for the batch-1 steps that follow."""
    uncond, cond = value.chunk(2)
    guidance_scale = per_image(guidance_scale, cond)
    if mode == "cond":
        return cond
    if mode == "ave":
        return (uncond + cond) / 2          # T-GATE's average, written as it writes it
    if mode == "cfg":
        return uncond + guidance_scale * (cond - uncond)
    raise ValueError(f"unknown cross-attention cache mode {mode!r}")


def guided(noise_pred: torch.Tensor, cfg: bool, req: DenoiseRequest, channels: int) -> torch.Tensor:
    """A step's denoiser output -> the prediction the scheduler steps with: CFG combined (and rescaled), the mean
    of a learned-variance output."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    if cfg:
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + per_image(req.guidance_scale, text) * (text - uncond)
        if req.guidance_rescale > 0:
            noise_pred = rescale_noise_cfg(noise_pred, text, req.guidance_rescale)
    else:
        noise_pred = noise_pred.clone()   # a reused output buffer; multistep schedulers (PNDM) keep it
    if noise_pred.shape[1] == 2 * channels:
        noise_pred = noise_pred.chunk(2, dim=1)[0]   # learned variance (PixArt): the pipeline keeps the mean
    return noise_pred


def denoise(store: VariantSource, scheduler, plan: Plan, req: DenoiseRequest,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    latents = req.latents
    embeds = req.prompt_embeds.to(latents.dtype)
    negative = embeds
    if any(step.cfg for step in plan):
        if req.negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance needs negative_prompt_embeds")
        negative = req.negative_prompt_embeds.to(latents.dtype)
        cfg_embeds = torch.cat([negative, embeds])
    if any(CROSS_ATTN in step.writes and step.cfg for step in plan) and \
            plan.cross_attn_reduce not in ("cond", "ave", "cfg"):
        raise ValueError(f"the plan writes the cross-attention cache from a CFG batch, but its reduce mode "
                         f"{plan.cross_attn_reduce!r} does not say how (cond, ave or cfg)")
    added = {k: v.to(latents.dtype) for k, v in (req.added_cond or {}).items()}
    negative_added = {k: v.to(latents.dtype) for k, v in (req.negative_added_cond or req.added_cond or {}).items()}
    cfg_added = {k: torch.cat([negative_added[k], added[k]]) for k in added}
    kwargs = req.extra_step_kwargs or {}
    caches: dict[str, torch.Tensor] = {}
    last_low = plan.switch_step - 1 if plan.transition is not None else None
    # The timestep inputs on the device in one copy: on a GPU a per-step host-to-device copy waits for the queue.
    timestep_inputs = req.timesteps.to(latents.device, torch.float32)
    shared: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for step, t, t_input in zip(plan, req.timesteps, timestep_inputs):
        if req.interrupted is not None and req.interrupted():
            continue
        model_input = torch.cat([latents] * 2) if step.cfg else latents
        if hasattr(scheduler, "scale_model_input"):   # flow-matching schedulers scale nothing and have none
            model_input = scheduler.scale_model_input(model_input, t)
        size = (model_input.shape[2], model_input.shape[3])
        if req.extra_channels is not None:
            extra = req.extra_channels(size)
            model_input = torch.cat([model_input, torch.cat([extra] * 2) if step.cfg else extra], dim=1)
        if step.cfg:
            context, cond = cfg_embeds, cfg_added
        elif CROSS_ATTN in step.reads:
            context, cond = negative, negative_added   # as T-GATE after its gate step; every attn2 reads the cache
        else:
            context, cond = embeds, added
        bucket = Bucket(model_input.shape[0], model_input.shape[2], model_input.shape[3], context.shape[1],
                        model_input.dtype)
        variant = store.get(step.variant, bucket, plan.cache_branch)
        timestep = t_input.expand(model_input.shape[0])
        if req.shared_inputs is not None and size not in shared:
            shared[size] = req.shared_inputs(size)
        values = {req.latent_input: model_input, "timestep": timestep, "encoder_hidden_states": context, **cond,
                  **shared.get(size, {}), **caches}
        if req.residuals is not None:
            values.update(req.residuals(step.index, len(plan), step.cfg, model_input, t, context, cond))
        missing = [name for name in variant.inputs if name not in values]
        if missing:
            raise ValueError(f"step {step.index} ({step.variant}) needs input(s) {', '.join(missing)}")
        noise_pred, *written = variant(*(values[name] for name in variant.inputs))
        for name, value in zip(variant.outputs[1:], written):
            if name.partition(":")[0] not in step.writes:
                continue   # a variant serving several steps returns every cache any of them writes (variant_build.py)
            if name.startswith(CROSS_ATTN + ":") and step.cfg:
                value = reduce_cross_attn(value, plan.cross_attn_reduce, req.guidance_scale)
            caches[name] = value
        noise_pred = guided(noise_pred, step.cfg, req, latents.shape[1])
        if step.index == last_low:
            # The transition replaces this step's scheduler update: x0 from this output, re-noised to the
            # next timestep at full resolution.
            latents = apply_transition(scheduler, plan.transition, latents, noise_pred, req.timesteps, caches,
                                       req.generator)
            if req.restart_scheduler is not None:
                req.restart_scheduler(plan.switch_step)
        else:
            latents = scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]
        if req.after_step is not None:
            latents = req.after_step(step.index, t, latents)
        if on_step is not None:
            on_step(step.index)
    return latents


def sample(variants: VariantSource, scheduler, plan: Plan, steps: int, *, channels: int, full_latent: tuple[int, int],
           device: torch.device, dtype: torch.dtype, generator, latent_input: str,
           on_step: Callable[[int], None] | None = None, timestep_kwargs: dict | None = None,
           **conditioning) -> torch.Tensor:
    """One image (or one per generator of a list): the initial latent drawn as diffusers' prepare_latents draws it
    for the plan's first latent size, then the plan walked. `timestep_kwargs` are set_timesteps' other arguments
    (FLUX's sigmas and mu); `conditioning` holds DenoiseRequest's embeddings, guidance, added and shared inputs."""
    from diffusers.utils.torch_utils import randn_tensor

    timestep_device = set_schedule(scheduler, steps, device, timestep_kwargs)
    start = plan.transition.low_latent if plan.transition else full_latent
    images = len(generator) if isinstance(generator, list) else 1
    latents = randn_tensor((images, channels, *start), generator=generator, device=device, dtype=dtype) \
        * getattr(scheduler, "init_noise_sigma", 1.0)
    return walk(variants, scheduler, plan, steps, latents, generator=generator, latent_input=latent_input,
                timestep_device=timestep_device, timestep_kwargs=timestep_kwargs, on_step=on_step, **conditioning)


def set_schedule(scheduler, steps: int, device: torch.device, timestep_kwargs: dict | None = None) -> torch.device:
    """set_timesteps for `steps`; returns the device the timesteps are on."""
    # On a GPU the scheduler's timesteps stay on the host: its table lookups then read host memory instead of
    # copying a device scalar back at every step (a synchronisation). The denoiser's copy goes over once (denoise).
    timestep_device = torch.device("cpu") if device.type == "cuda" else device
    scheduler.set_timesteps(steps, device=timestep_device, **(timestep_kwargs or {}))
    return timestep_device


def walk(variants: VariantSource, scheduler, plan: Plan, steps: int, latents: torch.Tensor, *, generator,
         latent_input: str, timestep_device: torch.device, timestep_kwargs: dict | None = None, start: int = 0,
         on_step: Callable[[int], None] | None = None, **conditioning) -> torch.Tensor:
    """`plan` walked from `latents` over the scheduler's timesteps from step `start` of its `steps` (a window:
    plan.build_plan), after set_schedule; a restart at the switch comes back to the same window."""
    if start:
        set_begin(scheduler, start)
    request = DenoiseRequest(latents=latents, timesteps=scheduler.timesteps[start:start + len(plan)],
                             latent_input=latent_input, extra_step_kwargs=step_kwargs(scheduler, generator),
                             generator=generator,
                             restart_scheduler=lambda begin: restart(scheduler, steps, start + begin, timestep_device,
                                                                     timestep_kwargs or {}),
                             **conditioning)
    return denoise(variants, scheduler, plan, request, on_step=on_step)
