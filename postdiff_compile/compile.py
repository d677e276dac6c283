"""Source checkpoint -> artifact folder: load, plan, capture each variant, verify it, write it atomically."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .capture import Bucket, compare_outputs
from .config import ConfigRequest, PostDiffConfig
from .errors import PostDiffError
from .exporters.atomic_dir import atomic_dir
from .exporters.manifest import sha256_file, toolchain, write_manifest
from .exporters.scheduler_table import scheduler_table
from .metrics.flops import count_flops
from .models.load import load_denoiser
from .plan import build_plan, switch_of
from .resolution import low_res_latent
from .variants import VariantStore, check_cache_branch, check_variant, variant_input_specs, variant_output_specs

# An exported graph runs the same ATen ops as eager, so anything above float noise is a capture bug.
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
FORMATS = ("pt2", "onnx", "tensorrt", "aoti")
DEFAULT_FORMATS = ("pt2",)


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


def parse_formats(formats: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"pt2,onnx" -> ("pt2", "onnx"); TensorRT engines are built from the ONNX graphs, so they bring them along."""
    names = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise PostDiffError(f"unknown format {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")
    if "tensorrt" in names:
        names.append("onnx")
    return tuple(f for f in FORMATS if f in names)


def compile_artifact(source: Any, config: PostDiffConfig | ConfigRequest, out: str | Path,
                     resolution: tuple[int, int] | None = None, steps: int | None = None, force: bool = False, dtype: str | None = None,
                     prediction_type: str | None = None, progress: Progress | None = None,
                     formats: str | tuple[str, ...] = DEFAULT_FORMATS) -> CompileResult:
    out = Path(out)
    formats = parse_formats(formats)
    # The target's lock and a writable temporary folder beside it before any slow work: a second compile into
    # the same folder, or an unusable location, fails now with one error.
    with atomic_dir(out, force) as tmp:
        return _compile_into(tmp, source, config, out, resolution, steps, dtype, prediction_type,
                             progress or Progress(), formats)


def _compile_into(tmp: Path, source: Any, config: PostDiffConfig | ConfigRequest, out: Path,
                  resolution: tuple[int, int] | None, steps: int | None, dtype: str | None,
                  prediction_type: str | None, progress: Progress, formats: tuple[str, ...]) -> CompileResult:
    trt_key = None
    if "tensorrt" in formats:
        from .exporters.tensorrt_export import check_tensorrt, device_key

        check_tensorrt()
        trt_key = device_key()
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
    scheduler = family.scheduler()
    scheduler["prediction_type"] = loaded.detection.prediction_type
    steps = family.check_steps(steps or family.default_steps, scheduler, loaded.source)
    plan = build_plan(config, steps, cfg=family.classifier_free_guidance)
    try:   # before any capture
        check_cache_branch(loaded.module, config)
    except PostDiffError as err:
        raise PostDiffError(str(err), loaded.source) from None
    switch = switch_of(plan)
    low_latent = low_res_latent(family, (latent_h, latent_w), config.low_res_scale) if switch else None
    try:   # before any slow work: a transition the artifact's scheduler cannot run is a bad request
        transition = transition_manifest(config, switch, low_latent, (latent_h, latent_w), scheduler, steps)
    except PostDiffError as err:
        raise PostDiffError(str(err), loaded.source) from None
    table = scheduler_table(scheduler, steps, switch)   # cheap; never fails the build (a null table says why)
    dtype_name = str(loaded.dtype).removeprefix("torch.")
    tolerance = VERIFY_TOLERANCE[dtype_name]

    hashes = []
    total_bytes = sum(p.stat().st_size for p in loaded.files)
    with timed("hash source", total_bytes) as advance:
        for path in loaded.files:
            hashes.append({"file": str(path), "sha256": sha256_file(path, advance), "bytes": path.stat().st_size})

    # float16/bfloat16 convolutions on a CPU run about 250x slower than float32 (70 s for one 320-channel
    # 3x3 conv at 96x96, measured here), so there the checks run on a float32 twin of the weights: the same
    # rewrite of the same architecture is verified against eager in float32, and the exported low-precision
    # graphs are compared with the twin's outputs (onnxruntime runs them at usable speed).
    device = next(loaded.module.parameters()).device
    twin = loaded.dtype != torch.float32 and device.type == "cpu"
    reference = f"torch eager, float32 twin of the {dtype_name} weights" if twin else f"torch eager, {dtype_name}"
    check_store = VariantStore(copy.deepcopy(loaded.module).float(), family) if twin else None

    # One capture per batch and resolution (CFG steps run the CFG batch, gated steps batch 1; low-resolution
    # steps the low-resolution latent), one rewrite per variant.
    def variant_key(step) -> tuple[str, int, tuple[int, int]]:
        return step.variant, 2 if step.cfg else 1, low_latent if step.low_res else (latent_h, latent_w)

    wanted = sorted({variant_key(step) for step in plan}, key=lambda v: (-v[1], -v[2][0] * v[2][1], v[0]))
    ids = {key: f"{key[0]}@{Bucket(key[1], *key[2], 0, loaded.dtype).tag}" for key in wanted}
    variants = []
    store = VariantStore(loaded.module, family)
    with contextlib.ExitStack() as stack:
        weights = None
        if "onnx" in formats:
            from .exporters.onnx_export import export_onnx, verify_onnx
            from .exporters.weights_file import WeightsFile

            weights = stack.enter_context(WeightsFile(tmp))
        for key in wanted:
            name, batch, size = key
            bucket = Bucket(batch, *size, family.text_length, loaded.dtype)
            tag = ids[key]
            stem = tag.replace("+", "-")
            if bucket not in store.captured:
                with timed(f"capture {bucket.tag}"):
                    store.prepare(bucket)
            captured, root = store.prepare(bucket)
            with timed(f"rewrite {tag}"):
                variant = store.get(name, bucket, config.cache_branch)
            with timed(f"verify {tag}"):
                if twin:
                    bucket32 = dataclasses.replace(bucket, dtype=torch.float32)
                    captured32, root32 = check_store.prepare(bucket32)
                    check = check_variant(captured32, check_store.get(name, bucket32, config.cache_branch),
                                          check_store.denoiser, config.cache_branch, root32)
                else:
                    check = check_variant(captured, variant, loaded.module, config.cache_branch, root)
            if not check.verification.rel_l2_error <= tolerance:
                raise PostDiffError(f"variant {tag} differs from eager: relative L2 error "
                                    f"{check.verification.rel_l2_error:.3g} > {tolerance:g}", loaded.source)
            # The exported graphs take the artifact's dtype (timesteps stay float32).
            feed = tuple(t.to(s.dtype) for t, s in zip(check.inputs, variant_input_specs(variant)))
            files: dict[str, dict] = {}
            program = None
            if "pt2" in formats or "aoti" in formats:
                from .exporters.pt2 import export_variant, save_pt2

                with timed(f"export {tag}"):
                    program = export_variant(variant)
            if "pt2" in formats:
                with timed(f"save pt2 {tag}"):
                    file = save_pt2(variant, tmp / f"{stem}.pt2", program)
                files["pt2"] = {"file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size}
            if "aoti" in formats:
                from .exporters.aoti import load_aoti, save_aoti

                with timed(f"compile aoti {tag}"):
                    file = save_aoti(program, tmp / f"{stem}.aoti.pt2")
                with timed(f"verify aoti {tag}"):
                    got = load_aoti(file)(*[t.to(device).contiguous() for t in feed])
                    aoti_check = compare_outputs(got, check.outputs, check.verification.seed)
                if not aoti_check.rel_l2_error <= tolerance:
                    raise PostDiffError(f"the AOTInductor package of variant {tag} differs from its torch variant: "
                                        f"relative L2 error {aoti_check.rel_l2_error:.3g} > {tolerance:g}",
                                        loaded.source)
                files["aoti"] = {"file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size,
                                 "device": device.type, "compile_seconds": round(stages[f"compile aoti {tag}"], 1),
                                 "verification": {**aoti_check.to_json(), "reference": reference,
                                                  "tolerance": tolerance}}
            if "onnx" in formats:
                with timed(f"export onnx {tag}"):
                    files["onnx"] = export_onnx(variant, tmp / f"{stem}.onnx", weights)
                with timed(f"verify onnx {tag}"):
                    ort_check = verify_onnx(tmp / f"{stem}.onnx", list(variant.inputs), feed, check.outputs,
                                            check.verification.seed)
                if not ort_check.rel_l2_error <= tolerance:
                    raise PostDiffError(f"the ONNX graph of variant {tag} differs from its torch variant under "
                                        f"onnxruntime: relative L2 error {ort_check.rel_l2_error:.3g} > {tolerance:g}",
                                        loaded.source)
                files["onnx"]["verification"] = {**ort_check.to_json(), "reference": reference,
                                                 "tolerance": tolerance}
            if "tensorrt" in formats:
                from .exporters.tensorrt_export import EngineRunner, build_engine, engine_file_name

                engine = tmp / engine_file_name(tag, dtype_name, trt_key)
                with timed(f"build tensorrt {tag}"):
                    entry = build_engine(tmp / f"{stem}.onnx", engine, trt_key)
                with timed(f"verify tensorrt {tag}"):
                    got = EngineRunner(engine)(*feed)
                    trt_check = compare_outputs(got, check.outputs, check.verification.seed)
                if not trt_check.rel_l2_error <= tolerance:
                    raise PostDiffError(f"the TensorRT engine of variant {tag} differs from its torch variant: "
                                        f"relative L2 error {trt_check.rel_l2_error:.3g} > {tolerance:g}", loaded.source)
                files["tensorrt"] = {**entry, "sha256": sha256_file(engine), "bytes": engine.stat().st_size,
                                     "precision": dtype_name,
                                     "verification": {**trt_check.to_json(), "reference": reference,
                                                      "tolerance": tolerance}}
            flops = count_flops(variant.module.graph)
            variants.append({
                "id": tag, "name": name, "batch": batch, "latent_size": list(size),
                "text_length": bucket.text_length, "dtype": dtype_name, "upsample_path": captured.upsample_path,
                "inputs": [s.to_json() for s in variant_input_specs(variant)],
                "outputs": [s.to_json() for s in variant_output_specs(variant)],
                "flops": {"paper": flops.paper, "true": flops.true},
                "verification": {**check.verification.to_json(), "reference": reference, "tolerance": tolerance},
                "files": files, "capture_seconds": round(captured.seconds, 3),
            })
        weights_entry = None
        if weights is not None:
            weights.close()
            weights_entry = {"file": weights.path.name, "sha256": sha256_file(weights.path),
                             "bytes": weights.path.stat().st_size, "tensors": weights.tensors,
                             "names": "the ONNX initializer names: the diffusers state-dict keys of the denoiser"}
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tool": {"name": "postdiff-compile", "version": toolchain()["postdiff_compile"]},
            "source": {"path": loaded.source, "files": hashes, "family": family.name,
                       "layout": loaded.detection.layout, "prediction_type": loaded.detection.prediction_type,
                       "evidence": loaded.detection.evidence},
            "config": config.to_dict(),
            "toolchain": {**toolchain(formats), **({"tensorrt": trt_key["tensorrt"]} if trt_key else {})},
            "resolution": {"height": height, "width": width, "latent_height": latent_h, "latent_width": latent_w},
            "steps": steps,
            "formats": list(formats),
            "plan": [{**step.to_json(), "variant_id": ids[variant_key(step)]} for step in plan],
            "transition": transition,
            "variants": variants,
            "weights": weights_entry,
            "denoiser": {"class": family.denoiser_class, "config": loaded.detection.config, "dtype": dtype_name},
            "scheduler": scheduler,
            "scheduler_table": table,
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
    from .runtime.artifact import make_scheduler
    from .runtime.transition import alpha_bars, check_scheduler, sigma_space

    scheduler = make_scheduler(scheduler_config)   # the one a runner of this artifact builds
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
