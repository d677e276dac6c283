"""What the flow-matching pipelines (StableDiffusion3Pipeline, FluxPipeline) do before and after their loop,
done as they do it (pipeline_inputs.py has the others and the rules).

FLUX: the pipeline packs the latent into 2x2-patch tokens and steps the scheduler on them; here the loop keeps
the [B, C, H, W] latent (the capture packs inside the graph, the scheduler step is elementwise), draws the noise
unpacked as the pipeline does before packing, and packs only what `output_type="latent"` returns. Its rotary
positions (txt_ids, img_ids) are inputs shared by the batch, made per latent size: at low resolution, the low
grid's own positions (docs/method.md, "Flow matching"). The timestep schedule is the pipeline's: sigmas
linspace(1, 1/N, N) shifted by mu from the *final* image's sequence length, at every step, low-resolution ones
included, so that the full-resolution steps run at the baseline's sigmas.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..capture import flux_position_ids, pack_latent, unpack_latent
from ..errors import PostDiffError
from ..schedulers import shift_mu
from .call_inputs import Conditioning, batch_size as _batch


def _decode(pipe, latents: torch.Tensor, output_type: str) -> Any:
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def prepare_sd3(pipe, a) -> Conditioning:
    """StableDiffusion3Pipeline: joint CLIP+T5 embeddings, pooled CLIP embeddings as an input, CFG as a batch."""
    if a.skip_guidance_layers is not None:
        raise PostDiffError("the postdiff runtime does not support skip_guidance_layers (skip-layer guidance runs a "
                            "third denoiser call on some steps); restore(pipe) for it")
    height = a.height or pipe.default_sample_size * pipe.vae_scale_factor
    width = a.width or pipe.default_sample_size * pipe.vae_scale_factor
    cfg = a.guidance_scale > 1
    batch = _batch(a.prompt, a.prompt_embeds)
    if a.prompt_embeds is not None and a.pooled_prompt_embeds is None:
        raise PostDiffError("pass pooled_prompt_embeds with prompt_embeds (SD3 conditions on the pooled CLIP "
                            "embeddings)")
    device = pipe._execution_device
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=a.prompt, prompt_2=a.prompt_2, prompt_3=a.prompt_3, negative_prompt=a.negative_prompt,
        negative_prompt_2=a.negative_prompt_2, negative_prompt_3=a.negative_prompt_3,
        do_classifier_free_guidance=cfg, prompt_embeds=a.prompt_embeds, negative_prompt_embeds=a.negative_prompt_embeds,
        pooled_prompt_embeds=a.pooled_prompt_embeds, negative_pooled_prompt_embeds=a.negative_pooled_prompt_embeds,
        device=device, clip_skip=a.clip_skip, num_images_per_prompt=a.num_images_per_prompt,
        max_sequence_length=a.max_sequence_length)
    timestep_kwargs = {}
    if pipe.scheduler.config.get("use_dynamic_shifting"):   # SD3.5 configs that shift by resolution
        patch = pipe.transformer.config.patch_size
        tokens = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
        timestep_kwargs["mu"] = a.mu if a.mu is not None else shift_mu(pipe.scheduler.config, tokens)
    n = batch * a.num_images_per_prompt
    added = {"pooled_projections": pooled}
    negative_added = {"pooled_projections": negative_pooled if cfg else pooled}

    def finish(latents: torch.Tensor):
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

        image = latents if a.output_type == "latent" else _decode(pipe, latents, a.output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=image) if a.return_dict else (image,)

    return Conditioning(n, height, width, cfg, embeds, negative, added, negative_added, timestep_kwargs,
                        finish=finish, step_kwargs={})


def prepare_flux(pipe, a) -> Conditioning:
    """FluxPipeline: no CFG batch (dev takes the guidance scale as an input, schnell nothing), T5 embeddings with
    rotary positions, pooled CLIP embeddings; timesteps from sigmas shifted by the final image's size."""
    if a.true_cfg_scale > 1 and (a.negative_prompt is not None or a.negative_prompt_embeds is not None):
        raise PostDiffError("the postdiff runtime does not support true_cfg_scale > 1 with a negative prompt (two "
                            "denoiser calls per step); restore(pipe) for it")
    scale = pipe.vae_scale_factor
    height = a.height or pipe.default_sample_size * scale
    width = a.width or pipe.default_sample_size * scale
    if a.prompt_embeds is not None and a.pooled_prompt_embeds is None:
        raise PostDiffError("pass pooled_prompt_embeds with prompt_embeds (FLUX conditions on the pooled CLIP "
                            "embeddings)")
    batch = _batch(a.prompt, a.prompt_embeds)
    device = pipe._execution_device
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=a.prompt, prompt_2=a.prompt_2, prompt_embeds=a.prompt_embeds, pooled_prompt_embeds=a.pooled_prompt_embeds,
        device=device, num_images_per_prompt=a.num_images_per_prompt, max_sequence_length=a.max_sequence_length)
    n = batch * a.num_images_per_prompt
    latent_h, latent_w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    if a.sigmas is None:
        a.sigmas = np.linspace(1.0, 1 / a.num_inference_steps, a.num_inference_steps)
    if pipe.scheduler.config.get("use_flow_sigmas"):
        a.sigmas = None
    timestep_kwargs = {"mu": shift_mu(pipe.scheduler.config, (latent_h // 2) * (latent_w // 2))}
    added = {"pooled_projections": pooled}
    if pipe.transformer.config.guidance_embeds:
        added["guidance"] = torch.full([1], a.guidance_scale, device=device, dtype=torch.float32).expand(n)
    dtype = embeds.dtype

    def shared_inputs(latent: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"txt_ids": text_ids, "img_ids": flux_position_ids(latent, dtype=dtype, device=device)}

    def prepare_latents(start: tuple[int, int], timesteps: torch.Tensor) -> torch.Tensor:
        if a.latents is not None:   # packed, as FluxPipeline takes them
            if a.latents.dim() != 3 or a.latents.shape[1] != (start[0] // 2) * (start[1] // 2):
                raise PostDiffError(f"the initial latents must be packed for a {start[0]}x{start[1]} latent: "
                                    f"[batch, {(start[0] // 2) * (start[1] // 2)}, 64]; got {tuple(a.latents.shape)}")
            return unpack_latent(a.latents.to(device, dtype), *start)
        packed, _ = pipe.prepare_latents(n, pipe.transformer.config.in_channels // 4, start[0] * scale,
                                         start[1] * scale, dtype, device, a.generator, None)
        return unpack_latent(packed, *start)

    def finish(latents: torch.Tensor):
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        image = pack_latent(latents) if a.output_type == "latent" else _decode(pipe, latents, a.output_type)
        pipe.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if a.return_dict else (image,)

    return Conditioning(n, latent_h * scale, latent_w * scale, False, embeds, None, added, dict(added), timestep_kwargs,
                        finish=finish, step_kwargs={}, shared_inputs=shared_inputs, prepare_latents=prepare_latents)
