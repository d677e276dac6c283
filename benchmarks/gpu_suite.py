"""Everything that needs a GPU, in one run that fits a short lease: kernel, presets, compilers, engine builds.

    python benchmarks/gpu_suite.py [--out DIR] [--budget-s 420] [--rounds 5] [--model sd15|tiny]

Sections, in order; the JSON is rewritten after each one, so a run cut short keeps what it measured:
  environment  card, torch, triton, CUDA, whether TensorRT imports (and why not)
  transition   benchmarks/bench_transition.py: the kernel against its float32 reference on the GPU (--check),
               then each provider's time against the byte floor (the bytes the transition must move)
  denoise      the SD1.5-architecture U-Net (bundled config, random weights, float16) at 768x768, 20 DDIM
               steps, CFG 7.5, latents out (no text encoder, VAE not run): plain diffusers against our
               runtime for each preset, eagerly and under torch.compile (diffusers' U-Net compiled whole;
               ours with optimize(compile=True), every variant compiled). Runs are interleaved, one of each
               configuration per round, order rotated; medians. Compile times are the first calls' times.
               Backends: eager, cuda-graphs (optimize(cuda_graphs=True): each variant replayed from a CUDA
               graph), torch.compile, reduce-overhead (torch.compile's CUDA-graph mode), aoti (an artifact of
               AOTInductor packages per preset, run by load(DIR, "aoti", cuda_graphs=True)); beside them
               DeepCacheSDHelper (interval 2, branch 1) on the same card.
  prediction   each preset profiled eagerly (postdiff-compile profile's measurement) and its latency predicted
               from the table as explain --costs predicts it, against the eager rows measured above
  tensorrt     where `tensorrt` imports: an artifact per preset with --format onnx,tensorrt (engine build
               times from its stages) and its latency through load(DIR, "tensorrt"); else the reason.
Configurations whose turn comes after --budget-s are recorded as skipped, not run.

Writes gpu_suite.json to --out (default: $OUT when set, else benchmarks/results). A session lent a GPU runs
it in one call and commits the file as benchmarks/results/gpu_suite_<card>.json. `--tiny` runs the same code on
the tiny test U-Net on a CPU (the rehearsal tests/test_gpu_suite.py runs; its numbers mean nothing). The
"targets" entry checks the GPU targets of docs/performance.md on the cuda-graphs rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import cpu_name, deepcache_helper_run, interleaved_rounds, provenance   # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
PRESETS = ("none", "quality", "balanced", "fast")
COMPILE_S_PER_GRAPH = 50   # torch.compile's first call per graph, H100 host, cold cache (see denoise_section)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed


def environment(device: torch.device) -> dict:
    from postdiff_compile.exporters.tensorrt_export import unavailable_reason

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": cpu_name(), "device": str(device),
           "tensorrt_unavailable": unavailable_reason()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["card"] = f"{env['cpu']} CPU (rehearsal)"
    if env["tensorrt_unavailable"] is None:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    return env


def transition_section(device: torch.device, card: str) -> dict:
    if device.type != "cuda":
        return {"skipped": "the transition microbenchmark needs a CUDA GPU"}
    sys.path.insert(0, str(HERE))
    import bench_transition

    peak = bench_transition.peak_gbs(card)
    result = {"peak_gbs": peak, "check": bench_transition.check(device)}
    print(f"transition check: {result['check']}", flush=True)
    result["rows"] = bench_transition.bench(device, peak)
    return result


def build_unet(model: str, device: torch.device, dtype: torch.dtype):
    if model == "sd15":
        from sd15_pipeline import random_sd15_unet

        return random_sd15_unet(device, dtype)
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(HERE.parent / "tests"))   # the test suite's tiny SD1.5 layout
    from tiny_models import TINY_CONFIGS

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(TINY_CONFIGS["sd15"])
    return unet.to(dtype).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def denoise_section(args, device: torch.device, dtype: torch.dtype, budget: Budget, save, result: dict) -> None:
    """Fills `result` as it goes, so that `save` records the first calls before the timed rounds."""
    from postdiff_compile import optimize, resolve_config
    from postdiff_compile.verification import rel_l2
    from postdiff_compile.explain import explain
    from postdiff_compile.models.families import get_family
    from postdiff_compile.plan import build_plan
    from sd15_pipeline import pipeline_factory

    res = args.resolution
    family = get_family("sd15")
    configs = {p: resolve_config(p, family="sd15") for p in PRESETS}
    flops = {p: explain(family, configs[p], steps=args.steps, resolution=(res, res)).total for p in PRESETS}
    t = time.perf_counter()
    unet = build_unet(args.model, device, dtype)
    make = pipeline_factory(unet, device, dtype)
    result.update({"model": f"SD1.5-architecture U-Net ({args.model}), random weights, {str(dtype).removeprefix('torch.')}",
              "resolution": res, "steps": args.steps, "scheduler": "DDIM", "guidance_scale": 7.5,
              "rounds": args.rounds, "build_model_s": round(time.perf_counter() - t, 2),
              "configs": {p: configs[p].to_dict() for p in PRESETS}, "rows": [], "skipped": {}})
    width = unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, width, generator=gen).to(device, dtype)
    uncond = torch.randn(1, 77, width, generator=gen).to(device, dtype)
    call = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                guidance_scale=7.5, output_type="latent", height=res, width=res)

    plain = make()
    compiled_baseline = make(torch.compile(unet, dynamic=False))
    backends = args.backends.split(",")
    # One pipeline per way of running our graphs, re-optimized with each preset before its call: one store per
    # pipeline, captures (and compiles) shared by the presets.
    ways = {"eager": dict(), "cuda-graphs": dict(cuda_graphs=True), "torch.compile": dict(compile=True),
            "reduce-overhead": dict(compile="reduce-overhead")}
    if device.type != "cuda":
        for way in ("cuda-graphs", "reduce-overhead"):
            if way in backends:
                result["skipped"][way] = "needs a CUDA device"
    ours = {way: make() for way in ways if way in backends and (device.type == "cuda" or way in ("eager", "torch.compile"))}

    def run_plain(pipe):
        return lambda: pipe(**call, generator=torch.Generator(device).manual_seed(0)).images

    # A timed call only swaps in its preset's runtime state (optimize() itself is not timed).
    states = {(way, p): optimize(pipe, configs[p], **ways[way])._postdiff for way, pipe in ours.items() for p in PRESETS}

    def run_ours(way, preset):
        def fn():
            pipe = ours[way]
            pipe._postdiff = states[(way, preset)]
            return pipe(**call, generator=torch.Generator(device).manual_seed(0)).images
        return fn

    runs = {("diffusers", "eager"): run_plain(plain)}
    presets = args.presets.split(",")
    for way in ("eager", "cuda-graphs"):
        if way in ours:
            runs.update({(p, way): run_ours(way, p) for p in presets})
    if "torch.compile" in backends:
        runs[("diffusers", "torch.compile")] = run_plain(compiled_baseline)
    for way in ("torch.compile", "reduce-overhead"):
        if way in ours:
            # The headline preset first: when the budget runs short, the cheaper compiles are the ones skipped.
            runs.update({(p, way): run_ours(way, p) for p in reversed(presets)})
    if "DeepCacheSDHelper" in args.peers.split(","):
        runs[("DeepCacheSDHelper", "eager")] = deepcache_helper_run(make(), lambda: torch.Generator(device).manual_seed(0),
                                                                    **call)
        flops["DeepCacheSDHelper"] = explain(family, resolve_config("none", cache_interval=2, cache_branch=1),
                                             steps=args.steps, resolution=(res, res)).total
    outputs, first, compiled = {}, {}, set()
    for key, fn in list(runs.items()):   # first calls: capture, rewrite, and for torch.compile, compile
        # Measured on an H100 with a cold compile cache: 55-70 s for the whole U-Net, 25-50 s for each new
        # variant (fast's six did not finish in 235 s). Start only what can finish and leave time for rounds.
        need = 30
        if key[1] in ("torch.compile", "reduce-overhead"):
            new = {(s.variant, s.cfg, s.low_res) for s in build_plan(configs[key[0]], args.steps)} - compiled \
                if key[0] != "diffusers" else {"unet"}
            need = 30 + COMPILE_S_PER_GRAPH * len(new)
        if budget.left() < need:
            result["skipped"]["/".join(key)] = (f"time budget: {budget.elapsed:.0f} s of {budget.seconds:.0f} s "
                                                f"used, about {need} s needed")
            del runs[key]
            continue
        try:
            sync(device)
            start = time.perf_counter()
            outputs[key] = fn()
            sync(device)
            first[key] = time.perf_counter() - start
        except Exception as err:   # one configuration failing must not lose the others' numbers
            result["skipped"]["/".join(key)] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            del runs[key]
            continue
        if key[1] in ("torch.compile", "reduce-overhead") and key[0] != "diffusers":
            compiled |= {(s.variant, s.cfg, s.low_res) for s in build_plan(configs[key[0]], args.steps)}
        print(f"first call {key[0]} / {key[1]}: {first[key]:.1f} s", flush=True)
    if "aoti" in backends:   # last: an AOTInductor build takes minutes, and the rows above matter more
        for key, fn in aoti_runs(args, unet, configs, presets, device, budget, result, cond, uncond).items():
            sync(device)
            start = time.perf_counter()
            outputs[key] = fn()
            sync(device)
            first[key] = time.perf_counter() - start
            runs[key] = fn
    result["first_call_s"] = {"/".join(k): round(v, 2) for k, v in first.items()}
    save()

    names = list(runs)
    # Another round only while the budget holds it, with a margin.
    times = interleaved_rounds(runs, args.rounds, sync=lambda: sync(device),
                               go_on=lambda times: budget.left() >= 1.2 * sum(map(statistics.median, times.values())))
    result["rounds_done"] = len(times[names[0]]) if names else 0

    base = statistics.median(times[("diffusers", "eager")]) if times.get(("diffusers", "eager")) else None
    reference = outputs.get(("diffusers", "eager"))
    for key in names:
        preset, backend = key
        f = flops["none" if preset == "diffusers" else preset]
        none = statistics.median(times[("none", backend)]) if times.get(("none", backend)) else None
        median = statistics.median(times[key])
        reduction = flops["none"].true / f.true
        out = outputs[key].float()
        row = {"config": preset, "backend": backend, "median_s": round(median, 4),
               "runs_s": [round(t, 4) for t in times[key]], "first_call_s": round(first[key], 2),
               "flops_true": f.true, "flops_paper": f.paper, "flops_reduction_true": round(reduction, 3),
               "finite": bool(torch.isfinite(out).all())}
        if base is not None:
            row["speedup_vs_diffusers_eager"] = round(base / median, 3)
            row["speedup_over_flops_reduction"] = round(base / median / reduction, 3)
        if none is not None and preset not in ("diffusers", "DeepCacheSDHelper"):
            row["speedup_vs_none_same_backend"] = round(none / median, 3)
            row["speedup_vs_none_over_flops_reduction"] = round(none / median / reduction, 3)
        if reference is not None:
            row["rel_l2_vs_diffusers_eager"] = rel_l2(out, reference)
        result["rows"].append(row)
        print(f"{preset:>10} {backend:<14} {median * 1e3:9.1f} ms  "
              f"{row.get('speedup_vs_diffusers_eager', float('nan')):.2f}x (FLOPs ideal {reduction:.2f}x)", flush=True)


def aoti_runs(args, unet, configs, presets, device, budget: Budget, result: dict, cond, uncond) -> dict:
    """Each preset compiled to AOTInductor packages on this device and run by load(DIR, "aoti"), its variants
    replayed from CUDA graphs on a GPU. The headline presets first: a compile takes minutes."""
    from postdiff_compile import load
    from postdiff_compile.compile import compile_artifact

    runs = {}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_aoti_"))
    for preset in [p for p in ("none", "fast") if p in presets]:   # two builds fit the lease, four do not
        if budget.left() < 150:
            result["skipped"][f"{preset}/aoti"] = f"time budget: {budget.elapsed:.0f} s of {budget.seconds:.0f} s used"
            continue
        try:
            start = time.perf_counter()
            compile_artifact(unet, configs[preset], tmp / preset, resolution=(args.resolution,) * 2, steps=args.steps,
                             formats=("pt2", "aoti"))
            result.setdefault("aoti_compile_s", {})[preset] = round(time.perf_counter() - start, 1)
            runner = load(tmp / preset, "aoti", device=device, cuda_graphs=device.type == "cuda")
            runs[(preset, "aoti")] = lambda runner=runner: runner(cond, uncond, seed=0, guidance_scale=7.5)
        except Exception as err:
            result["skipped"][f"{preset}/aoti"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
    return runs


def prediction_section(args, device: torch.device, dtype: torch.dtype, budget: Budget, denoise: dict) -> dict:
    """profile + explain --costs for each preset run eagerly, against the eager rows the denoise section measured."""
    from postdiff_compile import resolve_config
    from postdiff_compile.explain import explain
    from postdiff_compile.models.families import get_family
    from postdiff_compile.profiling.targets import profile_source

    family, rows, skipped = get_family("sd15"), [], {}
    measured = {r["config"]: r["median_s"] for r in denoise.get("rows", []) if r["backend"] == "eager"}
    unet = build_unet(args.model, device, dtype)
    for preset in [p for p in args.presets.split(",") if p in measured]:
        if budget.left() < 60:
            skipped[preset] = "time budget"
            continue
        config = resolve_config(preset, family="sd15")
        profiled = profile_source(unet, config, resolution=(args.resolution,) * 2, steps=args.steps, device=device,
                                  rounds=3)
        ex = explain(family, config, steps=args.steps, resolution=(args.resolution,) * 2, costs=profiled.table)
        predicted = ex.latency.total_ms / 1e3
        rows.append({"config": preset, "predicted_s": round(predicted, 4), "measured_s": measured[preset],
                     "error": round(predicted / measured[preset] - 1, 4),
                     "overhead_ms_per_step": profiled.table.step_overhead_ms, "table": profiled.table.to_json()})
        print(f"predicted {preset}: {predicted * 1e3:.1f} ms, measured {measured[preset] * 1e3:.1f} ms", flush=True)
    return {"rows": rows, "skipped": skipped}


def targets(denoise: dict) -> dict:
    """The issue's GPU targets, on the CUDA-graph backend: fast >= 1.3x balanced, every preset >= 0.85 of its FLOPs
    ideal over none, balanced >= 2.4x diffusers eager."""
    rows = {(r["config"], r["backend"]): r for r in denoise.get("rows", [])}
    out = {}

    def check(name, value, target):
        out[name] = {"value": value, "target": target, "met": value is not None and value >= target}
    fast, balanced = rows.get(("fast", "cuda-graphs")), rows.get(("balanced", "cuda-graphs"))
    check("fast_over_balanced", round(balanced["median_s"] / fast["median_s"], 3) if fast and balanced else None, 1.3)
    for preset in PRESETS[1:]:
        row = rows.get((preset, "cuda-graphs"), {})
        check(f"{preset}_over_flops_ideal_vs_none", row.get("speedup_vs_none_over_flops_reduction"), 0.85)
    check("balanced_vs_diffusers_eager", balanced.get("speedup_vs_diffusers_eager") if balanced else None, 2.4)
    return out


def tensorrt_section(args, device: torch.device, dtype: torch.dtype, budget: Budget, reason: str | None) -> dict:
    if reason is not None:
        return {"skipped": f"TensorRT not importable here: {reason}"}
    from postdiff_compile import load, resolve_config
    from postdiff_compile.compile import compile_artifact

    unet = build_unet(args.model, device, dtype)
    gen = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    cond, uncond = (torch.randn(1, 77, width, generator=gen).to(device, dtype) for _ in range(2))
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            if budget.left() < 120:
                skipped[preset] = f"time budget: {budget.elapsed:.0f} s of {budget.seconds:.0f} s used"
                continue
            try:
                folder = Path(tmp) / preset
                result = compile_artifact(unet, resolve_config(preset, family="sd15"), folder,
                                          resolution=(args.resolution, args.resolution), steps=args.steps,
                                          formats=("onnx", "tensorrt"))
                runner = load(folder, "tensorrt", device=device)
                runner(cond, uncond, seed=0, guidance_scale=7.5)   # warm-up
                times = []
                for _ in range(args.rounds):
                    sync(device)
                    start = time.perf_counter()
                    runner(cond, uncond, seed=0, guidance_scale=7.5)
                    sync(device)
                    times.append(time.perf_counter() - start)
                rows.append({"config": preset, "median_s": round(statistics.median(times), 4),
                             "runs_s": [round(t, 4) for t in times],
                             "stages_s": {k: round(v, 2) for k, v in result.stages.items()}})
            except Exception as err:
                skipped[preset] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
    return {"rows": rows, "skipped": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no configuration after this")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--sections", default="transition,denoise,prediction,tensorrt")
    parser.add_argument("--backends", default="eager,cuda-graphs,torch.compile,reduce-overhead,aoti",
                        help="of the denoise section: eager, cuda-graphs, torch.compile, reduce-overhead, aoti")
    parser.add_argument("--peers", default="DeepCacheSDHelper", help="of the denoise section")
    parser.add_argument("--tiny", action="store_true",
                        help="the CPU rehearsal the test suite runs: --model tiny --device cpu --resolution 128 "
                             "--rounds 2 --backends eager, sections denoise and prediction")
    parser.add_argument("--presets", default=",".join(PRESETS), help="of the denoise section")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.device, args.resolution, args.rounds, args.dtype = "tiny", "cpu", 128, 2, "float32"
        args.backends, args.sections = "eager", "denoise,prediction"

    budget = Budget(args.budget_s)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    result = {"benchmark": "gpu_suite", **provenance(), "budget_s": args.budget_s,
              "environment": environment(device)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_suite.json"

    def save() -> None:
        result["elapsed_s"] = round(budget.elapsed, 1)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)

    save()
    print(json.dumps(result["environment"]), flush=True)
    sections = args.sections.split(",")
    for name in sections:
        start = time.perf_counter()
        try:
            if name == "transition":
                result[name] = transition_section(device, result["environment"]["card"])
            elif name == "denoise":
                result[name] = {}
                denoise_section(args, device, dtype, budget, save, result[name])
            elif name == "prediction":
                result[name] = prediction_section(args, device, dtype, budget, result.get("denoise", {}))
            elif name == "tensorrt":
                result[name] = tensorrt_section(args, device, dtype, budget,
                                                result["environment"]["tensorrt_unavailable"])
            else:
                parser.error(f"unknown section {name!r}")
        except Exception as err:
            result[name] = {"failed": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            traceback.print_exc()
        result.setdefault("section_s", {})[name] = round(time.perf_counter() - start, 1)
        print(f"section {name}: {result['section_s'][name]:.0f} s (total {budget.elapsed:.0f} s)", flush=True)
        save()
    result["targets"] = targets(result.get("denoise", {}))
    save()
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
