"""Conditioning tensors a runtime derives itself rather than taking from the user.

The guidance embedding of consistency-distilled (LCM) U-Nets is computed from the guidance scale exactly
as diffusers' pipelines compute it (`get_guidance_scale_embedding`, the sinusoidal embedding of
1000 * (w - 1)); an artifact runner has no pipeline object to ask, so the formula lives here.
"""
from __future__ import annotations

import torch


def guidance_embedding(guidance_scale: float, batch: int, dim: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, dim]: sin and cos of 1000 * (guidance_scale - 1) at dim / 2 log-spaced frequencies."""
    # float32 throughout, in diffusers' order of operations, so the embedding is the same to the bit.
    w = torch.tensor(float(guidance_scale) - 1.0).repeat(batch) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(device=device, dtype=dtype)
