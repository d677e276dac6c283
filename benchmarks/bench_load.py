"""Open an artifact on a backend in this fresh process and time it: load, then two generations.

    python benchmarks/bench_load.py DIR [--backend onnxruntime] [--generations 2]

Prints one JSON line: the seconds of `load(DIR, backend)`, of each generation (onnxruntime sessions are created at
their first call, so the first generation carries them), the per-step time of the last one, and the peak resident
memory after load and after each generation (ru_maxrss: the process's high-water mark). bench_export.py runs it
in a subprocess per artifact, so that one artifact's memory is not counted in the other's. It uses only `load()`
and the runner, so it runs on any version of postdiff-compile (PYTHONPATH picks which).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--generations", type=int, default=2)
    args = parser.parse_args()
    import postdiff_compile

    t = time.perf_counter()
    runner = postdiff_compile.load(args.artifact, args.backend)
    record = {"load_seconds": time.perf_counter() - t, "peak_gb_after_load": peak_gb(), "generations": []}
    shape = runner.text["shape"]
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, *shape[1:], generator=gen)
    uncond = torch.randn(1, *shape[1:], generator=gen)
    for _ in range(args.generations):
        t = time.perf_counter()
        latents = runner(cond, uncond if runner.cfg else None, seed=0)
        record["generations"].append({"seconds": time.perf_counter() - t, "peak_gb": peak_gb(),
                                      "finite": bool(torch.isfinite(latents).all())})
    record["per_step_ms"] = 1e3 * record["generations"][-1]["seconds"] / runner.steps
    record["latents_sum"] = float(latents.double().sum())
    print(json.dumps(record))


if __name__ == "__main__":
    main()
