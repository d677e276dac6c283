"""Every fact about diffusers schedulers that building and running an artifact both need, once.

A build records the scheduler's config in the manifest; a runner rebuilds the same scheduler from it
(`make_scheduler`). The transition between resolutions reads the scheduler's noise levels (`alpha_bars`), in
the latent space it works in (`sigma_space`), and restarts its history at the switch step (`restart`);
`check_scheduler` refuses the schedulers those equations do not describe. `step_kwargs` is what every runner
passes to `scheduler.step`, as diffusers' pipelines do.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PostDiffError
from .kernels.transition_ref import PREDICTION_TYPES

# Stateless schedulers: nothing to restart. Every other scheduler must take set_begin_index, so that its
# step counter lands on the switch step after its history (DPM-Solver++'s model outputs, ...) is cleared by
# set_timesteps. PNDM has neither: its PLMS warm-up repeats the first timestep and cannot start mid-schedule.
STATELESS = ("DDIMScheduler", "DDPMScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler")


def make_scheduler(config: dict, path: Path | None = None) -> Any:
    """The diffusers scheduler a manifest's `scheduler` entry describes; `path` names the manifest in errors."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise PostDiffError(f"unknown scheduler class {config['_class_name'][:100]!r} in the manifest", path)
    try:
        # "flow" is the manifest's word for what the denoiser predicts; flow-matching schedulers have no such setting
        return cls.from_config({k: v for k, v in config.items()
                                if not k.startswith("_") and (k, v) != ("prediction_type", "flow")})
    except Exception as err:   # diffusers refuses bad scheduler settings with several error types
        raise PostDiffError(f"the manifest's {cls.__name__} settings cannot be used: {type(err).__name__}: "
                            f"{str(err)[:200]}", path) from None


def flow_matching(scheduler: Any) -> bool:
    """Whether the scheduler walks the flow-matching path x = (1 - sigma) x0 + sigma noise (SD3, FLUX)."""
    return any(cls.__name__.startswith("FlowMatch") for cls in type(scheduler).__mro__)


def prediction_type(scheduler: Any) -> str:
    """What the denoiser's output means to this scheduler: "flow" (the velocity noise - x0) for flow-matching
    schedulers, else the config's prediction type."""
    return "flow" if flow_matching(scheduler) else scheduler.config.get("prediction_type", "epsilon")


def check_scheduler(scheduler: Any) -> None:
    """Refuse schedulers the transition's equations do not describe, with what to use instead."""
    name = type(scheduler).__name__
    config = scheduler.config
    if flow_matching(scheduler):
        if not hasattr(scheduler, "set_begin_index") or getattr(scheduler, "sigmas", None) is None:
            raise PostDiffError(f"mixed resolution restarts the scheduler at the switch step and reads its sigmas; "
                                f"{name} has no set_begin_index or sigma table; use FlowMatchEulerDiscreteScheduler")
        if config.get("stochastic_sampling") or config.get("invert_sigmas"):
            raise PostDiffError(f"mixed resolution re-noises on the flow path from sigma to the next sigma; {name} "
                                "with stochastic_sampling or invert_sigmas walks another path: turn them off")
        return
    instead = ("; set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) (or DPM-Solver++, Euler, "
               "UniPC), or turn mixed resolution off with low_res_fraction=0")
    if not any(cls.__name__ in STATELESS for cls in type(scheduler).__mro__) and \
            not hasattr(scheduler, "set_begin_index"):
        raise PostDiffError(f"mixed resolution restarts the scheduler at the switch step, and {name} cannot start "
                            f"mid-schedule (no set_begin_index){instead}")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise PostDiffError(f"mixed resolution needs the scheduler's alphas_cumprod; {name} has none{instead}")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES or config.get("use_flow_sigmas"):
        raise PostDiffError(f"mixed resolution re-noises on the diffusion (not flow-matching) path; {name} is "
                            f"configured for {config.get('prediction_type')!r}"
                            f"{' with flow sigmas' if config.get('use_flow_sigmas') else ''}{instead}")


def sigma_space(scheduler: Any) -> bool:
    """Whether the scheduler's latent is x0 + sigma * noise (Euler and the other k-diffusion schedulers)
    rather than x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0


def alpha_bars(scheduler: Any, timesteps: torch.Tensor, step: int) -> tuple[float, float]:
    """abar at step `step` (the last low-resolution one) and at step `step + 1`.

    A scheduler with its own sigma table (Euler, DPM-Solver++, UniPC, ...) is asked for its noise level,
    sigma_i = sqrt((1 - abar) / abar), so Karras, exponential or beta sigmas give the level the scheduler
    really uses (their timesteps are rounded); the others (DDIM, DDPM, LCM) index alphas_cumprod.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(timesteps) + 1:
        return tuple(float(1 / (1 + sigmas[i].double() ** 2)) for i in (step, step + 1))
    return tuple(float(scheduler.alphas_cumprod[int(timesteps[i])]) for i in (step, step + 1))


def transition_levels(scheduler: Any, timesteps: torch.Tensor, step: int) -> tuple[float, float]:
    """The noise levels the transition after step `step` (the last low-resolution one) goes between: the
    scheduler's sigmas at `step` and `step + 1` on the flow path, else its alpha-bars there (`alpha_bars`)."""
    if flow_matching(scheduler):
        sigmas = scheduler.sigmas
        return float(sigmas[step]), float(sigmas[step + 1])
    return alpha_bars(scheduler, timesteps, step)


def set_begin(scheduler: Any, begin: int) -> None:
    """Put the scheduler's step counter at `begin` (a no-op for the stateless ones, which have no counter)."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)


def restart(scheduler: Any, steps: int, begin: int, device: Any = None, timestep_kwargs: dict | None = None) -> None:
    """The restart at the switch step: set_timesteps (with the pipeline's `timestep_kwargs`, the flow pipelines'
    sigmas and shift mu) clears a multistep scheduler's history (the timesteps come out the same), then the
    counter moves to `begin`."""
    scheduler.set_timesteps(steps, device=device, **(timestep_kwargs or {}))
    set_begin(scheduler, begin)


def timestep_kwargs(config: dict, steps: int, image_tokens: int, linspace_sigmas: bool) -> dict:
    """What the flow pipelines pass to `set_timesteps` beside the step count, for an image of `image_tokens`
    tokens: FluxPipeline's sigmas linspace(1, 1/N, N) (unless the scheduler makes its own flow sigmas), and the
    shift mu, linear in the token count, when the scheduler shifts by resolution (FLUX-dev, SD3.5 configs that
    ask for it). Plain floats, so that a manifest holds them exactly. Empty for every other scheduler."""
    kwargs: dict = {}
    if linspace_sigmas and not config.get("use_flow_sigmas"):
        kwargs["sigmas"] = [float(s) for s in np.linspace(1.0, 1 / steps, steps)]
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = shift_mu(config, image_tokens)
    return kwargs


def shift_mu(config: Any, image_tokens: int) -> float:
    """FLUX's (and SD3.5's dynamic-shift) mu: linear in the image's token count between the scheduler config's
    bounds, as the pipelines compute it (diffusers' calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15)))


def scheduler_timesteps(config: dict, steps: int, timing: dict | None = None) -> list[float]:
    """The timesteps of the scheduler `config` describes, set as its pipeline sets them (`timing`: set_timesteps'
    other arguments, `timestep_kwargs`)."""
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(steps, **(timing or {}))
    return [float(t) for t in scheduler.timesteps]


def step_kwargs(scheduler: Any, generator: Any) -> dict:
    """What the runners pass to `scheduler.step`: DDIM's eta = 0 and the generator, where step takes them
    (diffusers' `prepare_extra_step_kwargs` with eta 0)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in accepted}
