"""What `profile` can time: an artifact on one of its backends, or a source checkpoint run eagerly (the graphs
`optimize(pipe)` runs). Each gives the profiler a generation over any variant source."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..capture import Bucket, TensorSpec, input_specs
from ..config import ConfigRequest, PostDiffConfig
from .profile import ProfileResult, build_table, conditioning, device_name, measure, with_result, write_sidecar

ADDED = ("text_embeds", "time_ids", "resolution", "aspect_ratio", "encoder_attention_mask", "timestep_cond")


def _threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def profile_artifact(folder: str | Path, backend: str = "torch", device: str | torch.device | None = None, *,
                     rounds: int = 5, threads: int | None = None, probe: bool = True, sidecar: bool = True,
                     on_stage: Callable[[str], None] | None = None) -> ProfileResult:
    """Profile an artifact folder on `backend`; the table is also written to the folder's costs/ sidecar."""
    from ..runtime.artifact import load

    _threads(threads)
    runner = load(folder, backend, device)
    m = runner.manifest
    specs = [TensorSpec(i["name"], tuple(i["shape"]), getattr(torch, i["dtype"])) for i in m["variants"][0]["inputs"]]
    cond = conditioning(specs, runner.device, runner.dtype, ADDED)
    if not runner.cfg:
        cond["negative_prompt_embeds"] = None
    own = runner.variants

    def generate(source) -> Any:
        runner.variants = source
        try:
            return runner(**cond, seed=0)
        finally:
            runner.variants = own
    with torch.no_grad():
        measured = measure(generate, own, runner.steps, runner.device, rounds, on_stage)
    toolchain = {k: v for k, v in m["toolchain"].items() if isinstance(v, str)}
    table = build_table(measured, device_name=device_name(runner.device), backend=backend, family=m["source"]["family"],
                        dtype=runner.dtype, cache_branch=m["config"].get("cache_branch", 0), toolchain=toolchain,
                        config=m["config"], steps=runner.steps, peak_device=runner.device if probe else None)
    return with_result(measured, table, m["denoiser"]["config"], lambda: generate(own),
                       write_sidecar(Path(folder), table) if sidecar else None)


def profile_source(source: Any, config: PostDiffConfig | ConfigRequest, *, resolution: tuple[int, int] | None = None,
                   steps: int | None = None, dtype: str | None = None, device: str | torch.device = "cpu",
                   rounds: int = 5, threads: int | None = None, probe: bool = True,
                   on_stage: Callable[[str], None] | None = None) -> ProfileResult:
    """Profile a checkpoint (a path, a diffusers folder or a denoiser module) run eagerly, as optimize(pipe) runs it:
    the rewritten graphs of an in-memory variant store, no artifact written."""
    from ..models.load import load_denoiser
    from ..plan import make_plan
    from ..schedulers import make_scheduler
    from ..runtime.denoise import sample
    from ..variants import VariantStore, check_cache_branch

    _threads(threads)
    device = torch.device(device)
    loaded = load_denoiser(source, dtype=dtype)
    family, module = loaded.family, loaded.module.to(device)
    config = config.resolve(family.name) if isinstance(config, ConfigRequest) else config
    height, width = resolution or family.default_resolution
    latent = family.check_resolution(height, width, loaded.source)
    scheduler_config = {**family.scheduler(), "prediction_type": loaded.detection.prediction_type}
    steps = family.check_steps(steps or family.default_steps, scheduler_config, loaded.source)
    cfg = family.classifier_free_guidance
    plan = make_plan(config, steps, family=family, full_latent=latent, prediction_type=loaded.detection.prediction_type,
                     cfg=cfg)
    check_cache_branch(module, config)
    scheduler = make_scheduler(scheduler_config)
    store = VariantStore(module, family)
    specs = input_specs(module, family, Bucket(1, *latent, family.text_length, loaded.dtype))
    cond = conditioning(specs, device, loaded.dtype, ADDED)
    if not cfg:
        cond["negative_prompt_embeds"] = None

    def generate(variants) -> Any:
        generator = torch.Generator(device).manual_seed(0)
        return sample(variants, scheduler, plan, steps, channels=specs[0].shape[1], full_latent=latent, device=device,
                      dtype=loaded.dtype, generator=generator, latent_input=family.latent_input,
                      guidance_scale=7.5 if cfg else 1.0, **cond)
    with torch.no_grad():
        measured = measure(generate, store, steps, device, rounds, on_stage)
    table = build_table(measured, device_name=device_name(device), backend="eager", family=family.name,
                        dtype=loaded.dtype, cache_branch=config.cache_branch, toolchain={"torch": torch.__version__},
                        config=config.to_dict(), steps=steps, peak_device=device if probe else None)
    return with_result(measured, table, loaded.detection.config, lambda: generate(store))
