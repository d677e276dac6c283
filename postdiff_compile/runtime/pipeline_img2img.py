"""Image-to-image: StableDiffusionImg2ImgPipeline's preparation, done as it does it.

`strength` runs the last steps of the schedule only (diffusers' get_timesteps): the loop gets a window of the
schedule, and the plan is the whole schedule's plan restricted to that window (plan.build_plan's `window`), so a
preset does on those steps what it does on them in a text-to-image run of the same length. With mixed resolution
that means: when the window starts before the switch step, the first steps run at low resolution on the encoded
image downscaled (area average of the latent, then noise drawn at the low size and added at the window's first
timestep, as diffusers adds it at full size); when it starts at or after the switch, every step runs at full
resolution and the image is encoded and noised exactly as diffusers does. Low strength keeps the image's layout,
which is what the low-resolution steps would otherwise lay out.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import PostDiffError
from .call_inputs import Conditioning, batch_size as _batch
from .schedule_windows import strength_window, valid_fraction


def encode_image(pipe, image: torch.Tensor, batch: int, generator) -> torch.Tensor:
    """The clean image latents, [batch, C, h, w], as the img2img pipeline's prepare_latents encodes them."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    if image.shape[1] == pipe.vae.config.latent_channels:
        latents = image   # latents already, as diffusers takes them
    elif isinstance(generator, list):
        if image.shape[0] < batch and batch % image.shape[0] == 0:
            image = torch.cat([image] * (batch // image.shape[0]), dim=0)
        latents = torch.cat([retrieve_latents(pipe.vae.encode(image[i:i + 1]), generator=generator[i])
                             for i in range(batch)]) * pipe.vae.config.scaling_factor
    else:
        latents = retrieve_latents(pipe.vae.encode(image), generator=generator) * pipe.vae.config.scaling_factor
    if batch > latents.shape[0] and batch % latents.shape[0] == 0:
        latents = torch.cat([latents] * (batch // latents.shape[0]), dim=0)
    return latents


def noised_image_latents(pipe, a, n: int, dtype) -> Any:
    """(latent size, window timesteps) -> the noised image latents the loop starts from."""
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe._execution_device
    image = a.image.to(device=device, dtype=dtype)

    def prepare(size: tuple[int, int], timesteps: torch.Tensor) -> torch.Tensor:
        first = timesteps[:1].repeat(n)
        if tuple(size) == (a.height // pipe.vae_scale_factor, a.width // pipe.vae_scale_factor):
            return pipe.prepare_latents(image, first, _batch(a.prompt, a.prompt_embeds), a.num_images_per_prompt,
                                        dtype, device, a.generator)
        clean = torch.nn.functional.interpolate(encode_image(pipe, image, n, a.generator), size=size, mode="area")
        noise = randn_tensor(clean.shape, generator=a.generator, device=device, dtype=dtype)
        return pipe.scheduler.add_noise(clean, noise, first)
    return prepare


def prepare_img2img(pipe, a, prepare_text: Callable[[Any, Any], Conditioning]) -> Conditioning:
    """StableDiffusionImg2ImgPipeline: `prepare_text`'s conditioning (the text-to-image kind's, for the image's
    size), the strength's window and the noised image as the first latents."""
    a.image = pipe.image_processor.preprocess(a.image)
    scale = pipe.vae_scale_factor if a.image.shape[1] == pipe.vae.config.latent_channels else 1   # latents given
    a.height, a.width = int(a.image.shape[2]) * scale, int(a.image.shape[3]) * scale
    a.guidance_rescale = 0.0   # not an argument of the img2img pipeline
    cond = prepare_text(pipe, a)
    cond.window = strength_window(pipe.scheduler, a.strength)
    cond.prepare_latents = noised_image_latents(pipe, a, cond.batch, cond.prompt_embeds.dtype)
    return cond


def sdxl_img2img_time_ids(pipe, a, size: tuple[int, int], n: int, dtype, projection: int):
    """StableDiffusionXLImg2ImgPipeline's time ids: the negative sizes default to the positive ones, and a refiner
    (requires_aesthetics_score) conditions on the aesthetic scores instead of the target size."""
    original, target = a.original_size or size, a.target_size or size
    ids, negative_ids = pipe._get_add_time_ids(
        original, a.crops_coords_top_left, target, a.aesthetic_score, a.negative_aesthetic_score,
        a.negative_original_size or original, a.negative_crops_coords_top_left, a.negative_target_size or target,
        dtype=dtype, text_encoder_projection_dim=projection)
    device = pipe._execution_device
    return ids.to(device).repeat(n, 1), negative_ids.to(device).repeat(n, 1)


def prepare_sdxl_img2img(pipe, a, prepare_text: Callable[[Any, Any], Conditioning]) -> Conditioning:
    """StableDiffusionXLImg2ImgPipeline (the refiner among others): an image, or the base's latents with
    `denoising_start`, which are already noised and are used as they are."""
    a.image = pipe.image_processor.preprocess(a.image)
    latent_image = a.image.shape[1] == pipe.vae.config.latent_channels
    scale = pipe.vae_scale_factor if latent_image else 1
    a.height, a.width = int(a.image.shape[2]) * scale, int(a.image.shape[3]) * scale
    cond = prepare_text(pipe, a)
    add_noise = not valid_fraction(a.denoising_start)
    device, dtype = pipe._execution_device, cond.prompt_embeds.dtype

    def prepare(size: tuple[int, int], timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        first = timesteps[:1].repeat(cond.batch)
        full = (a.height // pipe.vae_scale_factor, a.width // pipe.vae_scale_factor)
        if a.latents is not None or tuple(size) == full:
            return a.latents if a.latents is not None else pipe.prepare_latents(
                a.image, first, _batch(a.prompt, a.prompt_embeds), a.num_images_per_prompt, dtype, device,
                a.generator, add_noise)
        if not add_noise:
            raise PostDiffError(f"denoising_start {a.denoising_start} starts before the switch to full resolution: "
                                "the latents it takes are noised at full resolution already; start later or use a "
                                "config without mixed resolution")
        clean = pipe.prepare_latents(a.image, first, _batch(a.prompt, a.prompt_embeds), a.num_images_per_prompt,
                                     dtype, device, a.generator, False)
        clean = torch.nn.functional.interpolate(clean, size=size, mode="area")
        noise = randn_tensor(clean.shape, generator=a.generator, device=device, dtype=dtype)
        return pipe.scheduler.add_noise(clean, noise, first)
    cond.prepare_latents = prepare
    return cond
