"""Mixed resolution: the low-resolution latent size, the switch step, and token caches across the switch.

The low-resolution latent (the rule, per side): `scale * side`, rounded half up to a multiple of the
family's `latent_multiple` (1 for U-Nets, the patch size 2 for PixArt-alpha), and at least the family's
`min_latent`. SD1.5 at 768 px: 96 -> 48; SDXL at 1024 px: 128 -> 96; PixArt-alpha at 1024 px: 128 -> 96.
A U-Net accepts any side: diffusers upsamples to the skip's size when a side is not a multiple of
2**num_upsamplers, and the capture records which path was taken.
"""
from __future__ import annotations

import math
import warnings

import torch

from .errors import PostDiffError


def low_res_latent(family, latent: tuple[int, int], scale: float) -> tuple[int, int]:
    """The latent size of the low-resolution steps for a full latent size (see the module docstring)."""
    multiple = family.latent_multiple
    floor = math.ceil(family.min_latent / multiple) * multiple

    def side(full: int) -> int:
        return min(full, max(floor, multiple * math.floor(scale * full / multiple + 0.5)))

    low = side(latent[0]), side(latent[1])
    if low == tuple(latent):
        raise PostDiffError(
            f"low_res_scale {scale} leaves the {latent[0]}x{latent[1]} latent at {low[0]}x{low[1]} ({family.name} "
            f"takes no side below {floor}); use a larger image or low_res_fraction 0")
    return low


def switch_step(low_res_scale: float, low_res_fraction: float, num_steps: int) -> int:
    """L, the first full-resolution step: steps 0..L-1 run at low resolution; 0 means no switch.

    L = round(s * N), halves up. At least the last step runs at full resolution, since the transition
    re-noises to the timestep after the last low-resolution one.
    """
    if low_res_scale >= 1 or low_res_fraction <= 0:
        return 0
    low = math.floor(low_res_fraction * num_steps + 0.5)
    if low == 0:
        warnings.warn(f"low_res_fraction {low_res_fraction} of {num_steps} steps rounds to no low-resolution step; "
                      f"mixed resolution is off for this call", stacklevel=3)
    if low >= num_steps:
        warnings.warn(f"low_res_fraction {low_res_fraction} of {num_steps} steps leaves no full-resolution step; "
                      f"the last step runs at full resolution", stacklevel=3)
        low = num_steps - 1
    return low


def token_grid(latent: tuple[int, int], tokens: int) -> tuple[int, tuple[int, int]]:
    """(level, (h, w)) of a token sequence of a block working on `latent` downsampled `level` times.

    A stride-2 convolution with padding 1 (diffusers' Downsample2D) and a 2x2 patch embedding on an even side
    both turn a side n into ceil(n / 2).
    """
    h, w = latent
    level = 0
    while h * w > tokens and (h > 1 or w > 1):
        h, w, level = math.ceil(h / 2), math.ceil(w / 2), level + 1
    if h * w != tokens:
        raise PostDiffError(f"{tokens} tokens are no downsampled grid of the {latent[0]}x{latent[1]} latent")
    return level, (h, w)


def resize_tokens(value: torch.Tensor, src_latent: tuple[int, int], dst_latent: tuple[int, int]) -> torch.Tensor:
    """A cached [B, tokens, C] activation of a block at `src_latent`, resized for the same block at `dst_latent`.

    Back to its spatial grid, bilinear upsample (align_corners=False, as the latent itself), flattened
    again in the same row-major order.
    """
    batch, tokens, channels = value.shape
    level, (h, w) = token_grid(src_latent, tokens)
    dst = dst_latent
    for _ in range(level):
        dst = (math.ceil(dst[0] / 2), math.ceil(dst[1] / 2))
    grid = value.transpose(1, 2).reshape(batch, channels, h, w)
    resized = torch.nn.functional.interpolate(grid.float(), size=dst, mode="bilinear", align_corners=False)
    return resized.to(value.dtype).flatten(2).transpose(1, 2).contiguous()
