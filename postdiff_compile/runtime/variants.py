"""Variants of one denoiser, made on first use: one capture per bucket, rewritten per variant."""
from __future__ import annotations

import torch

from ..capture import Bucket, Captured, capture
from ..models.families import FamilySpec
from ..variants import Variant, VariantSpec, build_variant


class VariantStore:
    def __init__(self, denoiser: torch.nn.Module, family: FamilySpec):
        self.denoiser = denoiser
        self.family = family
        self.captured: dict[Bucket, Captured] = {}
        self._roots: dict[Bucket, torch.nn.Module] = {}
        self._variants: dict[tuple[str, int, Bucket], Variant] = {}

    def get(self, name: str, bucket: Bucket, cache_branch: int = 0) -> Variant:
        spec = VariantSpec.parse(name)
        if spec.deep == "full" and not spec.write_deepcache:
            cache_branch = 0   # the branch only matters to DeepCache variants; share the others
        key = (spec.name, cache_branch, bucket)
        if key not in self._variants:
            if bucket not in self.captured:
                self.captured[bucket] = capture(self.denoiser, self.family, bucket)
                self._roots[bucket] = self.captured[bucket].module()
            self._variants[key] = build_variant(self.captured[bucket], spec, cache_branch, self._roots[bucket])
        return self._variants[key]
