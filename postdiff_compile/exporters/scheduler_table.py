"""The scheduler as a table of coefficients, for runtimes without diffusers (the C++ runner).

The diffusers schedulers an artifact uses (DDIM with eta 0, Euler, DPM-Solver++, LCM, PNDM, UniPC ...)
update the latent as a fixed linear combination of tensors they have seen: the latents each step
started from, the model outputs of the steps so far, and the noise they draw. The coefficients depend
only on the step count, so they are found once, at build time, by running the scheduler itself on unit
vectors (one per tensor), and written into the manifest. A runtime then needs no scheduler code:

    basis = []                                      (one per segment)
    each step: x = latents * input_scale (for the model)
               basis += [latents, guided model output]
               basis += [randn(latent shape) for each of the step's noise draws]
               latents = sum(c * basis[k] for k, c in update)
    the last low-resolution step runs the transition instead, and a new segment (an empty basis) starts.

DDIM's update reads two entries (this step's latents and output), a second-order multistep solver four.

One nonlinearity is common enough to carry: `clip_sample` (DDIM, DDPM; the embedded reference model uses
it) clamps the predicted x0 before the update. Such a row adds `clip`: x0 as coefficients over the same basis,
the range r and the weight w with which x0 enters the update, and the runtime adds
w * (clamp(x0, -r, r) - x0). Anything else that is not linear (thresholding) gets no table: the build checks
every table against the scheduler itself on random tensors and records why it cannot be used.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any
from unittest import mock

import torch

from ..verification import rel_l2
from ..schedulers import make_scheduler, restart, step_kwargs

TABLE_TOLERANCE = 1e-5


class _Basis:
    """Unit vectors of a segment's tensors, as [1, N, 1, 1] tensors the scheduler treats elementwise."""

    def __init__(self, size: int):
        self.size, self.count = size, 0

    def new(self) -> torch.Tensor:
        if self.count == self.size:
            raise RuntimeError("scheduler table: more tensors in one segment than expected")
        unit = torch.zeros(1, self.size, 1, 1)
        unit[0, self.count] = 1.0
        self.count += 1
        return unit


@contextlib.contextmanager
def _noise_from(scheduler: Any, draw):
    """Route the scheduler's own noise draws (LCM, ancestral samplers) through `draw`."""
    module = importlib.import_module(type(scheduler).__module__)
    if hasattr(module, "randn_tensor"):
        with mock.patch.object(module, "randn_tensor", lambda shape, **kwargs: draw(shape, kwargs)):
            yield
    else:
        yield


def _clip_weight(linear: Any, clipped: Any, t, x0_of_sample: float, x0_of_output: float, r: float) -> float:
    """The weight of x0 in the update: the clipping scheduler against its linear twin (copies of both, at
    this step) on one-element tensors whose x0 is 10 r, without noise."""
    linear, clipped = copy.deepcopy(linear), copy.deepcopy(clipped)
    sample, output = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    if x0_of_sample:
        sample.fill_(10 * r / x0_of_sample)
    else:   # prediction_type "sample": x0 is the model output
        output.fill_(10 * r / x0_of_output)
    outs = []
    for scheduler in (linear, clipped):
        with _noise_from(scheduler, lambda shape, kwargs: torch.zeros(shape)):
            outs.append(float(scheduler.step(output, t, sample, **step_kwargs(scheduler, None),
                                             return_dict=False)[0].reshape(())))
    return (outs[1] - outs[0]) / (r - 10 * r)


def _input_scale(scheduler: Any, t) -> float:
    """What scale_model_input multiplies the latents by at `t` (flow-matching schedulers have no such step: 1)."""
    if not hasattr(scheduler, "scale_model_input"):
        return 1.0
    return float(scheduler.scale_model_input(torch.ones(1, 1, 1, 1), t).reshape(()))


def probe(scheduler: Any, steps: int, switch: int, clipped: Any = None, timing: dict | None = None) -> dict:
    """The table of `scheduler` at `steps` steps, with the transition after step `switch - 1` (0 = none).

    `clipped`: the same scheduler with clip_sample on, when `scheduler` is its twin with it off; rows then
    carry the clamp (module docstring). `timing`: set_timesteps' other arguments (the manifest's set_timesteps)."""
    timing = timing or {}
    scheduler.set_timesteps(steps, **timing)
    if clipped is not None:
        clipped.set_timesteps(steps, **timing)
    timesteps = scheduler.timesteps
    size = 3 * steps + 2
    basis = _Basis(size)
    draws: list[int] = []

    def draw(shape, kwargs):
        draws.append(1)
        return basis.new().to(kwargs.get("dtype") or torch.float32)

    rows = []
    extra = step_kwargs(scheduler, None)
    for index in range(min(steps, len(timesteps))):
        t = timesteps[index]
        scale = _input_scale(scheduler, t)
        row = {"index": index, "timestep": float(t.to(torch.float32)), "input_scale": scale}
        if switch and index == switch - 1:
            rows.append({**row, "transition": True, "noise_draws": 0, "update": []})
            for s in (scheduler, clipped):
                if s is not None:
                    restart(s, steps, switch, timestep_kwargs=timing)
            basis = _Basis(size)
            continue
        at = basis.count        # this step's latents and output are basis[at] and basis[at + 1]
        latents = basis.new()   # the runtime keeps the latents of every step: no need to carry coefficients
        output = basis.new()
        clip = None
        if clipped is not None:
            clipped.scale_model_input(torch.ones(1, 1, 1, 1), t)
            before = copy.deepcopy(scheduler)
        draws.clear()
        with _noise_from(scheduler, draw):
            result = scheduler.step(output, t, latents, **extra, return_dict=clipped is not None)
        if clipped is not None:
            # DDIM and DDPM name their x0 prediction; LCM's second output is its `denoised` mix, not x0, so it
            # gets no table (AttributeError) rather than a clamp in the wrong place.
            x0 = result.pred_original_sample.float().reshape(-1)
            result = (result.prev_sample,)
            r = float(clipped.config.clip_sample_range)
            weight = _clip_weight(before, clipped, t, float(x0[at]), float(x0[at + 1]), r)
            with _noise_from(clipped, lambda shape, kwargs: torch.zeros(shape)):
                clipped.step(torch.zeros(1, 1, 1, 1), t, torch.zeros(1, 1, 1, 1), **extra)   # keep in step
            clip = {"range": r, "weight": weight, "x0": [[k, float(x0[k])] for k in range(basis.count) if float(x0[k])]}
        coefficients = result[0].float().reshape(-1)
        update = [[k, float(coefficients[k])] for k in range(basis.count) if float(coefficients[k]) != 0.0]
        rows.append({**row, "transition": False, "noise_draws": len(draws), "update": update,
                     **({"clip": clip} if clip else {})})
    return {"init_noise_sigma": _init_noise_sigma(scheduler), "steps": rows}


def _init_noise_sigma(scheduler: Any) -> float:
    return float(getattr(scheduler, "init_noise_sigma", 1.0))   # flow-matching schedulers start from plain noise


def evaluate(table: dict, latents: torch.Tensor, outputs: list[torch.Tensor], generator: torch.Generator,
             transitions: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Walk the table in float32: `outputs[i]` is step i's guided model output, `transitions` the latents
    each transition returns (in order), noise drawn in the artifact's `dtype`. The readable reference of what
    the C++ runner does."""
    basis: list[torch.Tensor] = []
    latents = latents.float()
    restarts = iter(transitions)
    for row in table["steps"]:
        if row["transition"]:
            latents = next(restarts).float()
            basis = []
            continue
        basis += [latents, outputs[row["index"]].float()]
        for _ in range(row["noise_draws"]):
            basis.append(torch.randn(latents.shape, generator=generator, dtype=dtype).float())
        latents = sum((c * basis[k] for k, c in row["update"]), torch.zeros_like(latents))
        if "clip" in row:
            clip = row["clip"]
            x0 = sum((c * basis[k] for k, c in clip["x0"]), torch.zeros_like(latents))
            latents = latents + clip["weight"] * (x0.clamp(-clip["range"], clip["range"]) - x0)
    return latents


def check_table(scheduler: Any, steps: int, switch: int, table: dict, seed: int = 0, timing: dict | None = None) -> float:
    """Relative L2 error of the table against the scheduler on random latents and model outputs."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 4, 8, 8)
    start = torch.randn(shape, generator=gen)
    outputs = [torch.randn(shape, generator=gen) for _ in range(steps)]
    restart_latents = [torch.randn(shape, generator=gen)] if switch else []
    scheduler.set_timesteps(steps, **(timing or {}))
    timesteps = scheduler.timesteps
    noise_gen = torch.Generator().manual_seed(seed + 1)
    extra = step_kwargs(scheduler, noise_gen)
    latents = start
    for index in range(min(steps, len(timesteps))):
        t = timesteps[index]
        _input_scale(scheduler, t)   # some schedulers count steps in it
        if switch and index == switch - 1:
            latents = restart_latents[0]
            restart(scheduler, steps, switch, timestep_kwargs=timing)
            continue
        latents = scheduler.step(outputs[index], t, latents, **extra, return_dict=False)[0]
    got = evaluate(table, start, outputs, torch.Generator().manual_seed(seed + 1), restart_latents)
    return rel_l2(got, latents.float())


def scheduler_table(scheduler_config: dict, steps: int, switch: int, timing: dict | None = None) -> dict:
    """The manifest's `scheduler_table`: the coefficients, or null ones with the reason they cannot be used.
    `timing`: what the pipeline passes to set_timesteps beside the step count (schedulers.timestep_kwargs)."""

    name = scheduler_config["_class_name"]
    clips = bool(scheduler_config.get("clip_sample")) and not scheduler_config.get("thresholding")
    try:
        if clips:   # the linear twin, and the clipping scheduler for the clamp's weight
            table = probe(make_scheduler({**scheduler_config, "clip_sample": False}), steps, switch,
                          make_scheduler(scheduler_config), timing)
        else:
            table = probe(make_scheduler(scheduler_config), steps, switch, timing=timing)
        error = check_table(make_scheduler(scheduler_config), steps, switch, table, timing=timing)
    except Exception as err:   # no pred_original_sample, a step that refuses unit vectors, ...: no table, not no artifact
        table, error = {"init_noise_sigma": _init_noise_sigma(make_scheduler(scheduler_config))}, float("inf")
        cause = f"probing it failed ({type(err).__name__}: {err})"
    else:
        cause = (f"it is not linear in the latent and the model output (thresholding?): the table differs from "
                 f"it by relative L2 {error:.3g}")
    if not error <= TABLE_TOLERANCE:
        return {"steps": None, "init_noise_sigma": table["init_noise_sigma"],
                "reason": f"{name} with this configuration cannot be written as a coefficient table: {cause}",
                "verification": {"rel_l2_error": error if error < float("inf") else None,
                                 "tolerance": TABLE_TOLERANCE}}
    return {**table, "reason": None,
            "verification": {"rel_l2_error": error, "tolerance": TABLE_TOLERANCE,
                             "reference": f"diffusers {name}.step on random tensors"}}
