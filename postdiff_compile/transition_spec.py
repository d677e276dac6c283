"""The manifest's `transition` entry: what a runtime does between step `switch_step - 1` and step
`switch_step`, exactly, with the numbers of the artifact's own scheduler. docs/manifest.md states the rules;
the entry repeats them so that an artifact explains itself."""
from __future__ import annotations

from .config import PostDiffConfig
from .plan import Transition
from .schedulers import alpha_bars, check_scheduler, flow_matching, make_scheduler, sigma_space, transition_levels


def transition_spec(transition: Transition | None, config: PostDiffConfig, scheduler_config: dict,
                    steps: int, timestep_kwargs: dict | None = None) -> dict | None:
    """The entry for `transition` (None without mixed resolution) at `steps` steps, the scheduler's timesteps
    set with the pipeline's `timestep_kwargs` (the manifest's `set_timesteps`); a runtime with another scheduler
    or step count recomputes the numbers by the rules written here."""
    if transition is None:
        return None
    switch = transition.switch_step
    scheduler = make_scheduler(scheduler_config)   # the one a runner of this artifact builds
    check_scheduler(scheduler)
    scheduler.set_timesteps(steps, **(timestep_kwargs or {}))
    if flow_matching(scheduler):
        return _flow_spec(transition, config, scheduler)
    abar, abar_next = alpha_bars(scheduler, scheduler.timesteps, switch - 1)
    prediction = scheduler_config["prediction_type"]
    return {
        **_sizes(transition, config),
        "timestep_t": int(scheduler.timesteps[switch - 1]), "timestep_next": int(scheduler.timesteps[switch]),
        "alpha_bar_t": abar, "alpha_bar_next": abar_next,
        "alpha_bar_rule": "1 / (1 + sigma_i^2) from the scheduler's sigma table at steps switch-1 and switch when it "
                          "has one (Euler, DPM-Solver++, UniPC), else alphas_cumprod[timestep]",
        "latent_space": "sigma" if sigma_space(scheduler) else "vp",
        "latent_space_rule": "sigma: x_t = x * sqrt(abar_t) before the transition, x = x_next / sqrt(abar_next) after",
        "compute_dtype": "float32",
        "prediction_type": prediction,
        "x0": {"epsilon": "(x_t - sqrt(1 - abar_t) * out) / sqrt(abar_t)",
               "v_prediction": "sqrt(abar_t) * x_t - sqrt(1 - abar_t) * out", "sample": "out"}[prediction],
        "eps": {"epsilon": "out", "v_prediction": "sqrt(abar_t) * out + sqrt(1 - abar_t) * x_t",
                "sample": "(x_t - sqrt(abar_t) * x0) / sqrt(1 - abar_t)"}[prediction],
        "formula": "x_next = sqrt(abar_next) * up(x0) + sqrt(1 - abar_next) * noise",
        **_common(config),
    }


def _flow_spec(transition: Transition, config: PostDiffConfig, scheduler) -> dict:
    """The flow-matching entry (SD3, FLUX): x_sigma = (1 - sigma) x0 + sigma noise, the model predicts the
    velocity noise - x0; the levels are the scheduler's sigmas at steps switch-1 and switch."""
    switch = transition.switch_step
    sigma, sigma_next = transition_levels(scheduler, scheduler.timesteps, switch - 1)
    return {
        **_sizes(transition, config),
        "timestep_t": float(scheduler.timesteps[switch - 1]), "timestep_next": float(scheduler.timesteps[switch]),
        "sigma_t": sigma, "sigma_next": sigma_next,
        "sigma_rule": "the scheduler's sigmas[switch-1] and sigmas[switch], after set_timesteps(steps, "
                      "**set_timesteps) (the manifest's set_timesteps: the pipeline's sigmas and shift mu)",
        "latent_space": "flow",
        "compute_dtype": "float32",
        "prediction_type": "flow",
        "x0": "x_t - sigma_t * out", "eps": "x_t + (1 - sigma_t) * out",
        "formula": "x_next = (1 - sigma_next) * up(x0) + sigma_next * noise",
        **_common(config),
    }


def _sizes(transition: Transition, config: PostDiffConfig) -> dict:
    return {"switch_step": transition.switch_step,   # the first full-resolution step; switch - 1 ends with the transition
            "low_res_scale": config.low_res_scale, "low_res_fraction": config.low_res_fraction,
            "low_latent_size": list(transition.low_latent), "full_latent_size": list(transition.full_latent)}


def _common(config: PostDiffConfig) -> dict:
    return {
        "clamp_x0": config.clamp_x0,    # > 0: x0 clamped to [-c, c] before the upsample; eps from the unclamped x0
        "upsample": {"mode": "bilinear", "align_corners": False,
                     "rule": "per axis, scale = in / out in float32, src = max((o + 0.5) * scale - 0.5, 0), "
                             "i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0"},
        "renoise": config.renoise,      # fresh: new noise; predicted: up(eps)
        "noise": "fresh: randn(full shape) from the pipeline's generator at the switch, right after the steps' own "
                 "draws (one tensor per generator for a generator list); on CUDA without a generator, Philox "
                 "tl.randn(seed, linear index) inside the kernel",
        "scheduler_restart": "set_timesteps again (with set_timesteps' arguments), then set_begin_index(switch_step): "
                             "multistep history starts afresh",
        "caches": {"cross_attn": "each [B, tokens, C] cache back to its grid (the latent with each side halved, "
                                 "rounding up, until the token count matches), bilinear as above to the same level "
                                 "of the full latent, flattened row-major",
                   "deepcache": "dropped: the switch step is a full step"},
        "op": "postdiff::resolution_transition",
    }
