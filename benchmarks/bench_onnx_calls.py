"""The onnxruntime time of each variant of an artifact, one session at a time, and the plan's time per step.

    python benchmarks/bench_onnx_calls.py DIR [--arena on|off] [--calls 2]

Reads only the manifest and the ONNX graphs (no postdiff_compile import), so that artifacts of any version are
timed by the same code: each variant's graph is opened in an onnxruntime session with the session options the
runtime uses (2 threads, no spinning; --arena: onnxruntime's CPU memory arena, on before issue 23, off after),
called once to warm up and --calls more times on fixed random inputs of its shapes, and closed before the next
one, so that memory holds one session at a time. The per-step time is the plan's sum of its steps' variant times
over the steps. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--arena", choices=("on", "off"), default="off")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    times, peaks = {}, {}
    for v in manifest["variants"]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = args.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = args.arena == "on"
        session = ort.InferenceSession(str(args.artifact / v["files"]["onnx"]["file"]), options,
                                       providers=["CPUExecutionProvider"])
        feed = {i["name"]: rng.standard_normal(i["shape"]).astype(TYPES[i["dtype"]]) for i in v["inputs"]}
        feed["timestep"] = np.full(feed["timestep"].shape, 501.0, np.float32)
        session.run(None, feed)
        runs = []
        for _ in range(args.calls):
            t = time.perf_counter()
            session.run(None, feed)
            runs.append(time.perf_counter() - t)
        times[v["id"]] = 1e3 * statistics.median(runs)
        peaks[v["id"]] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        del session
        gc.collect()
        print(f"  {v['id']}: {times[v['id']]:.0f} ms", flush=True)
    per_step = sum(times[s["variant_id"]] for s in manifest["plan"]) / len(manifest["plan"])
    print(json.dumps({"arena": args.arena, "format_version": manifest["format_version"], "variant_ms": times,
                      "peak_gb_after": peaks, "per_step_ms": per_step}))


if __name__ == "__main__":
    main()
