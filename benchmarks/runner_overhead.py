"""The Python runner's own time per denoising step, outside the variant calls, per backend.

    python benchmarks/runner_overhead.py DIR [DIR ...] [--backends torch,onnxruntime,aoti] [--repeat 7]
                                         [--name runner_overhead_cpu] [--label after]

Each DIR is an artifact folder compiled with the formats of the backends asked for. For every artifact and
backend: one warm-up generation, then `--repeat` generations in which every variant call is timed; the
overhead per step is (generation - variant calls) / steps: the scheduler update, the CFG combination, cache
bookkeeping, concatenations, and each backend's own conversions around its graphs that the call timer does not
see. It uses only `load()` and the runner's variants, so that the same script measures an older checkout
(PYTHONPATH=that checkout) for a before/after comparison. Writes benchmarks/results/NAME.{json,md}; with
--label, the rows are added to the file under that label (a before run and an after run share one file), and
runs of the same label accumulate: the table shows the median over them. On a shared machine, alternate the
labels' runs (before, after, before, after) so that drift hits both alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, provenance, write_results  # noqa: E402


def overhead(folder: Path, backend: str, repeat: int) -> dict:
    import postdiff_compile

    runner = postdiff_compile.load(folder, backend)
    spent: list[float] = []
    for variant in runner.variants.by_key.values():
        run = variant.run   # what BackendVariant.__call__ calls

        def timed_run(*inputs, _run=run):
            start = time.perf_counter()
            out = _run(*inputs)
            spent.append(time.perf_counter() - start)
            return out
        variant.run = timed_run
    text = runner.text["shape"]
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, *text[1:], generator=gen), torch.randn(1, *text[1:], generator=gen)
    steps, calls = [], []
    for i in range(repeat + 1):
        spent.clear()
        start = time.perf_counter()
        runner(cond, uncond if runner.cfg else None, seed=0)
        total = time.perf_counter() - start
        if i:
            steps.append(total / runner.steps * 1e3)
            calls.append(sum(spent) / runner.steps * 1e3)
    return {"artifact": folder.name, "backend": backend, "steps": runner.steps,
            "step_ms": round(statistics.median(steps), 3), "variant_calls_ms": round(statistics.median(calls), 3),
            "overhead_ms": round(statistics.median(a - b for a, b in zip(steps, calls)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--backends", default="torch,onnxruntime,aoti")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--name", default="runner_overhead_cpu")
    parser.add_argument("--label", default="measured")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for folder in args.artifacts:
        for backend in args.backends.split(","):
            row = {"label": args.label, **overhead(folder, backend, args.repeat)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    path = args.out / f"{args.name}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"benchmark": "runner_overhead", "runs": {}}
    record["machine"] = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    record["runs"].setdefault(args.label, []).append({**provenance(), "rows": rows})
    labels = list(record["runs"])
    lines = [f"# Python runner overhead per denoising step, {record['machine']}", "",
             "Overhead = (generation - variant calls) / steps, median of the timed generations (ms), then the median "
             "over the runs of a label; one row per artifact and backend, one column group per label "
             "(`benchmarks/runner_overhead.py`).", ""]
    for label in labels:
        for run in record["runs"][label]:
            lines.append(f"- {label}: `{run['command']}` at {run['commit']}, {run['created']}")
    lines += ["", "| artifact | backend | " + " | ".join(f"{lb} step | {lb} calls | {lb} overhead" for lb in labels) + " |",
              "|---|---|" + "---|" * (3 * len(labels))]
    keys = dict.fromkeys((r["artifact"], r["backend"]) for lb in labels for run in record["runs"][lb] for r in run["rows"])
    for artifact, backend in keys:
        cells = []
        for label in labels:
            rows = [r for run in record["runs"][label] for r in run["rows"] if (r["artifact"], r["backend"]) == (artifact, backend)]
            cells += [f"{statistics.median(r[k] for r in rows):.3f}" for k in ("step_ms", "variant_calls_ms", "overhead_ms")] \
                if rows else ["-"] * 3
        lines.append(f"| {artifact} | {backend} | " + " | ".join(cells) + " |")
    write_results(args.out, args.name, record, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
