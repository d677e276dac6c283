"""Refit time against a full compile of the same artifact, and refit against compiling the merged model.

    python benchmarks/bench_refit.py [--preset fast] [--formats pt2,onnx,aoti]

The tiny SD1.5-layout test U-Net (tests/tiny_models.py, seed 0) at 128x128, 20 steps: compiles it, makes a random
LoRA with peft on it and saves it in the diffusers and kohya layouts, refits the artifact with each
(`refit_artifact`, what `postdiff-compile refit` runs), compiles the PEFT-merged U-Net from scratch, and compares
the generations of each refit artifact with the from-scratch one on every backend of the formats. Prints a table
and writes benchmarks/results/refit_tiny_PRESET.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the tiny models and LoRA writers

import torch  # noqa: E402
from common import cpu_name, write_results  # noqa: E402
from tiny_models import lora_adapted, merged, text_embeddings, tiny_sd_pipeline, write_lora  # noqa: E402

import postdiff_compile  # noqa: E402
from postdiff_compile.compile import compile_artifact  # noqa: E402
from postdiff_compile.config import ConfigRequest  # noqa: E402
from postdiff_compile.exporters.formats import FORMATS, parse_formats  # noqa: E402
from postdiff_compile.refit import refit_artifact  # noqa: E402
from postdiff_compile.verification import rel_l2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--formats", default="pt2,onnx,aoti")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    formats = parse_formats(args.formats)
    work = Path(tempfile.mkdtemp(prefix="postdiff-bench-refit-"))
    unet = tiny_sd_pipeline("sd15").unet
    adapted = lora_adapted(unet)
    common = dict(resolution=(128, 128), steps=20, formats=",".join(formats))

    t = time.perf_counter()
    compile_artifact(unet, ConfigRequest(args.preset), work / "base", **common)
    compile_seconds = time.perf_counter() - t
    print(f"compile: {compile_seconds:.1f} s", flush=True)
    compile_artifact(merged(adapted), ConfigRequest(args.preset), work / "scratch", **common)
    cond, uncond = text_embeddings(1, 77, 768, seed=5)

    def generate(folder: Path, backend: str) -> torch.Tensor:
        return postdiff_compile.load(folder, backend)(cond, uncond, seed=3, guidance_scale=7.5)

    rows = []
    for layout in ("diffusers", "kohya"):
        lora = write_lora(adapted, work / f"lora_{layout}.safetensors", layout)
        t = time.perf_counter()
        result = refit_artifact(work / "base", work / f"refit_{layout}", lora=lora)
        seconds = time.perf_counter() - t
        errors = {FORMATS[f].backend: rel_l2(generate(work / f"refit_{layout}", FORMATS[f].backend),
                                             generate(work / "scratch", FORMATS[f].backend)) for f in formats}
        rows.append({"layout": layout, "refit_seconds": seconds, "fraction_of_compile": seconds / compile_seconds,
                     "stages": result.stages, "rel_l2_vs_from_scratch": errors})
        print(f"refit {layout}: {seconds:.1f} s ({100 * seconds / compile_seconds:.1f}% of compile), {errors}", flush=True)

    manifest = postdiff_compile.load(work / "base", "torch").manifest
    sizes = {"weights.safetensors": manifest["weights"]["bytes"]}
    for v in manifest["variants"]:
        for fmt, entry in v["files"].items():
            sizes[fmt] = sizes.get(fmt, 0) + entry["bytes"]
    record = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}", "preset": args.preset,
              "formats": list(formats), "compile_seconds": compile_seconds, "refits": rows, "bytes": sizes,
              "variants": len(manifest["variants"])}
    lines = [f"# Refit against compile: tiny SD1.5-layout U-Net, `{args.preset}`, formats {', '.join(formats)}", "",
             f"Machine: {record['machine']}. 128x128, 20 steps; a random rank-4 LoRA on every attention projection "
             "(peft), saved in each layout.", "",
             f"Full compile of the artifact: **{compile_seconds:.1f} s**.", "",
             "| LoRA layout | refit s | of compile | " + " | ".join(f"rel L2 vs from scratch ({FORMATS[f].backend})"
                                                         for f in formats) + " |",
             "|---|---|---|" + "---|" * len(formats)]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['refit_seconds']:.1f} | {100 * r['fraction_of_compile']:.1f}% | "
                     + " | ".join(f"{r['rel_l2_vs_from_scratch'][FORMATS[f].backend]:.2e}" for f in formats) + " |")
    lines += ["", f"The artifact's bytes ({record['variants']} variants): the weights once, and each format's graph files "
              "summed (none holds weights):", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {k} | {v / 1e6:.2f} MB |" for k, v in sizes.items()]
    print("\n".join(lines))
    write_results(args.results, f"refit_tiny_{args.preset}", record, lines)


if __name__ == "__main__":
    main()
