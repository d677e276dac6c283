"""Speed of the presets and their parts against plain diffusers and DeepCacheSDHelper, in one process.

An SD1.5-architecture UNet (bundled config, random weights) in a StableDiffusionPipeline without text
encoder (random embeddings) and with a tiny VAE that is not run (output_type="latent"), so only the
denoising loop is timed. Runs are interleaved (one of each configuration per round) and medians are
reported, so drift on a shared machine hits every configuration alike. The FLOPs of each preset come from
`explain` (the same variant graphs, on the meta device); the target is speedup >= 0.9 x FLOPs reduction.

    python benchmarks/bench_caching.py [--resolution 256] [--steps 20] [--rounds 5] [--configs a,b,...]
                                       [--name caching_cpu] [--out benchmarks/results]

Configs (named by what they run, since presets change as features join them): the presets `none`,
`quality`, `balanced`, `fast`; `deepcache` (k=2, branch 1) and `deepcache+ca` (plus Cond m=10), both
at full resolution; `diffusers` and `DeepCacheSDHelper` (k=2, branch 1, as `deepcache`).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def configs():
    from postdiff_compile import resolve_config

    deepcache = resolve_config("none", cache_interval=2, cache_branch=1)
    return {
        "none": resolve_config("none", family="sd15"),
        "quality": resolve_config("quality", family="sd15"),
        "balanced": resolve_config("balanced", family="sd15"),
        "fast": resolve_config("fast", family="sd15"),
        "deepcache": deepcache,
        "deepcache+ca": deepcache.replace(cross_attn_cache="cond", cross_attn_cache_step=10),
    }


HELPER = "DeepCacheSDHelper"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", default="diffusers,none,deepcache,deepcache+ca,quality,balanced,fast," + HELPER,
                        help="comma-separated; diffusers and none always run (the baselines)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="caching_cpu")
    args = parser.parse_args()

    from DeepCache import DeepCacheSDHelper

    from postdiff_compile import optimize
    from postdiff_compile.explain import explain
    from postdiff_compile.models.families import get_family

    torch.set_grad_enabled(False)
    family = get_family("sd15")
    res = (args.resolution, args.resolution)
    known = configs()
    wanted = ["diffusers", "none"] + [c for c in args.configs.split(",") if c not in ("diffusers", "none")]
    unknown = [c for c in wanted if c not in known and c not in ("diffusers", HELPER)]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; known: diffusers, {', '.join(known)}, {HELPER}")
    flops = {}
    for name in {"none", *wanted} - {"diffusers", HELPER}:
        ex = explain(family, known[name], args.steps, res)
        flops[name] = ex.total
        print(f"{name}: {ex.total.true / 1e12:.3f} true TFLOPs, {ex.total.paper / 1e12:.3f} paper TFLOPs",
              file=sys.stderr)
    flops["diffusers"] = flops["none"]
    if HELPER in wanted:
        flops[HELPER] = explain(family, known["deepcache"], args.steps, res).total   # the same computation

    from sd15_pipeline import pipeline_factory, random_sd15_unet

    unet = random_sd15_unet()
    make_pipe = pipeline_factory(unet)
    pipe_check = make_pipe()
    assert pipe_check.vae_scale_factor == 8, pipe_check.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 768, generator=gen), torch.randn(1, 77, 768, generator=gen)
    call = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                guidance_scale=7.5, output_type="latent", height=args.resolution, width=args.resolution)

    plain = make_pipe()
    ours = {name: optimize(make_pipe(), known[name]) for name in wanted if name in known}
    helper_pipe = make_pipe()
    helper = DeepCacheSDHelper(pipe=helper_pipe)
    helper.set_params(cache_interval=2, cache_branch_id=1)

    def run_helper():
        helper.enable()
        try:
            return helper_pipe(**call, generator=torch.Generator().manual_seed(0)).images
        finally:
            helper.disable()

    runs = {"diffusers": lambda: plain(**call, generator=torch.Generator().manual_seed(0)).images,
            **{p: (lambda p=p: ours[p](**call, generator=torch.Generator().manual_seed(0)).images) for p in ours}}
    if HELPER in wanted:
        runs[HELPER] = run_helper
    runs = {name: runs[name] for name in wanted}

    outputs, warmup = {}, {}
    for name, fn in runs.items():   # first call: captures and rewrites the graphs (not timed below)
        start = time.perf_counter()
        outputs[name] = fn()
        warmup[name] = time.perf_counter() - start
        print(f"warm-up {name}: {warmup[name]:.1f} s", file=sys.stderr)
    times = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.rounds):
        # Rotate the order every round so no configuration always runs right after the same other one.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn = runs[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"round {round_} {name}: {times[name][-1]:.2f} s", file=sys.stderr)

    base = statistics.median(times["diffusers"])
    rows = []
    for name in runs:
        median = statistics.median(times[name])
        f = flops[name]
        speedup = base / median
        flops_reduction = flops["none"].true / f.true
        rows.append({
            "config": name, "median_s": round(median, 3), "runs_s": [round(t, 3) for t in times[name]],
            "first_call_s": round(warmup[name], 2), "speedup": round(speedup, 3),
            "flops_true": f.true, "flops_paper": f.paper, "flops_reduction_true": round(flops_reduction, 3),
            "speedup_over_flops_reduction": round(speedup / flops_reduction, 3),
            "speedup_vs_ours_none": round(statistics.median(times["none"]) / median, 3),
            "meets_0.9": speedup >= 0.9 * flops_reduction,
            "rel_l2_vs_diffusers": float((outputs[name] - outputs["diffusers"]).norm() / outputs["diffusers"].norm()),
        })
    result = {
        "benchmark": "presets and their parts vs diffusers and DeepCacheSDHelper",
        "configs": {name: known[name].to_dict() for name in wanted if name in known},
        "model": "SD1.5-architecture UNet (bundled config), random weights, float32",
        "resolution": args.resolution, "latent": args.resolution // 8, "steps": args.steps, "scheduler": "DDIM",
        "guidance_scale": 7.5, "rounds": args.rounds,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "device": "cpu"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Presets, SD1.5-architecture UNet (random weights), {args.resolution}x{args.resolution} "
             f"(latent {args.resolution // 8}x{args.resolution // 8}), {args.steps} DDIM steps, CFG 7.5",
             "", f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; median of {args.rounds} interleaved rounds (order rotated each round); speedup "
             "against plain diffusers; FLOPs = true FLOPs (2 x MACs, attention included) from "
             "`postdiff-compile explain`; target: speedup >= 0.9 x FLOPs reduction.", "",
             "| config | median s | all runs s | speedup | vs our none | true TFLOPs | FLOPs reduction | "
             "speedup / reduction | >= 0.9 | rel. L2 vs diffusers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['median_s']:.2f} | {' '.join(f'{t:.1f}' for t in r['runs_s'])} | "
                     f"{r['speedup']:.2f}x | {r['speedup_vs_ours_none']:.2f}x | {r['flops_true'] / 1e12:.2f} | "
                     f"{r['flops_reduction_true']:.2f}x | {r['speedup_over_flops_reduction']:.2f} | "
                     f"{'yes' if r['meets_0.9'] else 'NO'} | {r['rel_l2_vs_diffusers']:.3g} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
