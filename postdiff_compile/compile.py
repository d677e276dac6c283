"""Source checkpoint -> artifact folder: load, plan, capture each variant, verify it, write it atomically."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .capture import Bucket
from .config import ConfigRequest, PostDiffConfig
from .errors import PostDiffError
from .exporters.atomic_dir import atomic_dir, check_target
from .exporters.manifest import sha256_file, toolchain, write_manifest
from .exporters.pt2 import save_pt2
from .models.load import load_denoiser
from .plan import build_plan, switch_of
from .resolution import low_res_latent
from .variants import VariantStore, variant_input_specs, variant_output_specs, verify_variant

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


def compile_artifact(source: Any, config: PostDiffConfig | ConfigRequest, out: str | Path,
                     resolution: tuple[int, int] | None = None, steps: int = 20, force: bool = False, dtype: str | None = None,
                     prediction_type: str | None = None, progress: Progress | None = None) -> CompileResult:
    progress = progress or Progress()
    out = Path(out)
    check_target(out, force)  # before any slow work
    start = time.perf_counter()
    stages: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str, total: float | None = None):
        t = time.perf_counter()
        yield progress.stage(name, total)
        stages[name] = time.perf_counter() - t
        progress.done(name)

    with timed("load"):
        loaded = load_denoiser(source, dtype=dtype, prediction_type=prediction_type)
    family = loaded.family
    if isinstance(config, ConfigRequest):
        config = config.resolve(family.name)
    height, width = resolution or family.default_resolution
    latent_h, latent_w = family.check_resolution(height, width, loaded.source)
    plan = build_plan(config, steps, cfg=True)
    switch = switch_of(plan)
    low_latent = low_res_latent(family, (latent_h, latent_w), config.low_res_scale) if switch else None
    scheduler = family.scheduler()
    scheduler["prediction_type"] = loaded.detection.prediction_type
    try:   # before any slow work: a transition the artifact's scheduler cannot run is a bad request
        transition = transition_manifest(config, switch, low_latent, (latent_h, latent_w), scheduler, steps)
    except PostDiffError as err:
        raise PostDiffError(str(err), loaded.source) from None
    dtype_name = str(loaded.dtype).removeprefix("torch.")

    hashes = []
    total_bytes = sum(p.stat().st_size for p in loaded.files)
    with timed("hash source", total_bytes) as advance:
        for path in loaded.files:
            hashes.append({"file": str(path), "sha256": sha256_file(path, advance), "bytes": path.stat().st_size})

    # One capture per batch and resolution (CFG steps run the CFG batch, gated steps batch 1; low-resolution
    # steps the low-resolution latent), one rewrite per variant.
    wanted = sorted({(step.variant, 2 if step.cfg else 1, low_latent if step.low_res else (latent_h, latent_w))
                     for step in plan}, key=lambda v: (-v[1], -v[2][0] * v[2][1], v[0]))
    variants = []
    store = VariantStore(loaded.module, family)
    with atomic_dir(out, force) as tmp:
        for name, batch, size in wanted:
            bucket = Bucket(batch, *size, family.text_length, loaded.dtype)
            if bucket not in store.captured:
                with timed(f"capture {bucket.tag}"):
                    store.prepare(bucket)
            captured, root = store.prepare(bucket)
            tag = f"{name}@{bucket.tag}"
            with timed(f"rewrite {tag}"):
                variant = store.get(name, bucket, config.cache_branch)
            with timed(f"verify {tag}"):
                check = verify_variant(captured, variant, loaded.module, config.cache_branch, root)
            if not check.rel_l2_error <= VERIFY_TOLERANCE[dtype_name]:
                raise PostDiffError(f"variant {tag} differs from eager: relative L2 error {check.rel_l2_error:.3g} "
                                    f"> {VERIFY_TOLERANCE[dtype_name]:g}", loaded.source)
            with timed(f"save {tag}"):
                file = save_pt2(variant, tmp / f"{tag.replace('+', '-')}.pt2")
            variants.append({
                "name": name, "file": file.name, "format": "torch.export", "sha256": sha256_file(file),
                "bytes": file.stat().st_size, "batch": batch, "latent_size": list(size),
                "text_length": bucket.text_length, "dtype": dtype_name, "upsample_path": captured.upsample_path,
                "inputs": [s.to_json() for s in variant_input_specs(variant)],
                "outputs": [s.to_json() for s in variant_output_specs(variant)],
                "verification": check.to_json(), "capture_seconds": round(captured.seconds, 3),
            })
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"path": loaded.source, "files": hashes, "family": family.name,
                       "layout": loaded.detection.layout, "prediction_type": loaded.detection.prediction_type,
                       "evidence": loaded.detection.evidence},
            "config": config.to_dict(),
            "toolchain": toolchain(),
            "resolution": {"height": height, "width": width, "latent_height": latent_h, "latent_width": latent_w},
            "steps": steps,
            "plan": [step.to_json() for step in plan],
            "transition": transition,
            "variants": variants,
            "denoiser": {"class": family.denoiser_class, "config": loaded.detection.config, "dtype": dtype_name},
            "scheduler": scheduler,
        }
        write_manifest(tmp, manifest)
    return CompileResult(out, manifest, time.perf_counter() - start, stages)


def transition_manifest(config: PostDiffConfig, switch: int, low: tuple[int, int] | None, full: tuple[int, int],
                        scheduler_config: dict, steps: int) -> dict | None:
    """What a runtime does between step `switch - 1` and step `switch`, exactly; None without mixed resolution.

    The numbers are those of the artifact's own scheduler at `steps` steps; a runtime with another scheduler
    or step count recomputes them by the rules written here.
    """
    if not switch:
        return None
    import diffusers

    from .runtime.transition import alpha_bars, check_scheduler, sigma_space

    cls = getattr(diffusers, scheduler_config["_class_name"])
    scheduler = cls.from_config({k: v for k, v in scheduler_config.items() if not k.startswith("_")})
    check_scheduler(scheduler)
    scheduler.set_timesteps(steps)
    abar, abar_next = alpha_bars(scheduler, scheduler.timesteps, switch - 1)
    prediction = scheduler_config["prediction_type"]
    return {
        "switch_step": switch,          # the first full-resolution step; step switch - 1 ends with the transition
        "low_res_scale": config.low_res_scale, "low_res_fraction": config.low_res_fraction,
        "low_latent_size": list(low), "full_latent_size": list(full),
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
        "clamp_x0": config.clamp_x0,    # > 0: x0 clamped to [-c, c] before the upsample; eps from the unclamped x0
        "upsample": {"mode": "bilinear", "align_corners": False,
                     "rule": "per axis, scale = in / out in float32, src = max((o + 0.5) * scale - 0.5, 0), "
                             "i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0"},
        "renoise": config.renoise,      # fresh: new noise; predicted: up(eps)
        "noise": "fresh: randn(full shape) from the pipeline's generator at the switch, right after the steps' own "
                 "draws (one tensor per generator for a generator list); on CUDA without a generator, Philox "
                 "tl.randn(seed, linear index) inside the kernel",
        "formula": "x_next = sqrt(abar_next) * up(x0) + sqrt(1 - abar_next) * noise",
        "scheduler_restart": "set_timesteps again, then set_begin_index(switch_step): multistep history starts afresh",
        "caches": {"cross_attn": "each [B, tokens, C] cache back to its grid (the latent with each side halved, "
                                 "rounding up, until the token count matches), bilinear as above to the same level "
                                 "of the full latent, flattened row-major",
                   "deepcache": "dropped: the switch step is a full step"},
        "op": "postdiff::resolution_transition",
    }
