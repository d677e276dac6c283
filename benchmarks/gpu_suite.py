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
  tensorrt     where `tensorrt` imports: an artifact per preset with --format onnx,tensorrt (engine build
               times from its stages) and its latency through load(DIR, "tensorrt"); else the reason.
Configurations whose turn comes after --budget-s are recorded as skipped, not run.

Writes gpu_suite.json to --out (default: $OUT when set, else benchmarks/results). A session lent a GPU runs
it in one call and commits the file as benchmarks/results/gpu_suite_<card>.json. `--model tiny --device
cpu` runs the same code on the tiny test U-Net on a CPU (a rehearsal; its numbers mean nothing).
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

from common import cpu_name, interleaved_rounds, provenance   # benchmarks/ is on sys.path when a script runs

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
    ours = make()            # re-optimized with each preset before its call: one store, captures shared
    ours_compiled = make()   # likewise with compile=True: a variant two presets share is compiled once
    compiled_baseline = make(torch.compile(unet, dynamic=False))

    def run_plain(pipe):
        return lambda: pipe(**call, generator=torch.Generator(device).manual_seed(0)).images

    # Each pipeline is optimized for every preset once, here: the presets share its variant store, and a timed
    # call only swaps in its preset's runtime state (optimize() itself is not timed).
    states = {(id(pipe), p): optimize(pipe, configs[p], compile=compile)._postdiff
              for pipe, compile in ((ours, False), (ours_compiled, True)) for p in PRESETS}

    def run_ours(pipe, preset, compile):
        def fn():
            pipe._postdiff = states[(id(pipe), preset)]
            return pipe(**call, generator=torch.Generator(device).manual_seed(0)).images
        return fn

    runs = {("diffusers", "eager"): run_plain(plain)}
    presets = args.presets.split(",")
    runs.update({(p, "eager"): run_ours(ours, p, False) for p in presets})
    if "torch.compile" in args.backends.split(","):
        runs[("diffusers", "torch.compile")] = run_plain(compiled_baseline)
        # The headline preset first: when the budget runs short, the cheaper compiles are the ones skipped.
        runs.update({(p, "torch.compile"): run_ours(ours_compiled, p, True) for p in reversed(presets)})

    outputs, first, compiled = {}, {}, set()
    for key, fn in list(runs.items()):   # first calls: capture, rewrite, and for torch.compile, compile
        # Measured on an H100 with a cold compile cache: 55-70 s for the whole U-Net, 25-50 s for each new
        # variant (fast's six did not finish in 235 s). Start only what can finish and leave time for rounds.
        need = 30
        if key[1] == "torch.compile":
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
        if key[1] == "torch.compile" and key[0] != "diffusers":
            compiled |= {(s.variant, s.cfg, s.low_res) for s in build_plan(configs[key[0]], args.steps)}
        print(f"first call {key[0]} / {key[1]}: {first[key]:.1f} s", flush=True)
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
        if reference is not None:
            row["rel_l2_vs_diffusers_eager"] = rel_l2(out, reference)
        result["rows"].append(row)
        print(f"{preset:>10} {backend:<14} {median * 1e3:9.1f} ms  "
              f"{row.get('speedup_vs_diffusers_eager', float('nan')):.2f}x (FLOPs ideal {reduction:.2f}x)", flush=True)


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
    parser.add_argument("--sections", default="transition,denoise,tensorrt")
    parser.add_argument("--backends", default="eager,torch.compile", help="of the denoise section (eager always runs)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="of the denoise section")
    args = parser.parse_args()

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
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
