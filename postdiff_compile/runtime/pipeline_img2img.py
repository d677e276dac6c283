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

from .call_inputs import Conditioning, batch_size as _batch


def strength_window(scheduler: Any, strength: float) -> Any:
    """(full timesteps) -> (start, stop): diffusers' get_timesteps for `strength` (set_begin_index included)."""
    def window(timesteps: torch.Tensor) -> tuple[int, int]:
        order = getattr(scheduler, "order", 1)
        steps = len(timesteps) // order
        start = max(steps - min(int(steps * strength), steps), 0) * order
        return start, len(timesteps)
    return window


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
        if tuple(image.shape[2:]) == tuple(s * pipe.vae_scale_factor for s in size):
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
    a.height, a.width = int(a.image.shape[2]), int(a.image.shape[3])
    a.guidance_rescale = 0.0   # not an argument of the img2img pipeline
    cond = prepare_text(pipe, a)
    cond.window = strength_window(pipe.scheduler, a.strength)
    cond.prepare_latents = noised_image_latents(pipe, a, cond.batch, cond.prompt_embeds.dtype)
    return cond
