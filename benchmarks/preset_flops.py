"""Each preset's FLOPs fraction for each family, from `explain` (full-size architectures on meta, no weights).

    python benchmarks/preset_flops.py [--steps N] [--families sd15,sd2,...,sd3,flux,flux_schnell]

Prints a table and writes benchmarks/results/preset_flops.{json,md}. Resolutions are the ones the paper
reports (SD1.5 at 768 px, SDXL and PixArt-alpha at 1024 px) and 768 px for SD2; SD3-medium and FLUX.1 at
1024 px with their pipelines' steps (28; schnell 4). The paper's totals are given beside ours where it has
them (paper-numbers.md, Table A and B), and each denoiser's counted parameters beside the published figure.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import write_results   # benchmarks/ is on sys.path when a script runs
from postdiff_compile.config import PRESETS, resolve_config
from postdiff_compile.errors import PostDiffError
from postdiff_compile.explain import explain
from postdiff_compile.models.families import get_family

RESOLUTION = {"sd15": (768, 768), "sd2": (768, 768), "sdxl": (1024, 1024), "pixart_alpha": (1024, 1024),
              "lcm_sd15": (512, 512), "lcm_sdxl": (1024, 1024), "sd3": (1024, 1024), "flux": (1024, 1024),
              "flux_schnell": (1024, 1024)}
# Published parameter counts of the denoisers (model cards: FLUX.1 "12B" with the transformer at 11.9 B in
# Black Forest Labs' release notes; SD3-medium "2B", whose released MMDiT sums to 2.028 B).
PUBLISHED_PARAMS = {"flux": 11.9e9, "flux_schnell": 11.9e9, "sd3": 2.0e9}
# paper-numbers.md: 20 steps, T (conv + linear MACs x CFG batch). "Mix + Cache" is our balanced for SD1.5
# (reading (a)); for PixArt-alpha it is the cross-attention-only schedule, a row of its own below.
PAPER = {("sd15", "none"): 30.420, ("sd15", "quality"): 19.035, ("sd15", "balanced"): 11.129,
         ("sdxl", "none"): 119.641, ("pixart_alpha", "none"): 85.640}
# Paper rows that are no preset: (family, label, preset + overrides, paper T).
PAPER_CONFIGS = [("pixart_alpha", "paper Mix+Cache (quality + cross-attn Cond, m=15)", "quality",
                  dict(cross_attn_cache="cond", cross_attn_cache_step=15), 54.718)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="default: each family's (20; 4 for LCM)")
    parser.add_argument("--families", default="sd15,sd2,sdxl,pixart_alpha,lcm_sd15,lcm_sdxl,sd3,flux,flux_schnell")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    rows, params = [], {}
    for name in args.families.split(","):
        family = get_family(name)
        params[name] = _parameters(family)
        steps = args.steps or family.default_steps
        extra = [(label, base, overrides, paper) for fam, label, base, overrides, paper in PAPER_CONFIGS if fam == name]
        for preset, base, overrides, paper in [(p, p, {}, PAPER.get((name, p))) for p in PRESETS] + extra:
            start = time.perf_counter()
            try:
                config = resolve_config(base, family=name, **overrides)
            except PostDiffError as err:
                rows.append({"family": name, "preset": preset, "unavailable": str(err)})
                print(f"{name:<13} {preset:<9} unavailable: {err}", flush=True)
                continue
            ex = explain(family, config, steps=steps, resolution=RESOLUTION[name])
            row = {"family": name, "preset": preset, "resolution": list(RESOLUTION[name]),
                   "steps": steps, "total_flops_paper": ex.total.paper, "total_flops_true": ex.total.true,
                   "fraction_paper": ex.total.paper / ex.baseline.paper,
                   "fraction_true": ex.total.true / ex.baseline.true,
                   "paper_reported_T": paper, "config": config.to_dict()}
            rows.append(row)
            print(f"{name:<13} {preset:<9} {steps:>2} steps {ex.total.paper / 1e12:8.3f} T paper "
                  f"({row['fraction_paper']:.1%}), "
                  f"{ex.total.true / 1e12:8.3f} T true ({row['fraction_true']:.1%})  "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)

    lines = ["# Preset FLOPs per family, from `postdiff-compile explain`", "",
             "Each family's default steps (20; LCM 4, without CFG; SD3 and FLUX-dev 28, FLUX-schnell 4), CFG batch "
             "where the pipeline batches it (not LCM, not FLUX, whose guidance is distilled).", "",
             "paper = conv+linear MACs x batch, attention excluded (the paper's convention); "
             "true = 2 x MACs, attention included.", "",
             "| family | resolution | steps | preset | paper T | fraction | paper reports | true T | fraction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['family']} | | | {r['preset']} | unavailable | | | | |")
            continue
        reported = f"{r['paper_reported_T']:.3f}" if r["paper_reported_T"] else ""
        lines.append(f"| {r['family']} | {r['resolution'][0]}x{r['resolution'][1]} | {r['steps']} | {r['preset']} | "
                     f"{r['total_flops_paper'] / 1e12:.3f} | {r['fraction_paper']:.1%} | {reported} | "
                     f"{r['total_flops_true'] / 1e12:.3f} | {r['fraction_true']:.1%} |")
    lines += ["", "Parameters of each denoiser, counted on the bundled config (meta device):", "",
              "| family | counted | published | difference |", "|---|---|---|---|"]
    for name, count in params.items():
        published = PUBLISHED_PARAMS.get(name)
        diff = f"{count / published - 1:+.2%}" if published else ""
        lines.append(f"| {name} | {count / 1e9:.4f} B | {f'{published / 1e9:.1f} B' if published else ''} | {diff} |")
    write_results(args.out, "preset_flops", {"rows": rows, "parameters": params}, lines)
    print("\n".join(lines))


def _parameters(family) -> int:
    from postdiff_compile.models.build import build_denoiser

    model = build_denoiser(family.denoiser_class, family.config(), "meta")
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
