"""How far a partly trained model 2 is from issue 25's targets: its baseline and DPM-Solver++ at 10 steps only.

    python -m postdiff_compile.lab.target_probe WORK/model [--prompts 32] [--seed-sets 2] [--out FILE.json]

Why not `postdiff-compile study`: the study runs every fewer-steps and PostDiff point (17 of them), an hour or more on
2 cores; between training sittings the question is only whether the baseline is on its way to the targets (caption
match >= 0.5, per-object colour accuracy >= 0.9, Frechet distance <= 2x real-vs-real at the same n) and whether
DPM-Solver++ at 10 steps keeps up. The two points go through the study's own code (run_study: same prompt sets,
metrics, intervals and verdicts), so a probe's numbers are the study's for those points. (In lab/, not
lab/reference2/: it imports the study, whose sweep imports reference2.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .evaluate import Sampler
from .study import StudySettings

DPM_10 = Sampler("dpmsolver++-10", "dpmsolver++", 10)
TARGETS = {"caption_match": 0.5, "acc_colour": 0.9}   # issue 25's Must show, for the 20-step DDIM baseline
FRECHET_FACTOR = 2.0                                   # Frechet <= 2x real-vs-real at the same n


def probe(folder: Path, prompts: int, seed_sets: int, real: int = StudySettings.real) -> dict:
    """The baseline's and DPM-Solver++ 10's means, intervals and verdicts, and the baseline against the targets."""
    from ..errors import PostDiffError
    from ..models.families import get_family
    from .reference2 import is_model2_folder, load_pipeline
    from .study import run_study

    if not is_model2_folder(folder):
        raise PostDiffError("the probe takes a reference-model-2 folder (train_unet's WORK/model)", folder)
    pipe = load_pipeline(folder)
    settings = StudySettings(prompts=prompts, seed_sets=seed_sets, real=real, steps=())
    result = run_study(pipe, get_family("scenes64"), settings, lambda name, total: lambda n: None, [DPM_10],
                       model=str(folder))
    baseline, dpm = result.rows
    targets = {metric: {"value": baseline[metric], "target": f">= {bound}", "met": baseline[metric] >= bound}
               for metric, bound in TARGETS.items()}
    targets["frechet"] = {"value": baseline["frechet"], "target": f"<= {FRECHET_FACTOR:g} x {result.real_floor:.4g}",
                          "met": baseline["frechet"] <= FRECHET_FACTOR * result.real_floor}
    return {"model": str(folder), "step": _step(folder), "prompts": prompts, "seed_sets": seed_sets,
            "real_vs_real_frechet": result.real_floor, "targets": targets,
            "rows": [{k: row[k] for k in ("name", "caption_match", "acc_colour", "acc_shape", "frechet", "ci95",
                                          "vs_baseline") if k in row} for row in (baseline, dpm)]}


def _step(folder: Path) -> int | None:
    """The training step the folder's EMA weights are from (train_unet writes it into the U-Net's metadata)."""
    from safetensors import safe_open

    files = sorted((Path(folder) / "unet").glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as f:
        step = (f.metadata() or {}).get("postdiff.step")
    return int(step) if step is not None and step.isdigit() else None


def format_probe(found: dict) -> str:
    lines = [f"probe of {found['model']} (step {found['step']}; {found['prompts']} prompts x {found['seed_sets']} "
             f"sets; real-vs-real Frechet {found['real_vs_real_frechet']:.4g})"]
    for row in found["rows"]:
        ci = row.get("ci95", {})
        lines.append(f"  {row['name']:<20} " + "  ".join(
            f"{m} {row[m]:.3f}" + (f" +-{ci[m]:.3f}" if isinstance(ci.get(m), float) else "")
            for m in ("caption_match", "acc_colour", "acc_shape", "frechet") if m in row))
    for metric, t in found["targets"].items():
        said = "met" if t["met"] else "not met"
        lines.append(f"  baseline {metric}: {t['value']:.4g} (target {t['target']}): {said}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .reference2.train_vae import run_cli

    parser = argparse.ArgumentParser(prog="python -m postdiff_compile.lab.target_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model-2 folder (train_unet's WORK/model)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seed-sets", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)

    def job():
        found = probe(args.model, args.prompts, args.seed_sets)
        print(format_probe(found))
        if args.out is not None:
            args.out.write_text(json.dumps(found, indent=1) + "\n")
    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
