"""Captured variants of one denoiser, made on first use for each bucket (batch, latent size, text length)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..capture import Bucket, Captured, capture
from ..models.families import FamilySpec


class VariantStore:
    def __init__(self, denoiser: torch.nn.Module, family: FamilySpec):
        self.denoiser = denoiser
        self.family = family
        self.captured: dict[tuple[str, Bucket], Captured] = {}
        self._modules: dict[tuple[str, Bucket], torch.nn.Module] = {}

    def get(self, name: str, bucket: Bucket) -> Callable[..., torch.Tensor]:
        key = (name, bucket)
        if key not in self._modules:
            if name != "full":
                raise KeyError(f"variant {name!r} is not built by this version")
            self.captured[key] = capture(self.denoiser, self.family, bucket)
            self._modules[key] = self.captured[key].module()
        return self._modules[key]
