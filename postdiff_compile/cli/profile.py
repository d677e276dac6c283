"""`postdiff-compile profile (ARTIFACT | SOURCE)`: time every variant of a plan and the runner around them on this
device, and write the cost table `explain --costs`, `tune --objective latency` and `--preset P --costs` read.

    postdiff-compile profile DIR [--backend torch|onnxruntime|tensorrt|aoti] [--device cpu|cuda] [--rounds 5]
    postdiff-compile profile [SOURCE] --preset NAME [--resolution HxW] [--steps N]      (eager, no artifact)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import PostDiffError
from .parser import Parser

DESCRIPTION = ("Time every variant of a plan on this device (warm, median of interleaved rounds) and the runner's "
               "own time per step (the loop run with stub variants), probe the device's matmul rate and copy "
               "bandwidth for the roofline estimate, and write the cost table. An artifact folder is profiled on "
               "--backend and keeps the table in its costs/ sidecar (outside the manifest's checksum); a source "
               "checkpoint (default: the shipped reference model) is profiled eagerly, as optimize(pipe) runs it.")


def build_parser() -> argparse.ArgumentParser:
    from ..exporters.formats import BACKENDS
    from .flags import add_config_flags, parse_resolution

    parser = Parser(prog="postdiff-compile profile", description=DESCRIPTION)
    add = parser.add_argument
    add("target", nargs="?", help="artifact folder, or .safetensors / diffusers folder (default: the reference model)")
    add("--backend", choices=("eager", *BACKENDS), help="default: torch for an artifact; a source runs eager")
    add("--device", help="default: cpu (cuda for tensorrt)")
    add("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
    add("--threads", type=int, help="CPU threads (torch and onnxruntime); default: torch's")
    add("--out", type=Path, metavar="FILE.json", help="results file, the table and each variant's roofline "
                                                      "(default: ./postdiff-profile/NAME-BACKEND.json, and a .md "
                                                      "beside it); --costs takes it")
    add("--no-probe", action="store_true", help="skip the device probe (no roofline estimate for unmeasured variants)")
    add("--resolution", type=parse_resolution, metavar="HxW", help="a source's image size (default: the family's)")
    add("--steps", type=int, help="a source's denoising steps (default: the family's)")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="a source's dtype (default: the checkpoint's)")
    add("--debug", action="store_true", help="show Python tracebacks")
    add_config_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..explain import variant_traffic
    from ..models.families import get_family
    from ..profiling.targets import profile_artifact, profile_source
    from .default_model import embedded_default_path
    from .flags import config_from_args

    if args.rounds < 1 or (args.threads is not None and args.threads < 1):
        raise PostDiffError("--rounds and --threads must be at least 1")
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    target = Path(args.target) if args.target else None
    if target is not None and (target / "manifest.json").is_file():
        backend = args.backend or "torch"
        if backend == "eager":
            raise PostDiffError("an artifact runs on a backend (torch, onnxruntime, tensorrt, aoti); eager profiles "
                                "a source checkpoint", target)
        result = profile_artifact(target, backend, args.device, rounds=args.rounds, threads=args.threads,
                                  probe=not args.no_probe, on_stage=say)
        name = target.resolve().name
    else:
        if args.backend not in (None, "eager"):
            what = "not an artifact folder (no manifest.json)" if target else "the reference model is a source"
            raise PostDiffError(f"{what}; compile it first to profile backend {args.backend}, or profile it eagerly "
                                "(--backend eager)", target)
        source = str(target) if target is not None else str(embedded_default_path())
        from ..lab.reference_models import family_of

        dtype = args.dtype or ("float32" if family_of(source) else None)
        result = profile_source(source, config_from_args(args), resolution=args.resolution, steps=args.steps,
                                dtype=dtype, device=args.device or "cpu", rounds=args.rounds, threads=args.threads,
                                probe=not args.no_probe, on_stage=say)
        name = f"{Path(source).name.split('.')[0]}-{args.preset}"
    table = result.table
    family = get_family(table.family)
    rows = []
    for variant_id, ms in table.variants_ms.items():
        t = variant_traffic(family, variant_id, table.cache_branch, result.denoiser_config, on_stage=say)
        itemsize = getattr(torch, table.dtype).itemsize
        row = {"variant": variant_id, "ms": ms, "gflops": round(t.flops / 1e9, 3),
               "weights_mb": round(t.weight_elements * itemsize / 1e6, 2),
               "moved_mb": round(t.elements * itemsize / 1e6, 2), "ops": len(t.nodes)}
        if table.peak is not None:
            row["roofline_ms"] = round(t.estimate_ms(table.peak, itemsize), 3)
        rows.append(row)
    out = args.out or Path("postdiff-profile") / f"{name}-{table.backend}.json"
    record = {"table": table.to_json(), "variants": rows, "predicted_ms": round(result.predicted_ms, 3),
              "generation_runs_ms": [round(t, 3) for t in result.generation_ms],
              "sidecar": str(result.sidecar) if result.sidecar else None}
    text = format_profile(name, record)
    _write(out, json.dumps(record, indent=1) + "\n")
    _write(out.with_suffix(".md"), text + "\n")
    print(text)
    print(f"\nwrote {out} (give it to --costs) and {out.with_suffix('.md')}"
          + (f"; the artifact's sidecar {result.sidecar}" if result.sidecar else ""), file=sys.stderr)
    return 0


def format_profile(name: str, record: dict) -> str:
    t = record["table"]
    peak = t["peak"]
    lines = [f"# {name} on {t['backend']}, {t['device']}", "",
             f"{t['family']}, {t['dtype']}, {t['steps']} steps; toolchain: "
             + ", ".join(f"{k} {v}" for k, v in t["toolchain"].items()),
             (f"device probe: matmul {peak['matmul_gflops']} GFLOP/s, copy {peak['copy_gbs']} GB/s, "
              f"one tiny op {peak['op_us']} us" if peak else "no device probe"), "",
             "| variant | measured ms | roofline ms | GFLOPs | weights MB | moved MB | ops |", "|---|---|---|---|---|---|---|"]
    for r in record["variants"]:
        lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r.get('roofline_ms', '-')} | {r['gflops']} | "
                     f"{r['weights_mb']} | {r['moved_mb']} | {r['ops']} |")
    lines += ["", f"runner overhead per step (stub variants): {t['step_overhead_ms']:.3f} ms",
              f"this plan: predicted {record['predicted_ms']:.1f} ms, measured {t['measured_total_ms']:.1f} ms "
              f"(median of {len(record['generation_runs_ms'])} generations)"]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    """Written beside its target and moved into place: a reader never finds half a results file."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
