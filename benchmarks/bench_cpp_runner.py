"""The C++ runner against the Python runner on the same AOTInductor packages, and what building them costs.

    python benchmarks/bench_cpp_runner.py [--models tiny,reference] [--presets none,quality,balanced,fast]
                                          [--repeat 5] [--runner PATH] [--reuse DIR] [--name cpp_runner_cpu]

Measures, on this machine: the C++ build (cmake configure + build of runtimes/cpp against the torch wheel),
AOTInductor's compile time for every variant of every preset, and per denoising step the time of each runner
and of its package calls alone. The difference is the runner's own overhead per step (scheduler update,
CFG combination, cache bookkeeping, concatenations). Both runners call the same .aoti.pt2 packages; each
timed generation follows a warm-up one; the median over `--repeat` generations in two interleaved rounds.

Models: `tiny`, the tests' tiny SD1.5-layout U-Net (tests/tiny_models.py) at 128x128, DDIM, 20 steps;
`reference`, the embedded reference model (32x32 pixel space, DDIM with clip_sample). Writes
benchmarks/results/NAME.{json,md}. `--reuse DIR` times artifacts compiled before (DIR/<model>-<preset>, or
DIR/<preset> for the tiny model, e.g. tests/test_cpp_runner.py's), taking their compile times from the manifests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name, write_results  # noqa: E402

import postdiff_compile  # noqa: E402
from postdiff_compile.verification import rel_l2  # noqa: E402
from postdiff_compile.compile import compile_artifact  # noqa: E402
from postdiff_compile.config import ConfigRequest  # noqa: E402


def build_runner(build: Path) -> tuple[Path, dict]:
    prefix = subprocess.run([sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    times = {}
    for name, command in (("configure", ["cmake", "-S", str(ROOT / "runtimes" / "cpp"), "-B", str(build), *generator,
                                         f"-DCMAKE_PREFIX_PATH={prefix}"]),
                          ("build", ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times[name] = round(time.perf_counter() - start, 1)
        print(f"C++ {name}: {times[name]} s", flush=True)
    return build / "postdiff-run", times


def model_source(name: str):
    if name == "reference":
        from postdiff_compile.lab.reference import reference_folder

        return reference_folder(), None
    from tiny_models import tiny_sd_pipeline

    return tiny_sd_pipeline("sd15").unet, (128, 128)


def python_times(folder: Path, cond, uncond, repeat: int) -> tuple[list[float], list[float], torch.Tensor]:
    """Per generation: mean step time and mean package-call time (ms), from the aoti backend."""
    runner = postdiff_compile.load(folder, "aoti")
    spent = []
    for variant in runner.variants.by_key.values():
        def timed(*inputs, _run=variant.run):
            start = time.perf_counter()
            out = _run(*inputs)
            spent.append(time.perf_counter() - start)
            return out
        variant.run = timed
    steps, calls, latents = [], [], None
    for i in range(repeat + 1):
        spent.clear()
        start = time.perf_counter()
        latents = runner(cond, uncond, seed=0)
        total = time.perf_counter() - start
        if i:   # the first generation warms up
            steps.append(total / runner.steps * 1e3)
            calls.append(sum(spent) / runner.steps * 1e3)
    return steps, calls, latents


def cpp_times(binary: Path, folder: Path, embeddings: Path, out: Path, repeat: int) -> tuple[list[float], list[float]]:
    done = subprocess.run([str(binary), str(folder), "--embeddings", str(embeddings), "--out", str(out),
                           "--step-times", "--repeat", str(repeat + 1)], capture_output=True, text=True, check=True)
    generations = [float(m) for m in re.findall(r"^generation \d+ ([0-9.]+) ms", done.stderr, re.M)]
    packages = [float(m) for m in re.findall(r"\(package ([0-9.]+) ms\)", done.stderr)]
    steps = len(packages) // len(generations)
    calls = [sum(packages[i * steps:(i + 1) * steps]) / steps for i in range(len(generations))]
    return [g / steps for g in generations[1:]], calls[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,reference")
    parser.add_argument("--presets", default="none,quality,balanced,fast")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--runner", type=Path, help="a built postdiff-run (skips and does not time the build)")
    parser.add_argument("--reuse", type=Path, help="folder of already compiled artifacts (see above)")
    parser.add_argument("--name", default="cpp_runner_cpu")
    args = parser.parse_args()
    from safetensors.torch import load_file, save_file

    work = Path(tempfile.mkdtemp(prefix="bench-cpp-"))
    build_times = None
    binary = args.runner
    if binary is None:
        binary, build_times = build_runner(work / "build")
    rows, variants = [], []
    for model_name in args.models.split(","):
        source, resolution = model_source(model_name)
        for preset in args.presets.split(","):
            reused = [d for d in ((args.reuse / f"{model_name}-{preset}", args.reuse / preset) if args.reuse else ())
                      if (d / "manifest.json").is_file() and (model_name == "tiny" or d.name != preset)]
            start = time.perf_counter()
            if reused:
                from postdiff_compile.compile import CompileResult
                from postdiff_compile.exporters.manifest import read_manifest

                result = CompileResult(reused[0], read_manifest(reused[0]), None, {})
                compile_seconds = None
            else:
                result = compile_artifact(source, ConfigRequest(preset), work / f"{model_name}-{preset}",
                                          resolution=resolution, formats="pt2,aoti")
                compile_seconds = round(time.perf_counter() - start, 1)
            manifest = result.manifest
            for v in manifest["variants"]:
                variants.append({"model": model_name, "preset": preset, "variant": v["id"],
                                 "aoti_compile_s": v["files"]["aoti"]["compile_seconds"]})
                print(f"{model_name} {preset} {v['id']}: AOTInductor {v['files']['aoti']['compile_seconds']} s",
                      flush=True)
            spec = next(i for i in manifest["variants"][0]["inputs"] if i["name"] == "encoder_hidden_states")["shape"]
            gen = torch.Generator().manual_seed(0)
            cond, uncond = torch.randn(1, *spec[1:], generator=gen), torch.randn(1, *spec[1:], generator=gen)
            embeddings = work / "embeddings.safetensors"
            save_file({"prompt_embeds": cond, "negative_prompt_embeds": uncond}, str(embeddings))
            py_steps, py_calls, cpp_steps, cpp_calls = [], [], [], []
            for _ in range(2):   # interleaved rounds
                s, c = cpp_times(binary, result.out, embeddings, work / "latents.safetensors", args.repeat)
                cpp_steps += s
                cpp_calls += c
                s, c, latents = python_times(result.out, cond, uncond, args.repeat)
                py_steps += s
                py_calls += c
            agreement = rel_l2(load_file(str(work / "latents.safetensors"))["latents"], latents)
            med = statistics.median
            row = {"model": model_name, "preset": preset, "steps": manifest["steps"],
                   "variants": len(manifest["variants"]), "compile_s": compile_seconds,
                   "python_step_ms": round(med(py_steps), 3), "python_package_ms": round(med(py_calls), 3),
                   "cpp_step_ms": round(med(cpp_steps), 3), "cpp_package_ms": round(med(cpp_calls), 3),
                   "python_overhead_ms": round(med(a - b for a, b in zip(py_steps, py_calls)), 3),
                   "cpp_overhead_ms": round(med(a - b for a, b in zip(cpp_steps, cpp_calls)), 3),
                   "cpp_vs_python_rel_l2": agreement}
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results = {"machine": machine, "repeat": args.repeat, "build_s": build_times, "runs": rows, "variants": variants}
    lines = [f"# C++ runner vs Python runner (AOTInductor packages), {machine}", "",
             f"`python benchmarks/bench_cpp_runner.py --models {args.models} --presets {args.presets} "
             f"--repeat {args.repeat}{f' --reuse {args.reuse}' if args.reuse else ''}`", ""]
    if args.reuse:
        lines += ["Artifacts compiled earlier (`--reuse`): their AOTInductor times come from their manifests.", ""]
    if build_times:
        lines += [f"C++ build (runtimes/cpp against the torch wheel's libtorch): configure {build_times['configure']} s, "
                  f"build {build_times['build']} s.", ""]
    lines += ["Per denoising step, median over generations (ms); overhead = step - package calls.", "",
              "| model | preset | steps | variants | compile s | Python step | Python package | Python overhead | "
              "C++ step | C++ package | C++ overhead | C++ vs Python rel L2 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        compiled = r["compile_s"] if r["compile_s"] is not None else "earlier"
        lines.append(f"| {r['model']} | {r['preset']} | {r['steps']} | {r['variants']} | {compiled} | "
                     f"{r['python_step_ms']:.3f} | {r['python_package_ms']:.3f} | {r['python_overhead_ms']:.3f} | "
                     f"{r['cpp_step_ms']:.3f} | {r['cpp_package_ms']:.3f} | {r['cpp_overhead_ms']:.3f} | "
                     f"{r['cpp_vs_python_rel_l2']:.1e} |")
    lines += ["", "AOTInductor compile time per variant (s):", "", "| model | preset | variant | s |", "|---|---|---|---|"]
    lines += [f"| {v['model']} | {v['preset']} | {v['variant']} | {v['aoti_compile_s']} |" for v in variants]
    write_results(ROOT / "benchmarks" / "results", args.name, results, lines)
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
