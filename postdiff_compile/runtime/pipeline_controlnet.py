"""ControlNet: StableDiffusionControlNetPipeline's and StableDiffusionXLControlNetPipeline's preparation and their
per-step ControlNet call, done as they do them (SDXL's ControlNet takes the U-Net's pooled text and time ids).

The U-Net's variants take the ControlNet residuals as inputs (capture.residual_specs: one per down-path output and
one for the middle block); a DeepCache shallow variant takes only those its layers add (variants.build_variant
drops the others). The ControlNet itself runs eagerly, from the pipeline, once per step, on the step's scaled
latent input, embeddings and batch, as diffusers runs it; `controlnet_conditioning_scale`,
`control_guidance_start`/`end` (the per-step keep factors), `guess_mode` and several ControlNets
(MultiControlNetModel) as diffusers handles them. On low-resolution steps it gets the conditioning image
prepared at the low-resolution size (the image processor's resize of the given image), so its residuals have the
low-resolution U-Net's shapes. On steps without CFG (the cross-attention cache's) it gets what the U-Net gets: one
half of the batch, the negative embeddings.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..capture import CONTROLNET_DOWN, CONTROLNET_MID
from ..errors import PostDiffError
from .call_inputs import Conditioning


def _as_lists(pipe, a) -> tuple[list, list, list, list]:
    """images, scales, guidance starts and ends, one per ControlNet, as the pipeline broadcasts them."""
    count = len(pipe.controlnet.nets) if hasattr(pipe.controlnet, "nets") else 1   # a MultiControlNetModel has nets
    images = a.image if count > 1 else [a.image]
    scales = a.controlnet_conditioning_scale
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * count
    starts, ends = a.control_guidance_start, a.control_guidance_end
    starts = list(starts) if isinstance(starts, (list, tuple)) else [starts] * count
    ends = list(ends) if isinstance(ends, (list, tuple)) else [ends] * count
    if not len(images) == len(scales) == len(starts) == len(ends) == count:
        raise PostDiffError(f"pass one image, conditioning scale, guidance start and end per ControlNet ({count})")
    return images, scales, starts, ends


def guidance_keep(index: int, steps: int, starts: list, ends: list) -> list[float]:
    """Each ControlNet's factor at step `index` of `steps`: 0 outside its control_guidance_start/end, else 1, in
    the pipelines' arithmetic (the artifact runners use the same)."""
    return [1.0 - float(index / steps < s or (index + 1) / steps > e) for s, e in zip(starts, ends)]


def prepare_controlnet(pipe, a, prepare_text: Callable[[Any, Any], Conditioning]) -> Conditioning:
    """`prepare_text`'s conditioning for the control image's size, and the per-step ControlNet residuals."""
    images, scales, starts, ends = _as_lists(pipe, a)
    single = not hasattr(pipe.controlnet, "nets")   # a ControlNetModel, not a MultiControlNetModel
    guess = a.guess_mode or (pipe.controlnet if single else pipe.controlnet.nets[0]).config.global_pool_conditions
    asked = (a.height, a.width)   # what diffusers prepares the full-size images with (None: the image's size)
    first = pipe.control_image_processor.preprocess(images[0], height=a.height, width=a.width)
    a.height, a.width = int(first.shape[2]), int(first.shape[3])
    full = (a.height // pipe.vae_scale_factor, a.width // pipe.vae_scale_factor)
    a.guidance_rescale = 0.0   # not an argument of the ControlNet pipeline
    cond = prepare_text(pipe, a)
    device, dtype, scale = pipe._execution_device, pipe.controlnet.dtype, pipe.vae_scale_factor
    prepared: dict[tuple[tuple[int, int], bool], list[torch.Tensor]] = {}

    def images_at(size: tuple[int, int], twice: bool) -> list[torch.Tensor]:
        """[n, 3, H, W] each, or [2n, ...] for a CFG batch (`twice`), prepared once per size."""
        if (size, False) not in prepared:
            height, width = asked if size == full else (size[0] * scale, size[1] * scale)
            prepared[size, False] = [pipe.prepare_image(image=image, width=width, height=height,
                                                        batch_size=cond.batch,
                                                        num_images_per_prompt=a.num_images_per_prompt, device=device,
                                                        dtype=dtype, do_classifier_free_guidance=False,
                                                        guess_mode=guess) for image in images]
            prepared[size, True] = [torch.cat([image] * 2) for image in prepared[size, False]]
        return prepared[size, twice]

    def residuals(index: int, steps: int, cfg: bool, model_input: torch.Tensor, t: Any, context: torch.Tensor,
                  added: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = guidance_keep(index, steps, starts, ends)
        step_scales = [c * k for c, k in zip(scales, keep)]
        conditioning = images_at((model_input.shape[2], model_input.shape[3]), cfg and not guess)
        control_input, embeds = model_input, context
        added = {k: v for k, v in added.items() if k in ("text_embeds", "time_ids")}   # SDXL's, as its U-Net's
        if guess and cfg:   # the ControlNet sees the conditional half only; the other half gets no residuals
            control_input, embeds = model_input.chunk(2)[1], context.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()}
        down, mid = pipe.controlnet(control_input, t, encoder_hidden_states=embeds,
                                    controlnet_cond=conditioning[0] if single else conditioning,
                                    conditioning_scale=step_scales[0] if single else step_scales,
                                    guess_mode=guess, added_cond_kwargs=added or None, return_dict=False)
        if guess and cfg:
            down, mid = [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
        return {**{f"{CONTROLNET_DOWN}{i}": d for i, d in enumerate(down)}, CONTROLNET_MID: mid}

    cond.residuals = residuals
    return cond
