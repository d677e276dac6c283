"""The scheduler as a coefficient table (exporters/scheduler_table.py) against diffusers' own schedulers.

Each case runs the diffusers scheduler the way the runners do (scale_model_input, step with eta 0 and a
generator, the restart at a resolution switch) on random latents and model outputs, and walks the table
over the same tensors with the same noise generator. The loop here is written out independently of the
module's own build-time check.
"""
import json
from pathlib import Path

import pytest
import torch

from postdiff_compile.verification import rel_l2
from postdiff_compile.exporters.scheduler_table import evaluate, scheduler_table
from postdiff_compile.schedulers import make_scheduler

CONFIGS = Path(__file__).parent.parent / "postdiff_compile" / "models" / "configs"
SD15 = json.loads((CONFIGS / "sd15_scheduler.json").read_text())
# scenes32: DDIM with clip_sample. sd3, flux: FlowMatchEuler (no scale_model_input, FLUX-dev's shift mu).
BUNDLED = sorted(p.name for p in CONFIGS.glob("*_scheduler.json"))
# Other schedulers people put in SD pipelines: multistep history (PNDM, UniPC, DPM-Solver++), sigma-space
# input scaling (Euler), noise drawn inside step (Euler ancestral, DDPM, LCM).
CLASSES = ["PNDMScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler",
           "EulerDiscreteScheduler", "DDPMScheduler", "LCMScheduler"]


def pipeline_timing(name: str, config: dict, steps: int) -> dict:
    """What FluxPipeline passes to set_timesteps for a 64x64 latent (1024 tokens): its sigmas, and mu where the
    scheduler shifts by resolution; nothing for the others. Written from the pipeline, not from schedulers.py."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if not name.startswith("flux"):
        return {}
    timing = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
    if config.get("use_dynamic_shifting"):
        timing["mu"] = calculate_shift(1024, config["base_image_seq_len"], config["max_image_seq_len"],
                                       config["base_shift"], config["max_shift"])
    return timing


def diffusers_run(config: dict, steps: int, switch: int, seed: int, timing: dict | None = None):
    """(start latents, model outputs, restart latents, final latents) of diffusers' scheduler on random data."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 4, 6, 5)
    start = torch.randn(shape, generator=gen)
    outputs = [torch.randn(shape, generator=gen) for _ in range(steps)]
    restart = [torch.randn(shape, generator=gen)] if switch else []
    scheduler = make_scheduler(config)
    timing = timing or {}
    scheduler.set_timesteps(steps, **timing)
    noise = torch.Generator().manual_seed(seed + 100)
    kwargs = {"eta": 0.0, "generator": noise}
    import inspect
    kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(scheduler.step).parameters}
    latents = start
    scaled = []
    for i, t in enumerate(scheduler.timesteps[:steps]):
        scaled.append(scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents)
        if switch and i == switch - 1:
            latents = restart[0]
            scheduler.set_timesteps(steps, **timing)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(switch)
            continue
        latents = scheduler.step(outputs[i], t, latents, **kwargs, return_dict=False)[0]
    return start, outputs, restart, latents, scaled


def check(config: dict, steps: int, switch: int, seed: int = 0, timing: dict | None = None) -> dict:
    timing = timing or {}
    table = scheduler_table(config, steps, switch, {k: [float(x) for x in v] if k == "sigmas" else float(v)
                                                    for k, v in timing.items()})
    assert table["reason"] is None and table["steps"] is not None
    start, outputs, restart, expected, _ = diffusers_run(config, steps, switch, seed, timing)
    got = evaluate(table, start, outputs, torch.Generator().manual_seed(seed + 100), restart)
    assert rel_l2(got, expected) <= 1e-5
    # The table is not trivially right: other model outputs give other latents.
    other = evaluate(table, start, [o.flip(-1) for o in outputs], torch.Generator().manual_seed(seed + 100), restart)
    assert rel_l2(other, expected) > 1e-3
    return table


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("steps,switch", [(20, 0), (20, 8), (4, 2)])
def test_bundled_schedulers(name, steps, switch):
    config = json.loads((CONFIGS / name).read_text())
    check(config, steps, switch, timing=pipeline_timing(name, config, steps))


@pytest.mark.parametrize("cls", CLASSES)
def test_other_scheduler_classes(cls):
    switch = 0 if cls == "PNDMScheduler" else 6   # PNDM cannot restart mid-schedule (transition.py refuses it)
    check({**SD15, "_class_name": cls}, 15, switch, seed=3)


def test_rows_carry_timesteps_input_scales_and_noise_draws():
    euler = json.loads((CONFIGS / "sdxl_scheduler.json").read_text())
    table = check(euler, 10, 4)
    scheduler = make_scheduler(euler)
    scheduler.set_timesteps(10)
    assert [r["timestep"] for r in table["steps"]] == [float(t) for t in scheduler.timesteps.float()]
    assert table["init_noise_sigma"] == pytest.approx(float(scheduler.init_noise_sigma))
    _, _, _, _, scaled = diffusers_run(euler, 10, 4, 0)
    start = diffusers_run(euler, 10, 4, 0)[0]
    assert table["steps"][0]["input_scale"] == pytest.approx(float((scaled[0] / start).mean()), rel=1e-6)
    sigma = float(scheduler.sigmas[0])
    assert table["steps"][0]["input_scale"] == pytest.approx((sigma ** 2 + 1) ** -0.5, rel=1e-6)   # Euler's rule
    assert table["steps"][0]["input_scale"] < 0.2
    assert [r["transition"] for r in table["steps"]] == [i == 3 for i in range(10)]
    # DDIM: two terms per step (this step's latents and output); LCM draws one noise tensor per step but the last.
    ddim = check(SD15, 10, 0)
    assert all(len(r["update"]) == 2 and r["noise_draws"] == 0 for r in ddim["steps"])
    lcm = check(json.loads((CONFIGS / "lcm_scheduler.json").read_text()), 4, 0)
    assert [r["noise_draws"] for r in lcm["steps"]] == [1, 1, 1, 0]


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clip_sample_is_carried_as_a_clamp_of_x0(cls, prediction_type):
    config = {**SD15, "_class_name": cls, "clip_sample": True, "clip_sample_range": 0.8,
              "prediction_type": prediction_type}
    table = check(config, 12, 5, seed=4)
    rows = [r for r in table["steps"] if not r["transition"]]
    assert all(r["clip"]["range"] == 0.8 for r in rows)
    # The clamp matters on these inputs: without it the table would be the unclipped scheduler's.
    start, outputs, restart, expected, _ = diffusers_run(config, 12, 5, 4)
    unclipped = {**table, "steps": [{k: v for k, v in r.items() if k != "clip"} for r in table["steps"]]}
    got = evaluate(unclipped, start, outputs, torch.Generator().manual_seed(104), restart)
    assert rel_l2(got, expected) > 1e-2


def test_a_nonlinear_scheduler_gets_no_table_and_a_reason():
    thresholded = {**SD15, "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.0}
    table = scheduler_table(thresholded, 20, 0)
    assert table["steps"] is None
    assert "DDIMScheduler" in table["reason"] and "not linear" in table["reason"]
    # LCM's clip_sample clamps x0 inside a mix the step does not return: refused, not clamped in the wrong place.
    lcm = scheduler_table({**SD15, "_class_name": "LCMScheduler", "clip_sample": True}, 4, 0)
    assert lcm["steps"] is None and "LCMScheduler" in lcm["reason"]
    assert table["verification"]["rel_l2_error"] > 1e-2
