"""What each diffusers pipeline class does before and after its denoising loop, done as it does it.

`optimize(pipe)` replaces only the loop. Everything around it (prompt encoding, added conditioning,
timestep retrieval arguments, decoding and the output class) is what the pipeline's own `__call__` does,
one function per pipeline kind, so that with preset `none` the latents are diffusers' own. One known
exception: SDXL with several images per prompt *and* negative micro-conditioning of its own
(`negative_original_size`, ...): diffusers concatenates the negative and positive time ids before
repeating them per image, which pairs rows with the wrong half of the batch; here each half gets its own.

Added conditioning at low resolution: SDXL's `time_ids` (original size, crop, target size) and
PixArt-alpha's `resolution` / `aspect_ratio` keep the values of the requested full-size image at every
step, low-resolution steps included. The low-resolution steps lay out the final image, which the
transition then upsamples, so they are asked for the final image's framing; conditioning them on the
smaller size would change the conditioning halfway through the run, a jump the transition does not
model. The values are inputs of every variant, so a caller can pass others.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..errors import PostDiffError
from .call_inputs import Conditioning, PipelineKind, batch_size as _batch
from .conditioning import guidance_embedding
from .pipeline_controlnet import prepare_controlnet
from .pipeline_flow import prepare_flux, prepare_sd3
from .pipeline_img2img import prepare_img2img, prepare_sdxl_img2img, sdxl_img2img_time_ids
from .pipeline_inpaint import prepare_inpaint
from .schedule_windows import denoising_window


def _timestep_cond(pipe, guidance_scale: float, batch: int, dtype, device) -> dict[str, torch.Tensor]:
    dim = pipe.unet.config.time_cond_proj_dim
    return {} if dim is None else {"timestep_cond": guidance_embedding(guidance_scale, batch, dim, dtype, device)}


def _sd_finish(pipe, a, dtype) -> Callable[[torch.Tensor], Any]:
    def finish(latents: torch.Tensor):
        from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

        has_nsfw = None
        if a.output_type == "latent":
            image = latents
        else:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=a.generator)[0]
            image, has_nsfw = pipe.run_safety_checker(image, pipe._execution_device, dtype)
            denormalize = [True] * image.shape[0] if has_nsfw is None else [not x for x in has_nsfw]
            image = pipe.image_processor.postprocess(image, output_type=a.output_type, do_denormalize=denormalize)
        pipe.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw) if a.return_dict \
            else (image, has_nsfw)
    return finish


def prepare_sd(pipe, a) -> Conditioning:
    """StableDiffusionPipeline (SD1.x, SD2.x; LCM U-Nets too: the w-embedding replaces CFG, as diffusers does)."""
    unet = pipe.unet
    height = a.height or unet.config.sample_size * pipe.vae_scale_factor
    width = a.width or unet.config.sample_size * pipe.vae_scale_factor
    cfg = a.guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    batch = _batch(a.prompt, a.prompt_embeds)
    device = pipe._execution_device
    embeds, negative = pipe.encode_prompt(a.prompt, device, a.num_images_per_prompt, cfg, a.negative_prompt,
                                          prompt_embeds=a.prompt_embeds, negative_prompt_embeds=a.negative_prompt_embeds,
                                          clip_skip=a.clip_skip)
    n = batch * a.num_images_per_prompt
    added = _timestep_cond(pipe, a.guidance_scale, n, embeds.dtype, device)
    return Conditioning(n, height, width, cfg, embeds, negative, added, dict(added),
                        finish=_sd_finish(pipe, a, embeds.dtype))


def _prepare_lcm(pipe, a) -> Conditioning:
    """LatentConsistencyModelPipeline: one batch, the guidance scale as an input, LCM's own timesteps."""
    unet = pipe.unet
    height = a.height or unet.config.sample_size * pipe.vae_scale_factor
    width = a.width or unet.config.sample_size * pipe.vae_scale_factor
    batch = _batch(a.prompt, a.prompt_embeds)
    device = pipe._execution_device
    embeds, _ = pipe.encode_prompt(a.prompt, device, a.num_images_per_prompt, False, negative_prompt=None,
                                   prompt_embeds=a.prompt_embeds, clip_skip=a.clip_skip)
    n = batch * a.num_images_per_prompt
    added = _timestep_cond(pipe, a.guidance_scale, n, embeds.dtype, device)
    if not added:
        raise PostDiffError("LatentConsistencyModelPipeline needs a U-Net with a guidance embedding "
                            "(time_cond_proj_dim); this one has none")
    a.eta = None   # the LCM pipeline's prepare_extra_step_kwargs(generator, None)
    return Conditioning(n, height, width, False, embeds, None, added, dict(added),
                        {"original_inference_steps": a.original_inference_steps},
                        finish=_sd_finish(pipe, a, embeds.dtype))


def _sdxl_time_ids(pipe, a, size: tuple[int, int], n: int, dtype, projection: int):
    """StableDiffusionXLPipeline's time ids, [n, 6] each: (positive, negative); the negative ones are the positive
    ones unless both negative_original_size and negative_target_size are given."""
    def time_ids(original, crop, target):
        ids = pipe._get_add_time_ids(original or size, crop, target or size, dtype=dtype,
                                     text_encoder_projection_dim=projection)
        return ids.to(pipe._execution_device).repeat(n, 1)

    ids = time_ids(a.original_size, a.crops_coords_top_left, a.target_size)
    if a.negative_original_size is not None and a.negative_target_size is not None:
        return ids, time_ids(a.negative_original_size, a.negative_crops_coords_top_left, a.negative_target_size)
    return ids, ids


def prepare_sdxl(pipe, a, time_ids=_sdxl_time_ids) -> Conditioning:
    """StableDiffusionXLPipeline: pooled text embeddings and micro-conditioning time ids as added inputs;
    `denoising_end` (a base that hands over to a refiner) runs the first steps of the schedule's plan."""
    height = a.height or pipe.default_sample_size * pipe.vae_scale_factor
    width = a.width or pipe.default_sample_size * pipe.vae_scale_factor
    unet = pipe.unet
    cfg = a.guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    batch = _batch(a.prompt, a.prompt_embeds)
    if a.prompt_embeds is not None and a.pooled_prompt_embeds is None:
        raise PostDiffError("pass pooled_prompt_embeds with prompt_embeds (SDXL conditions on the pooled text "
                            "embedding of its second text encoder)")
    if cfg and a.negative_prompt_embeds is not None and a.negative_pooled_prompt_embeds is None:
        raise PostDiffError("pass negative_pooled_prompt_embeds with negative_prompt_embeds")
    device = pipe._execution_device
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=a.prompt, prompt_2=a.prompt_2, device=device, num_images_per_prompt=a.num_images_per_prompt,
        do_classifier_free_guidance=cfg, negative_prompt=a.negative_prompt, negative_prompt_2=a.negative_prompt_2,
        prompt_embeds=a.prompt_embeds, negative_prompt_embeds=a.negative_prompt_embeds,
        pooled_prompt_embeds=a.pooled_prompt_embeds, negative_pooled_prompt_embeds=a.negative_pooled_prompt_embeds,
        clip_skip=a.clip_skip)
    projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    n = batch * a.num_images_per_prompt
    ids, negative_ids = time_ids(pipe, a, (height, width), n, embeds.dtype, projection)
    extra = _timestep_cond(pipe, a.guidance_scale, n, embeds.dtype, device)
    added = {"text_embeds": pooled.to(device), "time_ids": ids, **extra}
    negative_added = {"text_embeds": (negative_pooled if cfg else pooled).to(device), "time_ids": negative_ids, **extra}

    def finish(latents: torch.Tensor):
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        if a.output_type == "latent":
            image = latents
        else:
            upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
            if upcast:
                pipe.upcast_vae()
                latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
            config = pipe.vae.config
            if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
                mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            if upcast:
                pipe.vae.to(dtype=torch.float16)
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=a.output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=image) if a.return_dict else (image,)

    window = denoising_window(pipe.scheduler, getattr(a, "strength", 1.0), getattr(a, "denoising_start", None),
                              a.denoising_end)
    return Conditioning(n, height, width, cfg, embeds, negative, added, negative_added, finish=finish, window=window)


_PIXART_BINS = {128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN", 32: "ASPECT_RATIO_256_BIN"}


def _prepare_pixart(pipe, a) -> Conditioning:
    """PixArtAlphaPipeline: T5 embeddings with their attention masks; resolution and aspect ratio at 1024 px."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as module

    config = pipe.transformer.config
    height = a.height or config.sample_size * pipe.vae_scale_factor
    width = a.width or config.sample_size * pipe.vae_scale_factor
    original = (height, width)
    if a.use_resolution_binning:
        if config.sample_size not in _PIXART_BINS:
            raise PostDiffError(f"use_resolution_binning needs a PixArt transformer of sample size 32, 64 or 128 "
                                f"(256, 512 or 1024 px); this one has {config.sample_size}: pass "
                                "use_resolution_binning=False")
        height, width = pipe.image_processor.classify_height_width_bin(
            height, width, ratios=getattr(module, _PIXART_BINS[config.sample_size]))
    cfg = a.guidance_scale > 1.0
    batch = _batch(a.prompt, a.prompt_embeds)
    device = pipe._execution_device
    if a.prompt_embeds is not None and a.prompt_attention_mask is None:
        raise PostDiffError("pass prompt_attention_mask with prompt_embeds (PixArt's text is padded; the mask says "
                            "which tokens are real)")
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        a.prompt, cfg, negative_prompt=a.negative_prompt, num_images_per_prompt=a.num_images_per_prompt,
        device=device, prompt_embeds=a.prompt_embeds, negative_prompt_embeds=a.negative_prompt_embeds,
        prompt_attention_mask=a.prompt_attention_mask, negative_prompt_attention_mask=a.negative_prompt_attention_mask,
        clean_caption=a.clean_caption, max_sequence_length=a.max_sequence_length)
    n = batch * a.num_images_per_prompt
    dtype = embeds.dtype
    # The transformer turns the mask into an additive bias, (1 - mask) * -10000, in the latent dtype.
    added = {"encoder_attention_mask": mask.to(device, dtype),
             "resolution": torch.tensor([height, width]).repeat(n, 1).to(device, dtype),
             "aspect_ratio": torch.tensor([float(height / width)]).repeat(n, 1).to(device, dtype)}
    negative_added = dict(added)
    if negative_mask is not None:
        negative_added["encoder_attention_mask"] = negative_mask.to(device, dtype)

    def finish(latents: torch.Tensor):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        if a.output_type == "latent":
            image = latents
        else:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            if a.use_resolution_binning:
                image = pipe.image_processor.resize_and_crop_tensor(image, original[1], original[0])
            image = pipe.image_processor.postprocess(image, output_type=a.output_type)
        pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if a.return_dict else (image,)

    return Conditioning(n, height, width, cfg, embeds, negative, added, negative_added, finish=finish)


_COMMON = dict(prompt=None, height=None, width=None, timesteps=None, sigmas=None, num_images_per_prompt=1,
               generator=None, latents=None, prompt_embeds=None, output_type="pil", return_dict=True,
               callback_on_step_end=None, callback_on_step_end_tensor_inputs=None)
# PixArtAlphaPipeline has the old callback/callback_steps arguments only (refused), no callback_on_step_end.
_NO_STEP_CALLBACKS = {k: v for k, v in _COMMON.items() if not k.startswith("callback")}
_SDXL = dict(
    _COMMON, prompt_2=None, num_inference_steps=50, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
    negative_prompt_2=None, eta=0.0, negative_prompt_embeds=None, pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None, guidance_rescale=0.0, original_size=None, crops_coords_top_left=(0, 0),
    target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
    clip_skip=None)
KINDS = {kind.name: kind for kind in (
    PipelineKind("StableDiffusionPipeline", dict(_COMMON, num_inference_steps=50, guidance_scale=7.5,
                                                 negative_prompt=None, eta=0.0, negative_prompt_embeds=None,
                                                 guidance_rescale=0.0, clip_skip=None), prepare_sd),
    # No height, width or latents: the image gives the size and the strength the start (pipeline_img2img.py).
    PipelineKind("StableDiffusionImg2ImgPipeline", dict(
        {k: v for k, v in _COMMON.items() if k not in ("height", "width", "latents")}, image=None, strength=0.8,
        num_inference_steps=50, guidance_scale=7.5, negative_prompt=None, eta=0.0, negative_prompt_embeds=None,
        clip_skip=None), partial(prepare_img2img, prepare_text=prepare_sd)),
    PipelineKind("StableDiffusionInpaintPipeline", dict(
        _COMMON, image=None, mask_image=None, masked_image_latents=None, strength=1.0, num_inference_steps=50,
        guidance_scale=7.5, negative_prompt=None, eta=0.0, negative_prompt_embeds=None, clip_skip=None),
        partial(prepare_inpaint, prepare_text=prepare_sd)),
    PipelineKind("StableDiffusionControlNetPipeline", dict(
        _COMMON, image=None, num_inference_steps=50, guidance_scale=7.5, negative_prompt=None, eta=0.0,
        negative_prompt_embeds=None, clip_skip=None, controlnet_conditioning_scale=1.0, guess_mode=False,
        control_guidance_start=0.0, control_guidance_end=1.0), partial(prepare_controlnet, prepare_text=prepare_sd)),
    PipelineKind("LatentConsistencyModelPipeline", dict(_COMMON, num_inference_steps=4, guidance_scale=8.5,
                                                        original_inference_steps=None, clip_skip=None, eta=None,
                                                        guidance_rescale=0.0), _prepare_lcm),
    PipelineKind("StableDiffusionXLPipeline", _SDXL, prepare_sdxl),
    PipelineKind("StableDiffusionXLControlNetPipeline", dict(
        {k: v for k, v in _SDXL.items() if k != "guidance_rescale"}, image=None, controlnet_conditioning_scale=1.0,
        guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0),
        partial(prepare_controlnet, prepare_text=prepare_sdxl)),
    PipelineKind("StableDiffusionXLImg2ImgPipeline", dict(
        {k: v for k, v in _SDXL.items() if k not in ("height", "width")}, strength=0.3, image=None, denoising_start=None, aesthetic_score=6.0, negative_aesthetic_score=2.5),
        partial(prepare_sdxl_img2img, prepare_text=partial(prepare_sdxl, time_ids=sdxl_img2img_time_ids))),
    PipelineKind("PixArtAlphaPipeline", dict(
        _NO_STEP_CALLBACKS, negative_prompt="", num_inference_steps=20, guidance_scale=4.5, eta=0.0,
        prompt_attention_mask=None, negative_prompt_embeds=None, negative_prompt_attention_mask=None, clean_caption=True,
        use_resolution_binning=True, max_sequence_length=120, guidance_rescale=0.0), _prepare_pixart),
    PipelineKind("StableDiffusion3Pipeline", dict(
        _COMMON, prompt_2=None, prompt_3=None, num_inference_steps=28, guidance_scale=7.0, negative_prompt=None,
        negative_prompt_2=None, negative_prompt_3=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None, clip_skip=None, max_sequence_length=256, skip_guidance_layers=None,
        mu=None, guidance_rescale=0.0, eta=None), prepare_sd3),
    PipelineKind("FluxPipeline", dict(
        _COMMON, prompt_2=None, negative_prompt=None, negative_prompt_2=None, true_cfg_scale=1.0,
        num_inference_steps=28, guidance_scale=3.5, pooled_prompt_embeds=None, negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None, max_sequence_length=512, guidance_rescale=0.0, eta=None), prepare_flux),
)}


def pipeline_kind(pipe: Any) -> PipelineKind | None:
    """The kind of the pipeline's class or of its nearest diffusers base class."""
    for cls in getattr(type(pipe), "_postdiff_base", type(pipe)).__mro__:
        if cls.__name__ in KINDS:
            return KINDS[cls.__name__]
    return None
