"""Which of the scheduler's timesteps a call runs, as the diffusers pipelines choose them: img2img's `strength`, and
SDXL's `denoising_end` (a base that hands over to a refiner) and `denoising_start` (the refiner). Each returns a
function from the scheduler's timesteps to (start, stop), the window plan.build_plan restricts the plan to."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Window = Callable[[torch.Tensor], tuple[int, int]]


def valid_fraction(value: Any) -> bool:
    """diffusers' denoising_value_valid: a float strictly between 0 and 1 (anything else is ignored)."""
    return isinstance(value, float) and 0 < value < 1


def _cutoff(scheduler: Any, fraction: float) -> int:
    train = scheduler.config.num_train_timesteps
    return int(round(train - fraction * train))


def strength_window(scheduler: Any, strength: float) -> Window:
    """diffusers' get_timesteps for `strength` (the last int(steps * strength) steps)."""
    def window(timesteps: torch.Tensor) -> tuple[int, int]:
        order = getattr(scheduler, "order", 1)
        steps = len(timesteps) // order
        start = max(steps - min(int(steps * strength), steps), 0) * order
        return start, len(timesteps)
    return window


def denoising_window(scheduler: Any, strength: float, start: float | None, end: float | None) -> Window:
    """SDXL img2img's choice: `denoising_start` (the timesteps below its cutoff; one more for a second-order
    scheduler cut between its two calls) or else `strength`, then `denoising_end` (the timesteps at or above its
    cutoff). Without an image: strength 1.0 (StableDiffusionXLPipeline, which has no denoising_start)."""
    def window(timesteps: torch.Tensor) -> tuple[int, int]:
        if valid_fraction(start):
            count = int((timesteps < _cutoff(scheduler, start)).sum())
            if getattr(scheduler, "order", 1) == 2 and count % 2 == 0:
                count += 1
            first = len(timesteps) - count
        else:
            first = strength_window(scheduler, strength)(timesteps)[0]
        last = len(timesteps)
        if valid_fraction(end):
            last = first + sum(1 for t in timesteps[first:] if t >= _cutoff(scheduler, end))
        return first, last
    return window
