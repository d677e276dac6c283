"""How far one set of outputs is from another: the measure every build check, test and benchmark uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verification:
    max_abs_error: float
    rel_l2_error: float
    seed: int

    def to_json(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "rel_l2_error": self.rel_l2_error, "inputs_seed": self.seed}


def rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, the error measure used throughout the tests."""
    got, expected = got.double(), expected.double()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def compare_outputs(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], seed: int) -> Verification:
    """An exported graph's outputs (on any backend) against the torch variant's; the worst output counts."""
    pairs = [(g.detach().cpu().float(), e.detach().cpu().float()) for g, e in zip(got, expected)]
    return Verification(max(float((g - e).abs().max()) for g, e in pairs), max(rel_l2(g, e) for g, e in pairs), seed)
