"""Load test of `postdiff-compile serve` on this machine: the reference model's `fast` artifact on onnxruntime,
concurrency 1, 4 and 16, batching on and off, against the offline runner one image at a time; then a replica
killed during a run. Every response is checked against the offline runner's latents for its seed.

Starts Ray: run it only in a network namespace with loopback alone, with nothing else running:

    unshare -n sh -c 'ip link set lo up && . .venv/bin/activate && RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \\
        RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 python benchmarks/serve_load.py'

Bounded: REQUESTS requests per level, each with a timeout, each level stopped after LEVEL_SECONDS. Also measures
the ceiling batching can reach on this machine: the offline runner's images/s at batch 16 against batch 1.
Writes benchmarks/results/serve_cpu_reference.{json,md} (onnxruntime) or serve_cpu_reference_BACKEND.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, provenance, write_results  # noqa: E402

PROMPTS = ["large blue square center, on teal", "small red circle top left, on striped grey",
           "small yellow triangle bottom right, large white cross top, on checked beige"]
TIMEOUT = 120
LEVEL_SECONDS = 120
BOUND = 5e-5        # a served row against the one-image offline call (tests/test_serve.py says why)


def only_loopback() -> None:
    found = [line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    if found != ["lo"]:
        sys.exit(f"this benchmark starts Ray, which listens on every interface; this namespace has {found}: run it "
                 "under unshare -n (see the docstring)")


def post(url: str, job: tuple) -> tuple[int, float, bytes]:
    prompt, seed, guidance = job
    body = json.dumps({"prompt": prompt, "seed": seed, "guidance_scale": guidance}).encode()
    request = urllib.request.Request(url + "/generate", data=body, method="POST",
                                     headers={"accept": "application/x-safetensors"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, time.perf_counter() - start, response.read()
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - start, err.read()
    except OSError as err:
        return 599, time.perf_counter() - start, str(err).encode()


def level(url: str, jobs: list[tuple], concurrency: int, expected: dict) -> dict:
    """Run the jobs at `concurrency`, check every answer, return throughput and latency percentiles."""
    from safetensors.torch import load as load_tensors

    from postdiff_compile.verification import rel_l2

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda j: post(url, j) if time.perf_counter() - start < LEVEL_SECONDS
                                else (598, 0.0, b"skipped: level time over"), jobs))
    wall = time.perf_counter() - start
    ok = [(j, a) for j, a in zip(jobs, answers) if a[0] == 200]
    wrong = sum(rel_l2(load_tensors(a[2])["latents"], expected[j]) > BOUND for j, a in ok)
    latencies = sorted(a[1] for _, a in ok)
    return {"concurrency": concurrency, "requests": len(jobs), "ok": len(ok), "errors": len(jobs) - len(ok),
            "wrong_images": int(wrong), "wall_s": round(wall, 2), "images_per_s": round(len(ok) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
            "statuses": sorted({a[0] for a in answers})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    only_loopback()
    import ray
    from ray import serve

    import postdiff_compile
    from postdiff_compile.cli.default_model import embedded_default_path
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest
    from postdiff_compile.lab.reference import load_pipeline
    from postdiff_compile.serve.app import build_app

    work = Path(tempfile.mkdtemp(prefix="serve-load"))
    artifact = compile_artifact(str(embedded_default_path()), ConfigRequest("fast"), work / "fast16", steps=args.steps,
                                dtype="float32", formats="pt2,onnx", max_batch=16).out
    jobs = [(PROMPTS[i % len(PROMPTS)], 1000 + i, 4.0) for i in range(args.requests)]
    pipe, runner = load_pipeline(), postdiff_compile.load(artifact, args.backend, threads=1)
    expected, start = {}, time.perf_counter()
    for job in jobs:
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(job[0], torch.device("cpu"), 1, True, "")
        expected[job] = runner(cond, uncond, seed=job[1], guidance_scale=job[2])
    offline = {"images_per_s": round(len(jobs) / (time.perf_counter() - start), 3),
               **batch_ceiling(runner, pipe)}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url, rows, fault = f"http://127.0.0.1:{port}", [], {}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for max_batch in (16, 1):
            serve.run(build_app(artifact, args.backend, 1, max_batch, 20.0, threads=1), name="postdiff",
                      route_prefix="/")
            for concurrency in ((1, 4, 16) if max_batch > 1 else (16,)):
                rows.append({"batching": max_batch > 1, **level(url, jobs, concurrency, expected)})
                print(rows[-1], flush=True)
        serve.run(build_app(artifact, args.backend, 1, 16, 20.0, threads=1), name="postdiff", route_prefix="/")
        fault = kill_during_run(url, jobs, expected)
    finally:
        serve.shutdown()
        ray.shutdown()
    record = {**provenance(), "machine": cpu_name(), "steps": args.steps, "offline": offline, "rows": rows,
              "fault": fault}
    lines = [f"Reference model `fast` artifact ({args.steps} steps, {args.backend}, --max-batch 16), {args.requests} "
             f"requests per level, one replica (1 thread), {cpu_name()}; offline runner one image at a time: "
             f"{offline['images_per_s']} images/s. The ceiling for batching here: the offline runner's "
             f"run_batch gives {offline['batch16_images_per_s']} images/s at 16 images against "
             f"{offline['batch1_images_per_s']} at 1 ({offline['batch_gain']}x).", "",
             "| batching | concurrency | ok | errors | wrong images | images/s | p50 (s) | p95 (s) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['ok']} | {r['errors']} | "
              f"{r['wrong_images']} | {r['images_per_s']} | {r['p50_s']} | {r['p95_s']} |" for r in rows]
    lines += ["", f"Replica killed during a concurrency-16 run: {json.dumps(fault)}"]
    name = "serve_cpu_reference" + ("" if args.backend == "onnxruntime" else f"_{args.backend}")
    print(write_results(args.out, name, record, lines))
    return 0


def batch_ceiling(runner, pipe) -> dict:
    """images/s of one run_batch call at 1 and 16 images (warmed up): what batching can gain on this machine."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS[0], torch.device("cpu"), 1, True, "")
    rates = {}
    for n in (1, 16):
        c, u = cond.expand(n, -1, -1), uncond.expand(n, -1, -1)
        runner.run_batch(c, u, seeds=list(range(n)), guidance_scales=[4.0] * n)
        start, calls = time.perf_counter(), 16 // n
        for _ in range(calls):
            runner.run_batch(c, u, seeds=list(range(n)), guidance_scales=[4.0] * n)
        rates[n] = 16 / (time.perf_counter() - start)
    return {"batch1_images_per_s": round(rates[1], 3), "batch16_images_per_s": round(rates[16], 3),
            "batch_gain": round(rates[16] / rates[1], 2)}


def kill_during_run(url: str, jobs: list[tuple], expected: dict) -> dict:
    """ray.kill the replica while 16 clients send; the answers before, during and after."""
    import threading

    import ray

    def kill_later():
        time.sleep(3)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        for actor in replicas:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)

    killer = threading.Thread(target=kill_later)
    killer.start()
    during = level(url, jobs, 16, expected)
    killer.join()
    after = level(url, jobs[:16], 4, expected)
    return {"during": during, "after": after}


if __name__ == "__main__":
    raise SystemExit(main())
