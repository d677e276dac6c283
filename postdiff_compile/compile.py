"""Source checkpoint -> artifact folder: load, plan, capture each variant, verify it, write it atomically.

This module orchestrates; the variants are built in variant_build.py, each format is written by its module
through exporters/formats.py, and the transition entry comes from transition_spec.py.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigRequest, PostDiffConfig
from .controlnet_build import build_controlnets, controlnet_tensors
from .errors import naming
from .exporters.atomic_dir import atomic_dir
from .exporters.formats import DEFAULT_FORMATS, Build, check_available, parse_formats
from .exporters.manifest import sha256_file, toolchain, write_manifest
from .exporters.scheduler_table import scheduler_table
from .fastest import resolve_request
from .models.load import load_denoiser
from .plan import make_plan
from .schedulers import scheduler_timesteps, timestep_kwargs
from .transition_spec import transition_spec
from .variant_build import VariantBuilder, batch_buckets, plan_ids, reference_of, variant_ids, window_plans
from .variants import check_cache_branch
from .version import __version__

# An exported graph runs the same ATen ops as eager, so anything above float noise is a capture bug.
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


class Progress:
    """Callbacks for long stages; the CLI draws them with rich, the library default is silent."""

    def stage(self, name: str, total: float | None = None) -> Callable[[float], None]:
        return lambda advance: None

    def done(self, name: str) -> None:
        pass


@dataclass
class CompileResult:
    out: Path
    manifest: dict
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def compile_artifact(source: Any, config: PostDiffConfig | ConfigRequest, out: str | Path, *,
                     resolution: tuple[int, int] | None = None, steps: int | None = None, force: bool = False,
                     dtype: str | None = None, prediction_type: str | None = None, progress: Progress | None = None,
                     formats: str | tuple[str, ...] = DEFAULT_FORMATS, max_batch: int = 1,
                     family: str | None = None, controlnets: tuple = ()) -> CompileResult:
    """Compile `source` (a checkpoint path, a diffusers folder or a denoiser module) with `config` into the
    artifact folder `out`, written in a temporary folder beside it and moved into place when complete; with
    `max_batch` > 1 every variant also for calls of up to that many images (variant_build.batch_buckets);
    `family` overrides detection (load_denoiser); `controlnets` (ControlNetModel modules, one image per call) are
    exported beside the variants, which then take their residuals (controlnet_build.py)."""
    out, formats, batches = Path(out), parse_formats(formats), batch_buckets(max_batch)
    # The target's lock and a writable temporary folder beside it before any slow work: a second compile into
    # the same folder, or an unusable location, fails now with one error.
    with atomic_dir(out, force) as tmp:
        start = time.perf_counter()
        stages: dict[str, float] = {}
        manifest = _compile_into(tmp, source, config, resolution=resolution, steps=steps, dtype=dtype,
                                 prediction_type=prediction_type, family=family, formats=formats, batches=batches,
                                 timed=timer(progress or Progress(), stages), stages=stages,
                                 controlnets=list(controlnets))
        return CompileResult(out, manifest, time.perf_counter() - start, stages)


def timer(progress: Progress, stages: dict[str, float]):
    @contextlib.contextmanager
    def timed(name: str, total: float | None = None):
        t = time.perf_counter()
        yield progress.stage(name, total)
        stages[name] = time.perf_counter() - t
        progress.done(name)
    return timed


def _compile_into(tmp: Path, source: Any, config: PostDiffConfig | ConfigRequest, *, resolution, steps, dtype,
                  prediction_type, family, formats: tuple[str, ...], batches: tuple[int, ...], timed,
                  stages: dict[str, float], controlnets: list) -> dict:
    check_available(formats)
    with timed("load"):
        loaded = load_denoiser(source, dtype=dtype, prediction_type=prediction_type, family=family)
    family = loaded.family
    height, width = resolution or family.default_resolution
    full_latent = family.check_resolution(height, width, loaded.source)
    scheduler = {**family.scheduler(), "prediction_type": loaded.detection.prediction_type}
    steps = family.check_steps(steps or family.default_steps, scheduler, loaded.source)
    config = resolve_request(config, family, steps=steps, resolution=(height, width),   # with a cost table: for its device
                             denoiser_config=loaded.detection.config)
    timing = timestep_kwargs(scheduler, steps, full_latent[0] * full_latent[1] // family.latent_multiple ** 2,
                             family.kind.linspace_sigmas)   # what the pipeline gives set_timesteps (FLUX, SD3.5)
    with naming(loaded.source):   # before any slow work: a plan or a transition that cannot run
        def plan_for(window=None):
            return make_plan(config, steps, family=family, full_latent=full_latent, window=window,
                             cfg=family.classifier_free_guidance, prediction_type=loaded.detection.prediction_type,
                             timesteps=scheduler_timesteps(scheduler, steps, timing))
        plan, windows = plan_for(), tuple(window_plans(plan_for, steps, family))
        check_cache_branch(loaded.module, config)
        transition = transition_spec(plan.transition, config, scheduler, steps, timing)
    table = scheduler_table(scheduler, steps, plan.switch_step, timing)   # never fails the build (null: says why)
    dtype_name = str(loaded.dtype).removeprefix("torch.")
    with timed("hash source", sum(p.stat().st_size for p in loaded.files)) as advance:
        hashes = [{"file": str(p), "sha256": sha256_file(p, advance), "bytes": p.stat().st_size} for p in loaded.files]

    device = next(loaded.module.parameters()).device
    build = Build(folder=tmp, formats=formats, device=device, dtype_name=dtype_name,
                  tolerance=VERIFY_TOLERANCE[dtype_name], reference=reference_of(loaded.dtype, device),
                  source=loaded.source, timed=timed, stages=stages)
    builder = VariantBuilder(loaded.module, family, build, config.cache_branch, controlnet=bool(controlnets))
    with build:
        build.write_weights(loaded.module, controlnet_tensors(controlnets))
        # the ControlNet graphs first: a ControlNet that does not fit the U-Net fails before the variants' work
        nets = build_controlnets(controlnets, plan, full_latent, family, build, loaded.dtype, batches, loaded.module)
        variants = [builder.entry(key, tag) for key, tag in variant_ids(plan, full_latent, loaded.dtype,
                                                                        batches, windows).items()]
    ids = plan_ids(plan, full_latent, loaded.dtype, batches, windows)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": {"name": "postdiff-compile", "version": __version__},
        "source": {"path": loaded.source, "files": hashes, "family": family.name,
                   "layout": loaded.detection.layout, "prediction_type": loaded.detection.prediction_type,
                   "evidence": loaded.detection.evidence},
        "config": config.to_dict(),
        "toolchain": {**toolchain(), **build.toolchain},
        "resolution": {"height": height, "width": width, "latent_height": full_latent[0], "latent_width": full_latent[1]},
        "steps": steps,
        "formats": list(formats),
        "plan": [{**step.to_json(), "variant_id": ids[1][step.index]} for step in plan],
        **({"batches": {str(b): ids[b] for b in batches[1:]}} if len(batches) > 1 else {}),
        "transition": transition,
        "variants": variants,
        **({"controlnets": nets} if nets else {}),
        "weights": build.entries.get("weights"),
        "denoiser": {"class": family.denoiser_class, "config": loaded.detection.config, "dtype": dtype_name},
        "scheduler": scheduler,
        "set_timesteps": timing,
        "scheduler_table": table,
    }
    write_manifest(tmp, manifest)
    return manifest
