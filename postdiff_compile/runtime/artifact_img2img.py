"""Image-to-image and inpainting on an artifact: the caller's image latents, noised to where `strength` starts, then
the window of the artifact's schedule that optimize(pipe) runs for StableDiffusionImg2ImgPipeline
(pipeline_img2img.py), with an inpainting U-Net's mask channels as StableDiffusionInpaintPipeline (pipeline_inpaint.py).

An artifact holds no VAE: the caller encodes the image (scaled latents, [1, C, H, W] at the artifact's latent size),
as diffusers' img2img pipeline takes 4-channel latents for `image` without encoding them. The plan is rebuilt from
the manifest's config with the strength's window (plan.build_plan), so every step runs a variant the artifact
holds at that resolution; a window that needs another (none found) is refused by name.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import PostDiffConfig
from ..errors import PostDiffError
from ..models.families import get_family
from ..plan import make_plan
from ..schedulers import prediction_type
from .denoise import set_schedule, walk
from .pipeline_inpaint import InpaintInputs
from .schedule_windows import denoising_window


def _checked(name: str, tensor: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        raise PostDiffError(f"{name} must be the encoded image, scaled, of shape {list(shape)}; got "
                            f"{list(getattr(tensor, 'shape', [])) or type(tensor).__name__}")
    return tensor


def sample_from_image(runner: Any, image_latents: torch.Tensor | None, strength: float, *, generator, on_step=None,
                      mask: torch.Tensor | None = None, masked_image_latents: torch.Tensor | None = None,
                      denoising_end: float | None = None, denoising_start: float | None = None,
                      **conditioning) -> torch.Tensor:
    """Latents [1, C, H, W] from `image_latents` at `strength`; `conditioning` as denoise.sample takes it.

    With `mask` ([1, 1, h, w] at the latent size, 1 = repaint) and `masked_image_latents`, inpainting on an
    inpainting U-Net's artifact (9 input channels), as StableDiffusionInpaintPipeline: at strength 1 the start is
    pure noise and `image_latents` may be None. With `mask` on a plain U-Net's artifact (4 channels), the known
    region blended back after every step as that pipeline does (pipeline_inpaint.InpaintInputs.blend; no mixed
    resolution, as there). Without an image or a mask (text-to-image), `denoising_end` stops early as an SDXL base
    does for its refiner (schedule_windows.denoising_window); `denoising_start` starts late from `image_latents`,
    which are noised already (the base's), as the refiner does: nothing is drawn or added."""
    manifest, scheduler, device = runner.manifest, runner.scheduler, runner.device
    resolution = manifest["resolution"]
    full = (resolution["latent_height"], resolution["latent_width"])
    plain = mask is not None and runner.latent_channels == 4   # the blend, not the mask channels
    channels = runner.latent_channels - (5 if mask is not None and not plain else 0)
    if mask is not None and runner.latent_channels not in (4, 9):
        raise PostDiffError(f"mask needs an inpainting U-Net's artifact (9 input channels) or a plain one (4); this "
                            f"one takes {runner.latent_channels}")
    noise_only = (mask is not None and strength == 1.0 and not plain) or (mask is None and image_latents is None)
    if denoising_start is not None and (noise_only or mask is not None):
        raise PostDiffError("denoising_start needs image_latents (a base's noisy latents) and no mask")
    if not noise_only:
        image_latents = _checked("image_latents", image_latents, (1, channels, *full))
    timestep_device = set_schedule(scheduler, runner.steps, device, runner.timing)
    timesteps = scheduler.timesteps
    start, stop = denoising_window(scheduler, 1.0 if image_latents is None else strength, denoising_start,
                                   denoising_end)(timesteps)
    if start >= stop:
        given = "".join(f", {n} {v}" for n, v in (("denoising_start", denoising_start),
                                                  ("denoising_end", denoising_end)) if v is not None)
        raise PostDiffError(f"strength {strength}{given} runs no step of the artifact's {runner.steps}-step schedule")
    config = PostDiffConfig.from_dict(manifest["config"])
    plan = make_plan(config, runner.steps, family=get_family(manifest["source"]["family"]), full_latent=full,
                     prediction_type=prediction_type(scheduler), cfg=runner.cfg, timesteps=timesteps.tolist(),
                     window=(start, stop) if (start, stop) != (0, runner.steps) else None)
    if plain and plan.transition:
        raise PostDiffError("mixed resolution needs an inpainting U-Net (9 input channels): a 4-channel U-Net's blend "
                            "has no full-resolution noise after the switch; use an artifact without mixed resolution "
                            "or a strength whose window starts at or after its switch")
    if denoising_start is not None and plan.transition:
        raise PostDiffError(f"denoising_start {denoising_start} starts before the switch to full resolution: the "
                            "latents it continues are full-resolution already")
    clean = None if noise_only else image_latents.to(device, runner.dtype)
    if denoising_start is not None:
        latents = clean
    else:
        size = plan.transition.low_latent if plan.transition else full
        latents, noise, clean = _noised(scheduler, clean, size, full, timesteps[start:start + 1], generator,
                                        (1, channels, *size), device, runner.dtype,
                                        noise_only or (plain and strength == 1.0))
    if mask is not None:
        inputs = InpaintInputs(full, _checked("mask", mask, (1, 1, *full)).to(device, runner.dtype))
        inputs.mask[full] = inputs.mask_pixels
        if plain:
            inputs.image_latents, inputs.noise, inputs.timesteps = clean, noise, timesteps[start:stop]
            conditioning["after_step"] = lambda index, t, x: inputs.blend(index, x, scheduler)
        else:
            inputs.masked_latents[full] = _checked("masked_image_latents", masked_image_latents,
                                                   (1, channels, *full)).to(device, runner.dtype)
            conditioning["extra_channels"] = inputs.channels
    return walk(runner.variants, scheduler, plan, runner.steps, latents, generator=generator,
                latent_input=runner.latent_input, timestep_device=timestep_device, timestep_kwargs=runner.timing,
                start=start, on_step=on_step, **conditioning)


def _noised(scheduler, clean, size, full, first, generator, shape, device, dtype, pure: bool):
    """(first latents, the noise drawn, the clean latents at `size`): pure noise, as diffusers starts at full strength,
    or `clean` noised to the first timestep (averaged down first where the window starts before the switch, as
    optimize(pipe) does)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if pure:
        return noise * scheduler.init_noise_sigma, noise, clean
    if size != full:
        clean = torch.nn.functional.interpolate(clean, size=size, mode="area")
    return scheduler.add_noise(clean, noise, first), noise, clean
