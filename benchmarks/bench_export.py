"""Export time and artifact size for a full-size architecture with random weights.

    python benchmarks/bench_export.py [--family sd15] [--preset fast] [--resolution 768x768] [--dtype float16]
                                      [--formats pt2,onnx] [--name NAME] [--load onnxruntime]
                                      [--compare OLD_ARTIFACT --compare-pythonpath OLD_CHECKOUT] [--rounds 2]

Writes a seeded random-weight checkpoint of the family's real architecture as a diffusers model folder
(no download), compiles it with `postdiff-compile` (the library call the CLI makes) and prints, and writes
to benchmarks/results/NAME.{json,md}, the time of every stage and the size of every file. The machine is
named in the results. Expect minutes to tens of minutes on a CPU.

With --load, the artifact is then opened on that backend in a fresh process (bench_load.py): load time, two
generations, per-step time and peak memory. With --compare, an artifact written by another checkout (its code on
--compare-pythonpath) is measured the same way, the two alternating --rounds times, so that the per-step times
are side by side on the same machine state.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_name, random_denoiser, write_results   # benchmarks/ is on sys.path when a script runs
from postdiff_compile.cli.flags import parse_resolution
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import ConfigRequest


def random_checkpoint(family_name: str, dtype: torch.dtype, folder: Path, seed: int = 0) -> Path:
    """A diffusers model folder (config.json + weights) of the family's architecture, random weights."""
    from safetensors.torch import save_file

    model = random_denoiser(family_name, dtype=dtype, seed=seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": type(model).__name__, **dict(model.config)},
                                                   default=list))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--resolution", type=parse_resolution, default=(768, 768))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--formats", default="pt2,onnx")
    parser.add_argument("--name", help="results file stem (default: export_FAMILY_PRESET_RES_DTYPE)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", type=Path, help="keep the artifact here instead of deleting it")
    parser.add_argument("--load", metavar="BACKEND", help="then open it on BACKEND in a fresh process (bench_load.py)")
    parser.add_argument("--compare", type=Path, metavar="DIR", help="an artifact of another checkout, measured alike")
    parser.add_argument("--compare-pythonpath", type=Path, metavar="DIR", help="the checkout that opens --compare")
    parser.add_argument("--rounds", type=int, default=2, help="alternating load measurements of each artifact")
    parser.add_argument("--generations", type=int, default=2, help="generations per load measurement")
    args = parser.parse_args()
    h, w = args.resolution
    name = args.name or f"export_{args.family}_{args.preset}_{h}x{w}_{args.dtype}"

    work = Path(tempfile.mkdtemp(prefix="postdiff-bench-export-"))
    try:
        t = time.perf_counter()
        source = random_checkpoint(args.family, getattr(torch, args.dtype), work / "unet")
        source_seconds = time.perf_counter() - t
        source_bytes = sum(p.stat().st_size for p in source.iterdir())
        print(f"random {args.family} checkpoint: {source_bytes / 1e9:.3f} GB in {source_seconds:.1f} s", flush=True)

        class Print:
            def stage(self, stage, total=None):
                self.t = time.perf_counter()
                print(f"  {stage} ...", flush=True)
                return lambda advance: None

            def done(self, stage):
                print(f"  {stage}: {time.perf_counter() - self.t:.1f} s", flush=True)

        out = args.keep or work / "artifact"
        result = compile_artifact(str(source), ConfigRequest(args.preset), out, resolution=args.resolution,
                                  steps=args.steps, force=args.keep is not None, dtype=args.dtype, progress=Print(), formats=args.formats)
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        by_format: dict[str, int] = {}
        for v in result.manifest["variants"]:
            for fmt, entry in v["files"].items():
                by_format[fmt] = by_format.get(fmt, 0) + entry["bytes"]
        if result.manifest["weights"]:
            by_format["weights (every format)"] = result.manifest["weights"]["bytes"]
        stage_groups: dict[str, float] = {}
        for stage, seconds in result.stages.items():
            group = " ".join(stage.split(" ")[:-1]) if "@" in stage else stage
            stage_groups[group] = stage_groups.get(group, 0.0) + seconds
        record = {
            "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU used",
            "family": args.family, "preset": args.preset, "resolution": [h, w], "steps": args.steps,
            "dtype": args.dtype, "formats": result.manifest["formats"], "source_bytes": source_bytes,
            "total_seconds": result.seconds, "stages": result.stages, "stage_groups": stage_groups,
            "artifact_bytes": sum(files.values()), "bytes_by_format": by_format, "files": files,
            "variants": [{"id": v["id"], "rel_l2_error": v["verification"]["rel_l2_error"],
                          "onnx_rel_l2_error": v["files"].get("onnx", {}).get("verification", {}).get("rel_l2_error"),
                          "reference": v["verification"]["reference"]} for v in result.manifest["variants"]],
        }
        record["unread_outputs"] = unread_outputs(result.manifest)
        if args.load:
            release_memory()
            record["load"] = measure_loads(out, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"# Export: {args.family} `{args.preset}` at {h}x{w}, {args.dtype}, formats {', '.join(record['formats'])}",
             "", f"Machine: {record['machine']}. Random weights (seed 0), `{args.steps}` steps.", "",
             f"Total compile time **{record['total_seconds']:.0f} s**; artifact **{record['artifact_bytes'] / 1e9:.2f} GB** "
             f"(checkpoint {source_bytes / 1e9:.2f} GB).", "",
             "| stage (summed over variants) | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in record["stage_groups"].items()]
    lines += ["", "| format | bytes |", "|---|---|"] + [f"| {k} | {v / 1e9:.3f} GB |" for k, v in by_format.items()]
    lines += ["", "| variant | rel L2 (torch rewrite) | rel L2 (onnxruntime) | reference |", "|---|---|---|---|"]
    lines += [f"| {v['id']} | {v['rel_l2_error']:.2e} | "
              f"{'' if v['onnx_rel_l2_error'] is None else format(v['onnx_rel_l2_error'], '.2e')} | {v['reference']} |"
              for v in record["variants"]]
    unread = record["unread_outputs"]
    lines += ["", f"Caches a variant returns that its step does not keep (one variant serves steps that write fewer "
              f"caches): {unread['steps']} of {record['steps']} steps, at most {unread['max_bytes'] / 1e6:.1f} MB in "
              f"one call ({unread['max_step_variant']}), {unread['total_bytes'] / 1e6:.1f} MB over a generation; "
              "each is an output buffer freed after the call."]
    if "load" in record:
        lines += ["", f"Opened with `load(DIR, \"{args.load}\")` in a fresh process each time (bench_load.py), "
                  f"{'alternating with the artifact of the other checkout' if args.compare else 'alone'}; "
                  "peak RSS is the process's high-water mark.", "",
                  "| artifact | round | load s | peak GB after load | 1st generation s | 2nd generation s | per step ms | "
                  "peak GB |", "|---|---|---|---|---|---|---|---|"]
        for row in record["load"]:
            if "failed" in row:
                lines.append(f"| {row['artifact']} | {row['round']} | failed: exit status {row['failed']} "
                             f"{'(killed: out of memory)' if row['failed'] == -9 else ''} | | | | | |")
                continue
            g = row["generations"]
            lines.append(f"| {row['artifact']} | {row['round']} | {row['load_seconds']:.1f} | "
                         f"{row['peak_gb_after_load']:.2f} | {g[0]['seconds']:.1f} | {g[-1]['seconds']:.1f} | "
                         f"{row['per_step_ms']:.0f} | {g[-1]['peak_gb']:.2f} |")
    print("\n".join(lines))
    write_results(args.results, name, record, lines)


def unread_outputs(manifest: dict) -> dict:
    """The bytes of the cache outputs each step's variant returns and the step does not write (served variants)."""
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2}
    variants = {v["id"]: v for v in manifest["variants"]}
    per_step = []
    for step in manifest["plan"]:
        v = variants[step["variant_id"]]
        extra = [o for o in v["outputs"][1:] if o["name"].split(":")[0] not in step["writes"]]
        per_step.append((sum(sizes[o["dtype"]] * int(torch.tensor(o["shape"]).prod()) for o in extra), step))
    worst = max(per_step, key=lambda x: x[0])
    return {"steps": sum(1 for b, _ in per_step if b), "max_bytes": worst[0], "total_bytes": sum(b for b, _ in per_step),
            "max_step_variant": f"step {worst[1]['index']} {worst[1]['variant']} run by {worst[1]['variant_id']}"}


def release_memory() -> None:
    """Give the compile's freed memory back to the system before the load processes run beside this one (on 24 GB
    a first attempt had them killed for memory while this process still held the compile's heap)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_loads(artifact: Path, args) -> list[dict]:
    """bench_load.py on this artifact (and --compare's), each in its own process, alternating."""
    script = str(Path(__file__).with_name("bench_load.py"))
    targets = [("this", artifact, None)] + ([("compare", args.compare, args.compare_pythonpath)] if args.compare else [])
    rows = []
    for round_ in range(args.rounds):
        for label, folder, pythonpath in targets:
            env = dict(os.environ)
            if pythonpath is not None:
                env["PYTHONPATH"] = str(pythonpath)
            print(f"  load {label} (round {round_ + 1}) ...", flush=True)
            done = subprocess.run([sys.executable, script, str(folder), "--backend", args.load, "--generations",
                                   str(args.generations)], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:   # recorded, not raised: a load killed for memory is a result too
                rows.append({"artifact": label, "round": round_ + 1, "failed": done.returncode,
                             "stderr": done.stderr[-2000:]})
                print(f"  load {label}: failed with status {done.returncode}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"artifact": label, "round": round_ + 1, **row})
            print(f"  load {label}: {row['load_seconds']:.1f} s, {row['per_step_ms']:.0f} ms/step", flush=True)
    return rows


if __name__ == "__main__":
    main()
