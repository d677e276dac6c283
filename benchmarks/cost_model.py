"""Does the cost model predict what a user measures? `profile` + `explain --costs` against end-to-end latency.

    python benchmarks/cost_model.py --model reference|sd15 [--presets none,quality,balanced,fast]
                                    [--backends eager,onnxruntime,aoti] [--artifacts DIR] [--rounds 5]
                                    [--profile-rounds 5] [--name NAME]

For every preset and backend, in one process: the preset is profiled on the backend (eager: the source
checkpoint, as optimize(pipe) runs it; onnxruntime and aoti: the artifact DIR/<family>-<preset>, compiled before
with --format pt2,onnx,aoti, or compiled here), its total latency predicted from that table as `explain --costs`
predicts it, then every configuration's end-to-end latency measured the way a user calls it (optimize(pipe) and
pipe(...) for eager, load(DIR, backend) and runner(...) otherwise), all configurations interleaved in rounds,
median. Reported per row: prediction error, the realized speedup over `none` on the same backend, that speedup
over the cost model's ideal (predicted none / predicted preset) and over the FLOPs ideal.

Models: `reference`, the shipped reference model (32x32 pixel space); `sd15`, the SD1.5-architecture U-Net
(bundled config, random weights) at 256x256. Writes benchmarks/results/NAME.{json,md} (default cost_model_<model>).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, interleaved_rounds, provenance, write_results  # noqa: E402

FORMATS = ("pt2", "onnx", "aoti")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("reference", "sd15"), required=True)
    parser.add_argument("--presets", default="none,quality,balanced,fast")
    parser.add_argument("--backends", default="eager,onnxruntime,aoti")
    parser.add_argument("--artifacts", type=Path, help="folder of <family>-<preset> artifacts compiled before")
    parser.add_argument("--rounds", type=int, default=5, help="end-to-end rounds")
    parser.add_argument("--profile-rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--name")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from postdiff_compile import optimize, resolve_config
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.explain import explain
    from postdiff_compile.models.families import get_family
    from postdiff_compile.profiling.targets import profile_artifact, profile_source

    family_name = "scenes32" if args.model == "reference" else "sd15"
    family = get_family(family_name)
    if args.model == "reference":
        from latency_cpu import reference_pipeline
        from postdiff_compile.lab.reference import reference_folder

        res, make, source = 32, reference_pipeline(), str(reference_folder())
    else:
        from sd15_pipeline import pipeline_factory, random_sd15_unet

        # Built only when a row needs it: beside six onnxruntime sessions or AOTInductor packages, each holding
        # the 3.4 GB of float32 weights, a second copy does not fit in 24 GiB.
        needed = "eager" in args.backends.split(",")
        unet = random_sd15_unet() if needed else None
        res, make, source = 256, pipeline_factory(unet) if needed else None, unet
    presets, backends = args.presets.split(","), args.backends.split(",")
    configs = {p: resolve_config(p, family=family_name) for p in presets}
    if make is not None:
        probe = make()
        width = probe.unet.config.cross_attention_dim
        length = probe.tokenizer.model_max_length if probe.tokenizer is not None else 77
    else:
        width, length = family.config()["cross_attention_dim"], family.text_length
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, length, width, generator=gen), torch.randn(1, length, width, generator=gen)

    tables, runs, flops = {}, {}, {}
    pipe, states = (make() if make is not None else None), {}
    for preset in presets:
        flops[preset] = explain(family, configs[preset], steps=args.steps, resolution=(res, res)).total.true
        for backend in backends:
            say = (lambda text, key=(preset, backend): print(f"{key[0]}/{key[1]}: {text}", file=sys.stderr, flush=True))
            if backend == "eager":
                result = profile_source(source, configs[preset], resolution=(res, res), steps=args.steps,
                                        dtype="float32", rounds=args.profile_rounds, on_stage=say)
                states[preset] = optimize(pipe, configs[preset])._postdiff

                def run(preset=preset):
                    pipe._postdiff = states[preset]
                    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, height=res,
                                width=res, num_inference_steps=args.steps, output_type="latent",
                                generator=torch.Generator().manual_seed(0)).images
            else:
                folder = (args.artifacts or Path("/tmp/cost_model")) / f"{family_name}-{preset}"
                if not (folder / "manifest.json").is_file():
                    say("compiling (pt2, onnx, aoti)")
                    compile_artifact(source, configs[preset], folder, resolution=(res, res), steps=args.steps,
                                     dtype="float32", formats=FORMATS)
                result = profile_artifact(folder, backend, rounds=args.profile_rounds, on_stage=say)
                # The profiled runner itself, as a user calls it (runner(...) with random embeddings): a second
                # load would hold the weights twice.
                run = result.generate
            tables[(preset, backend)] = result.table
            runs[(preset, backend)] = run
            # The profile's variant calls join the end-to-end rounds: both are timed in the same minutes of a
            # shared machine whose speed drifts by more than the 10% asked of the prediction.
            runs.update({(preset, backend, variant): call for variant, call in result.calls.items()})
            run()   # warm
    print("end-to-end rounds", file=sys.stderr, flush=True)
    times = interleaved_rounds(runs, args.rounds, report=lambda r: print(f"round {r + 1}/{args.rounds}",
                                                                        file=sys.stderr, flush=True))
    rows = []
    for (preset, backend), profiled in tables.items():
        # The table profile wrote, its variant times taken from the interleaved rounds.
        table = dataclasses.replace(profiled, variants_ms={
            v: 1e3 * statistics.median(times[(preset, backend, v)]) for v in profiled.variants_ms})
        tables[(preset, backend)] = table
        ex = explain(family, configs[preset], steps=args.steps, resolution=(res, res), costs=table)
        measured = 1e3 * statistics.median(times[(preset, backend)])
        rows.append({"preset": preset, "backend": backend, "predicted_ms": round(ex.latency.total_ms, 2),
                     "measured_ms": round(measured, 2), "runs_ms": [round(1e3 * t, 2) for t in times[(preset, backend)]],
                     "error": round(ex.latency.total_ms / measured - 1, 4),
                     "estimated_steps": sum(not m for m in ex.latency.measured),
                     "overhead_ms_per_step": table.step_overhead_ms, "profile_generation_ms": table.measured_total_ms,
                     "flops_true": flops[preset]})
    for row in rows:
        none = next((r for r in rows if r["preset"] == "none" and r["backend"] == row["backend"]), None)
        if none is not None:
            realized = none["measured_ms"] / row["measured_ms"]
            ideal = none["predicted_ms"] / row["predicted_ms"]
            flops_ideal = none["flops_true"] / row["flops_true"]
            row.update(realized_speedup=round(realized, 3), cost_model_ideal=round(ideal, 3),
                       realized_over_cost_model=round(realized / ideal, 3), flops_ideal=round(flops_ideal, 3),
                       realized_over_flops=round(realized / flops_ideal, 3))
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    model = "the shipped reference model (32x32 pixel space)" if args.model == "reference" else \
        "SD1.5-architecture U-Net (bundled config, random weights), 256x256 (latent 32x32)"
    record = {"benchmark": "cost_model", "model": model, "steps": args.steps, "machine": machine,
              "rounds": args.rounds, "profile_rounds": args.profile_rounds, **provenance(), "rows": rows,
              "tables": {f"{p}/{b}": t.to_json() for (p, b), t in tables.items()}}
    lines = [f"# Cost model against measurement, {model}, {args.steps} steps, CFG 7.5", "",
             f"{machine}; `{record['command']}`. Predicted: `profile` of the row's configuration on its backend, then "
             "`explain --costs` (sum of its variants' times plus the runner's per-step time measured with stub "
             "variants; the variants' calls timed in the same interleaved rounds as the end-to-end runs). Measured: "
             f"end-to-end, median of {args.rounds} interleaved rounds in the same process. "
             "Speedups are over `none` on the same backend.", "",
             "| preset | backend | predicted ms | measured ms | error | realized speedup | cost-model ideal | "
             "realized / cost-model | FLOPs ideal | realized / FLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['realized_speedup']:.2f}x | {r['cost_model_ideal']:.2f}x | {r['realized_over_cost_model']:.2f} | "
                 f"{r['flops_ideal']:.2f}x | {r['realized_over_flops']:.2f}") if "realized_speedup" in r else "- | - | - | - | -"
        lines.append(f"| {r['preset']} | {r['backend']} | {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} | "
                     f"{r['error']:+.1%} | {extra} |")
    write_results(args.out, args.name or f"cost_model_{args.model}", record, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
