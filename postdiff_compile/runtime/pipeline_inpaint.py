"""Inpainting: StableDiffusionInpaintPipeline's preparation and its per-step work, done as it does it.

An inpainting U-Net (9 input channels) takes the mask and the masked image's latents beside the latents at every
step: `InpaintInputs.channels` gives them for a latent size, and the loop appends them after scale_model_input
(DenoiseRequest.extra_channels), doubled on CFG steps. A plain U-Net (4 channels) instead has the known region
put back after every step: the image latents noised to the next timestep, blended in through the mask
(`InpaintInputs.blend`, run before a step callback, as diffusers orders them).

`strength` picks a window of the schedule as for image-to-image (pipeline_img2img.py). With mixed resolution the
low-resolution steps of an inpainting U-Net get the mask resized from the pixel mask to the low latent size as
diffusers resizes it to the full one (nearest), and the masked image's latents area-averaged down, as the image's
latents are. A plain U-Net's blend would need the initial noise at full resolution after the switch, which no
step has drawn: mixed resolution is refused for it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PostDiffError
from .call_inputs import Conditioning
from .schedule_windows import strength_window


@dataclass
class InpaintInputs:
    """One call's mask and image latents, per latent size, once the first latents are drawn."""
    full: tuple[int, int]
    mask_pixels: torch.Tensor                   # [B, 1, H, W], the mask processor's
    mask: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)           # [B, 1, h, w] by size
    masked_latents: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    appended: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)   # channels(), made once a size
    image_latents: torch.Tensor | None = None   # a plain U-Net's blend: the clean image, and its noise
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None

    def channels(self, size: tuple[int, int]) -> torch.Tensor:
        if size not in self.appended:
            if size not in self.mask:
                self.mask[size] = F.interpolate(self.mask_pixels, size=size).to(self.masked_latents[self.full].dtype)
                self.masked_latents[size] = F.interpolate(self.masked_latents[self.full], size=size, mode="area")
            self.appended[size] = torch.cat([self.mask[size], self.masked_latents[size]], dim=1)
        return self.appended[size]

    def blend(self, index: int, latents: torch.Tensor, scheduler: Any) -> torch.Tensor:
        known = self.image_latents
        if index < len(self.timesteps) - 1:
            known = scheduler.add_noise(known, self.noise, torch.tensor([self.timesteps[index + 1]]))
        mask = self.mask[self.full]
        return (1 - mask) * known + mask * latents


def prepare_inpaint(pipe, a, prepare_text: Callable[[Any, Any], Conditioning]) -> Conditioning:
    """StableDiffusionInpaintPipeline: `prepare_text`'s conditioning, the strength's window, the first latents and
    the per-step inputs (InpaintInputs) for an inpainting or a plain U-Net."""
    a.guidance_rescale = 0.0   # not an argument of the inpainting pipeline
    cond = prepare_text(pipe, a)
    height, width = cond.height, cond.width
    scale = pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    if channels not in (4, 4 + 1 + pipe.vae.config.latent_channels):
        raise PostDiffError(f"an inpainting U-Net takes 4 or 9 input channels; this one takes {channels}")
    image = pipe.image_processor.preprocess(a.image, height=height, width=width).to(dtype=torch.float32)
    mask_pixels = pipe.mask_processor.preprocess(a.mask_image, height=height, width=width)
    inputs = InpaintInputs((height // scale, width // scale), mask_pixels)
    cond.window = strength_window(pipe.scheduler, a.strength)

    def prepare(size: tuple[int, int], timesteps: torch.Tensor) -> torch.Tensor:
        device, dtype, n = pipe._execution_device, cond.prompt_embeds.dtype, cond.batch
        first = timesteps[:1].repeat(n)
        plain = channels == 4
        if size != inputs.full and plain:
            raise PostDiffError("mixed resolution needs an inpainting U-Net (9 input channels) in "
                                "StableDiffusionInpaintPipeline: a 4-channel U-Net's blend has no full-resolution "
                                "noise after the switch; use a preset without mixed resolution")
        if size == inputs.full:
            out = pipe.prepare_latents(n, pipe.vae.config.latent_channels, height, width, dtype, device, a.generator,
                                       a.latents, image=image, timestep=first, is_strength_max=a.strength == 1.0,
                                       return_noise=True, return_image_latents=plain)
            latents, inputs.noise = out[0], out[1]
            inputs.image_latents = out[2] if plain else None
        else:
            latents = _low_resolution_start(pipe, a, image, size, first, n, dtype, device)
        masked_image = image * (mask_pixels < 0.5) if a.masked_image_latents is None else a.masked_image_latents
        mask, masked = pipe.prepare_mask_latents(mask_pixels, masked_image, n, height, width, dtype, device,
                                                 a.generator, False)
        inputs.mask[inputs.full], inputs.masked_latents[inputs.full] = mask, masked
        inputs.mask_pixels = mask_pixels.to(device=device, dtype=dtype).repeat(n // mask_pixels.shape[0], 1, 1, 1)
        inputs.timesteps = timesteps
        return latents

    cond.prepare_latents = prepare
    if channels == 4:
        cond.after_step = lambda index, latents: inputs.blend(index, latents, pipe.scheduler)
    else:
        cond.extra_channels = inputs.channels
    return cond


def _low_resolution_start(pipe, a, image, size, first, n, dtype, device) -> torch.Tensor:
    """The first latents at a low-resolution size: noise drawn there, over the image's latents area-averaged down
    (pure noise at strength 1, as diffusers starts)."""
    from diffusers.utils.torch_utils import randn_tensor

    if a.latents is not None:
        raise PostDiffError("latents cannot be given to an inpainting call that starts at low resolution")
    clean = None
    if a.strength != 1.0:
        image = image.to(device=device, dtype=dtype)
        latent = image.shape[1] == pipe.vae.config.latent_channels   # latents given, as diffusers takes them
        clean = image if latent else pipe._encode_vae_image(image=image, generator=a.generator)
        clean = F.interpolate(clean.repeat(n // clean.shape[0], 1, 1, 1), size=size, mode="area")
    noise = randn_tensor((n, pipe.vae.config.latent_channels, *size), generator=a.generator, device=device,
                         dtype=dtype)
    return noise * pipe.scheduler.init_noise_sigma if clean is None else pipe.scheduler.add_noise(clean, noise, first)
