"""Latency on this CPU, one process: plain diffusers, our runtime per preset per backend, and the peers.

    python benchmarks/latency_cpu.py --model reference|sd15|flux [--rounds 5] [--steps 20] [--resolution 256]
                                     [--backends eager,torch.compile,torch,onnxruntime,aoti]
                                     [--presets none,quality,balanced,fast] [--parts deepcache,deepcache+ca]
                                     [--peers DeepCacheSDHelper,tgate,tomesd] [--name NAME]
    python benchmarks/latency_cpu.py --model flux [--rounds 3] [--resolution 512] [--presets ...]
                                     [--hooks FirstBlockCache,PyramidAttentionBroadcast,FasterCache,TaylorSeer]

Models: `reference` is the shipped reference model (pixel space, 32x32, its own weights); `sd15` is the
SD1.5-architecture U-Net (bundled config, random weights) at --resolution (default 256x256) with a VAE that
is not run. Only the denoising loop is timed: embeddings are given (random, fixed), latents come out. `flux` is a
FLUX.1-dev-architecture transformer of reduced width and depth (random weights) at 512x512, its presets on eager
against plain diffusers and diffusers' cache hooks, each with FLOPs and PSNR/SSIM of the decoded images: see
benchmarks/latency_flux.py, which runs it (--backends and --peers do not apply).

Rows, each a configuration on a backend:
  diffusers          the plain StableDiffusionPipeline (the baseline); `diffusers 8 steps` the fewer-steps one
  <preset>/eager     optimize(pipe, preset): the rewritten graphs, eagerly
  <preset>/torch.compile   optimize(pipe, preset, compile=True)
  <preset>/torch|onnxruntime|aoti   postdiff_compile.load(artifact, backend) on an artifact compiled here
                     (pt2, onnx, aoti); the compile time is recorded, not timed as latency
  <part>/<backend>   as a preset, for the parts of the presets named by what they run (none by default):
                     `deepcache` (k=2, branch 1, full resolution), `deepcache+ca` (plus the cross-attention
                     cache, Cond from step 10)
  DeepCacheSDHelper  DeepCache's own helper, interval 2, branch 1 (= our DeepCache setting)
  tgate              T-GATE's TgateSDLoader with its documented defaults (gate_step 10, sp_interval 5,
                     fi_interval 1, warm_up 2: self-attention is cached too)
  tomesd             ToMe for SD, ratio 0.5 (max_downsample 1 for SD1.5; 4 for the reference model, whose
                     attention sits at downsample 2 and 4)
Every row is called once before timing (captures, compiles, patches); then --rounds rounds run one call of
each row, order rotated each round, and the median is reported. Speedup is against `diffusers`; the FLOPs
ideal is the baseline's true FLOPs over the row's (from `explain`), where explain can count the row.

Writes benchmarks/results/latency_cpu_<model>.{json,md,png} (--name NAME: NAME.{json,md,png}; the README's
performance section is made from latency_cpu_*.json, so a run of other rows wants a name of its own). The
presets and their parts against diffusers and DeepCacheSDHelper (what results/presets_cpu.md and
caching_cpu.md hold, written by the bench_caching.py this replaces):

    python benchmarks/latency_cpu.py --model sd15 --backends eager --parts deepcache,deepcache+ca \
        --peers DeepCacheSDHelper --name caching_cpu
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import DEEPCACHE, cpu_name, deepcache_helper_run, interleaved_rounds, provenance, write_results   # benchmarks/ on sys.path

PRESETS = ("none", "quality", "balanced", "fast")
# The parts of the presets, as overrides of `none`, named by what they run (presets change as features join them).
PARTS = {"deepcache": DEEPCACHE,
         "deepcache+ca": dict(DEEPCACHE, cross_attn_cache="cond", cross_attn_cache_step=10)}
PEERS = ("DeepCacheSDHelper", "tgate", "tomesd")
ARTIFACT_BACKENDS = ("torch", "onnxruntime", "aoti")


def reference_pipeline():
    from postdiff_compile.lab.reference import load_pipeline

    from postdiff_compile.lab.reference.model import ReferenceParts, make_pipeline

    shared = load_pipeline()
    parts = ReferenceParts(shared.tokenizer, shared.text_encoder, shared.unet)
    scheduler = dict(shared.scheduler.config)   # clip_sample on: pixel-space DDIM

    def make(own_unet=None):
        # make_pipeline, not StableDiffusionPipeline(**components): diffusers' constructor turns clip_sample off
        # in the scheduler it is given, which would change the reference model's sampler.
        own = parts if own_unet is None else ReferenceParts(parts.tokenizer, parts.text_encoder, own_unet)
        pipe = make_pipeline(own, type(shared.scheduler).from_config(scheduler))
        assert pipe.scheduler.config.clip_sample
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("reference", "sd15", "flux"), required=True)
    parser.add_argument("--resolution", type=int,
                        help="sd15 (default 256) and flux (default 512); the reference model is 32x32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="eager,torch.compile," + ",".join(ARTIFACT_BACKENDS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--parts", default="", help=f"of {', '.join(PARTS)}; timed as the presets are")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--hooks", default="FirstBlockCache,PyramidAttentionBroadcast,FasterCache,TaylorSeer",
                        help="flux only: diffusers' cache hooks, at their documented defaults")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", help="default: latency_cpu_<model>")
    args = parser.parse_args()
    if args.model == "flux":
        from latency_flux import run

        return run(args, parser)
    if args.rounds < 5:
        print(f"note: {args.rounds} rounds; the committed results use at least 5", file=sys.stderr)

    from postdiff_compile import load, optimize, resolve_config
    from postdiff_compile.verification import rel_l2
    from postdiff_compile.explain import explain
    from postdiff_compile.models.families import get_family

    torch.set_grad_enabled(False)
    family_name = "scenes32" if args.model == "reference" else "sd15"
    family = get_family(family_name)
    if args.model == "reference":
        if args.resolution not in (None, 32):
            parser.error("the reference model is 32x32")
        res, make = 32, reference_pipeline()
    else:
        from sd15_pipeline import pipeline_factory, random_sd15_unet

        res = args.resolution or 256
        make = pipeline_factory(random_sd15_unet())
    backends, parts = args.backends.split(","), [p for p in args.parts.split(",") if p]
    peers = [p for p in args.peers.split(",") if p]
    unknown = [b for b in backends if b not in ("eager", "torch.compile", *ARTIFACT_BACKENDS)] + \
        [p for p in args.presets.split(",") if p not in PRESETS] + [p for p in parts if p not in PARTS] + \
        [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown backend, preset, part or peer: {', '.join(unknown)}")
    # The presets and the parts asked for, each timed on every backend; `presets` below names them all.
    configs = {p: resolve_config(p, family=family_name) for p in args.presets.split(",")}
    configs.update({p: resolve_config("none", family=family_name, **PARTS[p]) for p in parts})
    presets = list(configs)

    probe = make()
    width = probe.unet.config.cross_attention_dim
    length = probe.tokenizer.model_max_length if probe.tokenizer is not None else 77
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, length, width, generator=gen), torch.randn(1, length, width, generator=gen)
    call = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, output_type="latent",
                height=res, width=res)

    def seeded():
        return torch.Generator().manual_seed(0)

    flops_of = {}   # row -> PostDiffConfig and steps that explain counts it as
    runs, notes, build = {}, {}, {}
    plain = make()
    runs["diffusers"] = lambda: plain(**call, num_inference_steps=args.steps, generator=seeded()).images
    flops_of["diffusers"] = (resolve_config("none"), args.steps)
    runs["diffusers 8 steps"] = lambda: plain(**call, num_inference_steps=8, generator=seeded()).images
    flops_of["diffusers 8 steps"] = (resolve_config("none"), 8)
    for backend in ("eager", "torch.compile"):
        if backend not in backends:
            continue
        # One pipeline per backend, optimized for each preset in turn so that the presets share one variant
        # store (captures, and compiles, made once); each call then only swaps in its preset's runtime state,
        # so optimize() itself is not timed.
        pipe, states = make(), {}
        for preset in presets:
            states[preset] = optimize(pipe, configs[preset], compile=backend == "torch.compile")._postdiff

        def ours(preset, pipe=pipe, states=states):
            pipe._postdiff = states[preset]
            return pipe(**call, num_inference_steps=args.steps, generator=seeded()).images
        for preset in presets:
            runs[f"{preset}/{backend}"] = lambda preset=preset, fn=ours: fn(preset)
            flops_of[f"{preset}/{backend}"] = (configs[preset], args.steps)

    artifact_backends = [b for b in backends if b in ARTIFACT_BACKENDS]
    tmp = tempfile.TemporaryDirectory(prefix="latency_cpu_")
    if artifact_backends:
        from postdiff_compile.compile import compile_artifact

        formats = tuple(dict.fromkeys(["pt2", *({"torch": "pt2", "onnxruntime": "onnx", "aoti": "aoti"}[b]
                                                for b in artifact_backends)]))
        source = make() if args.model == "sd15" else None
        for preset in presets:
            folder = Path(tmp.name) / preset
            start = time.perf_counter()
            try:
                from postdiff_compile.lab.reference import reference_folder

                result = compile_artifact(source.unet if source is not None else reference_folder(), configs[preset],
                                          folder, resolution=(res, res), steps=args.steps, dtype="float32",
                                          formats=formats)
            except Exception as err:
                for b in artifact_backends:
                    notes[f"{preset}/{b}"] = f"compile failed: {type(err).__name__}: {err}"
                traceback.print_exc()
                continue
            build[preset] = {"seconds": round(time.perf_counter() - start, 1),
                             "stages_s": {k: round(v, 1) for k, v in result.stages.items()}}
            print(f"compiled {preset} ({', '.join(formats)}): {build[preset]['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
            for b in artifact_backends:
                runner = load(folder, b)
                runs[f"{preset}/{b}"] = lambda runner=runner: runner(cond, uncond, seed=0, guidance_scale=7.5)
                flops_of[f"{preset}/{b}"] = (configs[preset], args.steps)

    if "DeepCacheSDHelper" in peers:
        runs["DeepCacheSDHelper"] = deepcache_helper_run(make(), seeded, **call, num_inference_steps=args.steps)
        flops_of["DeepCacheSDHelper"] = (resolve_config("none", **DEEPCACHE), args.steps)
    if "tgate" in peers:
        import tgate

        # T-GATE patches every Attention module's forward and never removes the patch: on the shared U-Net it
        # would leave the other rows with a frozen cross-attention. It gets a U-Net of its own.
        gated = tgate.TgateSDLoader(make(copy.deepcopy(probe.unet)))
        runs["tgate"] = lambda: gated.tgate(**call, num_inference_steps=args.steps, gate_step=10, sp_interval=5,
                                            fi_interval=1, warm_up=2, generator=seeded()).images
        notes["tgate"] = "FLOPs not counted: T-GATE also caches self-attention (sp_interval 5), outside explain's model"
    if "tomesd" in peers:
        import tomesd

        merged = make()
        max_downsample = 4 if args.model == "reference" else 1

        def run_tome():
            tomesd.apply_patch(merged, ratio=0.5, max_downsample=max_downsample)
            try:
                return merged(**call, num_inference_steps=args.steps, generator=seeded()).images
            finally:
                tomesd.remove_patch(merged)
        runs["tomesd"] = run_tome
        notes["tomesd"] = "FLOPs not counted: token merging is outside explain's model"

    flops = {}
    for row, (config, steps) in flops_of.items():
        flops[row] = explain(family, config, steps=steps, resolution=(res, res)).total

    outputs, first = {}, {}
    for row, fn in list(runs.items()):   # first calls: captures, compiles, patches (not timed below)
        start = time.perf_counter()
        try:
            outputs[row] = fn()
        except Exception as err:   # a peer that cannot run this model must not lose the other rows
            notes[row] = f"failed: {type(err).__name__}: {err}"
            traceback.print_exc()
            del runs[row]
            continue
        first[row] = time.perf_counter() - start
        print(f"first call {row}: {first[row]:.1f} s", file=sys.stderr, flush=True)
    names = list(runs)
    times = interleaved_rounds(runs, args.rounds, report=lambda round_: print(
        f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True))
    tmp.cleanup()

    base = statistics.median(times["diffusers"])
    reference = outputs["diffusers"]
    rows = []
    for row in names:
        median = statistics.median(times[row])
        entry = {"row": row, "median_s": round(median, 4), "runs_s": [round(t, 4) for t in times[row]],
                 "first_call_s": round(first[row], 2), "speedup": round(base / median, 3),
                 "rel_l2_vs_diffusers": rel_l2(outputs[row], reference)}
        if row in flops:
            ideal = flops["diffusers"].true / flops[row].true
            entry.update(flops_true=flops[row].true, flops_ideal_speedup=round(ideal, 3),
                         speedup_over_ideal=round(base / median / ideal, 3))
        if row in notes:
            entry["note"] = notes[row]
        rows.append(entry)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    model = ("the shipped reference model (pixel space, 32x32)" if args.model == "reference" else
             f"SD1.5-architecture U-Net (bundled config, random weights), {res}x{res} (latent {res // 8}x{res // 8})")
    result = {"benchmark": "latency_cpu", "model": model, "family": family_name, "resolution": res,
              "steps": args.steps, "scheduler": type(plain.scheduler).__name__, "guidance_scale": 7.5,
              "rounds": args.rounds, "machine": machine, **provenance(), "artifact_builds": build,
              "skipped": {k: v for k, v in notes.items() if k not in runs}, "rows": rows}
    name = args.name or f"latency_cpu_{args.model}"
    lines = [f"# Latency, {model}, {args.steps} steps, CFG 7.5", "",
             f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}; `{result['command']}`; "
             f"median of {args.rounds} interleaved rounds (order rotated); speedup against plain diffusers; FLOPs ideal "
             "= the baseline's true FLOPs over the row's, from `explain`.", "",
             "| row | median s | speedup | FLOPs ideal | speedup / ideal | first call s | rel. L2 vs diffusers |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = f"{r['flops_ideal_speedup']:.2f}x" if "flops_ideal_speedup" in r else "-"
        ratio = f"{r['speedup_over_ideal']:.2f}" if "speedup_over_ideal" in r else "-"
        lines.append(f"| {r['row']} | {r['median_s']:.3f} | {r['speedup']:.2f}x | {ideal} | {ratio} | "
                     f"{r['first_call_s']:.1f} | {r['rel_l2_vs_diffusers']:.3g} |")
    if build:
        lines += ["", "Artifact compile time per preset (s): " +
                  ", ".join(f"{p} {b['seconds']:.0f}" for p, b in build.items())]
    if notes:
        lines += ["", *[f"- {k}: {v}" for k, v in notes.items()]]
    write_results(args.out, name, result, lines)
    plot(rows, args.out / f"{name}.png", f"{model}, {args.steps} steps, {machine['cpu']}")
    print("\n".join(lines))
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    names = [r["row"] for r in rows][::-1]
    speed = [r["speedup"] for r in rows][::-1]
    ax.barh(names, speed, color="tab:blue", label="measured speedup")
    ideal = [(i, r["flops_ideal_speedup"]) for i, r in enumerate(rows[::-1]) if "flops_ideal_speedup" in r]
    if ideal:
        ax.scatter([v for _, v in ideal], [i for i, _ in ideal], marker="|", s=200, color="tab:red",
                   label="FLOPs ideal", zorder=3)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("speedup against plain diffusers (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
