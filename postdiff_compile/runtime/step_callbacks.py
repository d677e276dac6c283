"""`callback_on_step_end` and `pipe._interrupt` as diffusers' pipelines define them, for the optimized loop.

diffusers calls `callback_on_step_end(pipe, i, t, callback_kwargs)` after each scheduler step, with the tensors
`callback_on_step_end_tensor_inputs` names taken from the loop's locals, and uses the `latents` the callback
returns; a step that starts with `pipe.interrupt` true is skipped (the loop goes on to the end and decodes what
it has). Here the same, at every step of the plan: on the low-resolution steps of mixed resolution `latents` has
the low-resolution shape, and the step before the switch hands the callback the full-resolution latents the
transition made. An interrupt before the switch leaves low-resolution latents, which decode to a smaller image.

The embeddings are offered as diffusers' loop holds them (`prompt_embeds` is the CFG batch's [negative, positive]
when the call uses guidance) but only to be read: the plan, its caches and its CFG steps were made for the call's
embeddings, so a callback that returns other embeddings (diffusers' SDCFGCutoffCallback does) is refused.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import PostDiffError

# What the optimized loop can hand a callback; the pipeline class may list more (SDXL's add_time_ids, ...).
_READ_ONLY = ("prompt_embeds", "negative_prompt_embeds")
OFFERED = ("latents", *_READ_ONLY)


def _tensor_inputs(pipe: Any, callback: Any, names: list[str] | None) -> list[str]:
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs      # as diffusers: the callback object says what it reads
    names = list(names if names is not None else ["latents"])
    allowed = getattr(pipe, "_callback_tensor_inputs", OFFERED)
    wrong = [k for k in names if k not in allowed]
    if wrong:
        raise PostDiffError(f"callback_on_step_end_tensor_inputs has to be in {list(allowed)}, but found {wrong}")
    unsupported = [k for k in names if k not in OFFERED]
    if unsupported:
        raise PostDiffError(f"callback_on_step_end_tensor_inputs: the postdiff runtime hands a callback "
                            f"{', '.join(OFFERED)}; not {', '.join(unsupported)}")
    return names


def step_callback(pipe: Any, callback: Any, names: list[str] | None, cfg: bool, prompt_embeds: torch.Tensor,
                  negative_prompt_embeds: torch.Tensor | None) -> Callable[[int, Any, torch.Tensor], torch.Tensor]:
    """(step index, timestep, latents) -> latents: runs `callback` as diffusers runs it after a step."""
    names = _tensor_inputs(pipe, callback, names)
    held = {"prompt_embeds": torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds}

    def after_step(index: int, t: Any, latents: torch.Tensor) -> torch.Tensor:
        given = {k: latents if k == "latents" else held[k] for k in names}
        outputs = callback(pipe, index, t, dict(given))
        if not isinstance(outputs, dict):
            raise PostDiffError(f"callback_on_step_end must return a dict (diffusers' contract); it returned "
                                f"{type(outputs).__name__} at step {index}")
        changed = [k for k in _READ_ONLY if k in outputs and outputs[k] is not held[k]]
        if changed:
            raise PostDiffError(f"callback_on_step_end returned new {', '.join(changed)} at step {index}: the postdiff "
                                "runtime planned its caches and CFG steps for the call's embeddings and does not "
                                "take others mid-run")
        new = outputs.get("latents", latents)
        if new is not latents and tuple(new.shape) != tuple(latents.shape):
            raise PostDiffError(f"callback_on_step_end returned latents of shape {tuple(new.shape)} at step {index}; "
                                f"the loop holds {tuple(latents.shape)}")
        return new

    return after_step


def start_call(pipe: Any, guidance_scale: float, steps: int) -> Callable[[], bool]:
    """Set the attributes diffusers' `__call__` sets for callbacks to read; returns `pipe.interrupt`'s reader."""
    pipe._guidance_scale = guidance_scale
    pipe._num_timesteps = steps
    pipe._interrupt = False
    return lambda: bool(getattr(pipe, "_interrupt", False))
