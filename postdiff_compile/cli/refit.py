"""`postdiff-compile refit ARTIFACT --out NEW (--weights FILE | --lora FILE [--lora-scale S])`: the artifact with new
weights, every variant verified on them, without recompiling (refit.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .parser import Parser

DESCRIPTION = ("Write a new artifact with new denoiser weights: a fine-tuned checkpoint of the same architecture "
               "(--weights: a .safetensors file with the artifact's tensor names, shapes and dtypes) or a LoRA merged "
               "into the artifact's own weights (--lora: diffusers/PEFT or kohya/A1111 files, merged by diffusers). "
               "Only the weights file changes; every variant is verified again on the new weights, on every format. "
               "The artifact itself is only read.")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="postdiff-compile refit", description=DESCRIPTION)
    add = parser.add_argument
    add("artifact", type=Path, help="artifact folder (format 2)")
    add("--out", type=Path, required=True, help="the new artifact folder")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--weights", type=Path, metavar="FILE.safetensors", help="new denoiser weights")
    given.add_argument("--lora", type=Path, metavar="FILE.safetensors", help="a LoRA to merge into the weights")
    add("--lora-scale", type=float, default=1.0, help="the LoRA's strength (default: 1.0)")
    add("--force", action="store_true", help="replace an existing output folder")
    add("--debug", action="store_true", help="show Python tracebacks")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..refit import refit_artifact
    from .report import RichProgress

    with RichProgress() as progress:
        result = refit_artifact(args.artifact, args.out, weights=args.weights, lora=args.lora,
                                lora_scale=args.lora_scale, force=args.force, progress=progress)
    worst = max(f["verification"]["rel_l2_error"] for v in result.manifest["variants"] for f in v["files"].values())
    print(f"wrote {result.out} in {result.seconds:.1f} s: {len(result.manifest['variants'])} variants verified on the "
          f"new weights (largest relative L2 error {worst:.2e})", file=sys.stderr)
    return 0
