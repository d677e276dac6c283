"""How well a device with one measured variant is estimated: the roofline against FLOPs, from a cost_model run.

    python benchmarks/roofline_check.py [--results benchmarks/results/cost_model_reference.json] [--name NAME]

For each backend of a `cost_model.py` results file, every variant it measured is estimated from the `full` variant
at batch 2 and full resolution alone (what a device profiled once, on `none`, knows): by FLOPs (its measured time
times the FLOPs ratio) and by the roofline (metrics/roofline.py on the device probe, scaled by the same one
measurement, as predict.py scales an unmeasured variant). Reported: each estimate's error against the measured
time, and the median absolute error per backend. Counted from the graphs on the meta device: no timing here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).parent / "results" / "cost_model_reference.json")
    parser.add_argument("--name", default="roofline_check_reference")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import torch

    from postdiff_compile.costs import CostTable
    from postdiff_compile.explain import variant_traffic
    from postdiff_compile.models.families import get_family

    record = json.loads(args.results.read_text())
    tables = {key: CostTable.from_json(t) for key, t in record["tables"].items()}
    rows, summary = [], {}
    for backend in dict.fromkeys(key.split("/")[1] for key in tables):
        measured = {}
        for key, table in tables.items():
            if key.endswith(f"/{backend}"):
                for variant, ms in table.variants_ms.items():
                    deep = "shallow" in variant or "write_dc" in variant   # the branch matters to these only
                    measured.setdefault((variant, table.cache_branch if deep else 0), []).append((ms, table))
        anchor_ms, anchor_table = statistics.median(m for m, _ in measured[("full@b2_32x32", 0)]), \
            measured[("full@b2_32x32", 0)][0][1]
        family = get_family(anchor_table.family)
        itemsize = getattr(torch, anchor_table.dtype).itemsize
        anchor = variant_traffic(family, "full@b2_32x32")
        anchor_roof = anchor.estimate_ms(anchor_table.peak, itemsize)
        errors = {"flops": [], "roofline": []}
        for (variant, branch), values in sorted(measured.items()):
            if variant == "full@b2_32x32":
                continue
            ms = statistics.median(m for m, _ in values)
            traffic = variant_traffic(family, variant, branch)
            by_flops = anchor_ms * traffic.flops / anchor.flops
            by_roof = anchor_ms * traffic.estimate_ms(anchor_table.peak, itemsize) / anchor_roof
            row = {"backend": backend, "variant": variant, "measured_ms": round(ms, 2),
                   "flops_estimate_ms": round(by_flops, 2), "roofline_estimate_ms": round(by_roof, 2),
                   "flops_error": round(by_flops / ms - 1, 3), "roofline_error": round(by_roof / ms - 1, 3)}
            errors["flops"].append(abs(row["flops_error"]))
            errors["roofline"].append(abs(row["roofline_error"]))
            rows.append(row)
        summary[backend] = {k: round(statistics.median(v), 3) for k, v in errors.items()}
    lines = ["# Estimating unmeasured variants from one measured one: roofline against FLOPs", "",
             f"From `{args.results.name}` ({record['machine']}); `{provenance()['command']}`. Each variant estimated "
             "from `full@b2_32x32` alone, by FLOPs and by the roofline (both scaled by that one measurement).", "",
             "| backend | median abs. error, FLOPs | median abs. error, roofline |", "|---|---|---|"]
    lines += [f"| {b} | {s['flops']:.0%} | {s['roofline']:.0%} |" for b, s in summary.items()]
    lines += ["", "| backend | variant | measured ms | by FLOPs | error | by roofline | error |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['variant']} | {r['measured_ms']:.2f} | {r['flops_estimate_ms']:.2f} | "
              f"{r['flops_error']:+.0%} | {r['roofline_estimate_ms']:.2f} | {r['roofline_error']:+.0%} |" for r in rows]
    write_results(args.out, args.name, {"benchmark": "roofline_check", **provenance(), "source": args.results.name,
                                        "summary": summary, "rows": rows}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
