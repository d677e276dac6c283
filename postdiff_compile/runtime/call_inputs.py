"""The data one optimized pipeline call hands its loop: what every pipeline kind prepares, and the kind itself."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PostDiffError


@dataclass
class Conditioning:
    """One call's inputs to the loop, and how to turn its final latents into the pipeline's output."""
    batch: int                                   # images (prompts x images per prompt)
    height: int                                  # image size the loop runs for (after PixArt's binning)
    width: int
    cfg: bool
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_added: dict[str, torch.Tensor] = field(default_factory=dict)
    timestep_kwargs: dict[str, Any] = field(default_factory=dict)   # extra set_timesteps arguments (LCM, FLUX's mu)
    finish: Callable[[torch.Tensor], Any] | None = None
    step_kwargs: dict[str, Any] | None = None    # scheduler.step's extra arguments; None: prepare_extra_step_kwargs
    # Inputs shared by the batch per latent size (FLUX's rotary positions; DenoiseRequest.shared_inputs).
    shared_inputs: Callable[[tuple[int, int]], dict[str, torch.Tensor]] | None = None
    # The initial latent for a latent size and the timesteps the loop runs, [B, C, h, w]; None: the pipeline's
    # prepare_latents as SD draws it.
    prepare_latents: Callable[[tuple[int, int], torch.Tensor], torch.Tensor] | None = None
    # The steps to run of the scheduler's timesteps, (start, stop), given them (img2img's strength); None: all.
    window: Callable[[torch.Tensor], tuple[int, int]] | None = None
    # Run after each step before a step callback, (step index, latents) -> latents (an inpainting blend)
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    # DenoiseRequest.extra_channels (an inpainting U-Net's mask and masked image latents)
    extra_channels: Callable[[tuple[int, int]], torch.Tensor] | None = None
    # DenoiseRequest.residuals (a ControlNet pipeline's)
    residuals: Callable[..., dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class PipelineKind:
    name: str
    defaults: dict[str, Any]                     # the __call__ arguments this runtime implements, with defaults
    prepare: Callable[[Any, Any], Conditioning]  # (pipe, arguments) -> Conditioning


def batch_size(prompt, prompt_embeds) -> int:
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    if prompt_embeds is not None:
        return prompt_embeds.shape[0]
    raise PostDiffError("pass a prompt or prompt_embeds")
