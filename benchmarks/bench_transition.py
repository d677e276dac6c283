"""Speed of the fused mixed-resolution transition kernel against the eager torch sequence and torch.compile.

Latent sizes of the paper's settings: SD1.5 at 768 px (48x48 -> 96x96) and SDXL at 1024 px (96x96 ->
128x128), C=4, batch 1 and 2, fp16 and fp32, epsilon prediction, fresh noise from a tensor. Providers:
  fused    transition_triton, called directly
  op       the custom op postdiff::resolution_transition (dispatch overhead on top of fused)
  seeded   transition_triton(seed=...): Philox noise drawn in the kernel, no noise tensor to read
  eager    transition_reference: the eager torch sequence (upcast, x0, interpolate, re-noise)
  compile  torch.compile(transition_reference)
Times are triton.testing.do_bench medians (L2 flushed between runs, launch overhead included).

Bytes the transition must move (the minimum, counted once, in the input dtype):
  read sample and model_output at low resolution   2 * B*C*h*w
  read the noise at full resolution                B*C*H*W      (not for "seeded")
  write the output at full resolution              B*C*H*W
GB/s = those bytes / time, for every provider (the eager sequence moves more than that; its figure says
how far it is from the fused minimum). These latents are small (SDXL B=2 fp16: 0.8 MB), so launch latency,
not bandwidth, bounds them all; the % of peak column says so plainly.

--check first runs the kernel against the reference on the GPU (the test-suite matrix plus these sizes),
so one GPU run records correctness and speed. Results: benchmarks/results/transition_<card>.json and .md.
Without a CUDA GPU it says so and exits 0 (the CPU interpreter would time nothing meaningful).

    python benchmarks/bench_transition.py [--check] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from common import write_results   # benchmarks/ is on sys.path when a script runs

CASES = [  # name, B, C, h, w, H, W
    ("sd15-768 B1", 1, 4, 48, 48, 96, 96),
    ("sd15-768 B2", 2, 4, 48, 48, 96, 96),
    ("sdxl-1024 B1", 1, 4, 96, 96, 128, 128),
    ("sdxl-1024 B2", 2, 4, 96, 96, 128, 128),
]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fused", "op", "seeded", "eager", "compile")
# Peak DRAM bandwidth, GB/s, by a substring of torch.cuda.get_device_name (datasheet figures).
PEAK_GBS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008}
# The correctness matrix of --check: (B, h, w, H, W), tests/test_transition_kernel.py's plus the bench sizes.
CHECK_SIZES = [(1, 9, 13, 17, 26), (2, 12, 8, 24, 16), (2, 6, 6, 8, 8), (1, 5, 7, 10, 14), (1, 9, 13, 6, 8),
               (2, 48, 48, 96, 96), (2, 96, 96, 128, 128)]
CHECK_TOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def peak_gbs(card: str) -> int | None:
    """The card's peak DRAM bandwidth (GB/s) from PEAK_GBS, or None for a card it does not list."""
    return next((v for k, v in PEAK_GBS.items() if k in card), None)


def transition_bytes(B, C, h, w, H, W, dtype, noise_tensor=True) -> int:
    elements = 2 * B * C * h * w + (2 if noise_tensor else 1) * B * C * H * W
    return elements * torch.empty((), dtype=dtype).element_size()


def check(device) -> dict:
    """The kernel against the float32 reference on `device`; max relative error per dtype."""
    from postdiff_compile.verification import rel_l2
    from postdiff_compile.kernels.transition_ref import (PREDICTION_TYPES, RENOISE_MODES, TransitionParams,
                                                         transition_reference)
    from postdiff_compile.kernels.transition_triton import philox_normal, transition_triton

    worst = {str(dt): 0.0 for dt in CHECK_TOL}
    count = 0
    g = torch.Generator().manual_seed(0)
    for B, h, w, H, W in CHECK_SIZES:
        for dtype in CHECK_TOL:
            x = torch.randn(B, 4, h, w, generator=g).to(device, dtype)
            m = torch.randn(B, 4, h, w, generator=g).to(device, dtype)
            noise = torch.randn(B, 4, H, W, generator=g).to(device, dtype)
            for pred in PREDICTION_TYPES:
                for renoise in RENOISE_MODES + ("seed",):
                    for clamp in (0.0, 1.0):
                        params = TransitionParams(pred, 0.35, 0.62, "predicted" if renoise == "predicted" else "fresh",
                                                  clamp)
                        if renoise == "fresh":
                            out = transition_triton(x, m, (H, W), params, noise=noise)
                            n32 = noise.float()
                        elif renoise == "seed":
                            out = transition_triton(x, m, (H, W), params, seed=1234)
                            n32 = philox_normal((B, 4, H, W), 1234, device)
                        else:
                            out = transition_triton(x, m, (H, W), params)
                            n32 = None
                        err = rel_l2(out, transition_reference(x.float(), m.float(), (H, W), params, n32))
                        worst[str(dtype)] = max(worst[str(dtype)], err)
                        count += 1
    passed = all(worst[str(dt)] < tol for dt, tol in CHECK_TOL.items())
    return {"cases": count, "max_rel_err": worst, "tolerance": {str(k): v for k, v in CHECK_TOL.items()},
            "passed": passed}


def bench(device, peak) -> list[dict]:
    import triton.testing

    from postdiff_compile.verification import rel_l2
    from postdiff_compile.kernels.transition_op import resolution_transition
    from postdiff_compile.kernels.transition_ref import TransitionParams, transition_reference
    from postdiff_compile.kernels.transition_triton import transition_triton

    # One compiled function sees every (shape, dtype): let it keep a graph for each.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    compiled = torch.compile(transition_reference, dynamic=False)
    params = TransitionParams("epsilon", 0.35, 0.62)
    rows = []
    for name, B, C, h, w, H, W in CASES:
        for dname, dtype in DTYPES.items():
            x = torch.randn(B, C, h, w, device=device, dtype=dtype)
            m = torch.randn(B, C, h, w, device=device, dtype=dtype)
            noise = torch.randn(B, C, H, W, device=device, dtype=dtype)
            fns = {
                "fused": lambda: transition_triton(x, m, (H, W), params, noise=noise),
                "op": lambda: resolution_transition(x, m, (H, W), params, noise=noise),
                "seeded": lambda: transition_triton(x, m, (H, W), params, seed=0),
                "eager": lambda: transition_reference(x, m, (H, W), params, noise),
                "compile": lambda: compiled(x, m, (H, W), params, noise),
            }
            expected = transition_reference(x, m, (H, W), params, noise)
            for provider in PROVIDERS:
                fn = fns[provider]
                if provider != "seeded":  # the seeded one draws other noise
                    assert rel_l2(fn(), expected) < CHECK_TOL[dtype], (name, dname, provider)
                ms, ms_lo, ms_hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                nbytes = transition_bytes(B, C, h, w, H, W, dtype, noise_tensor=provider != "seeded")
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"case": name, "dtype": dname, "provider": provider, "B": B, "C": C,
                             "low": [h, w], "full": [H, W], "ms": ms, "ms_p20": ms_lo, "ms_p80": ms_hi,
                             "bytes": nbytes, "gbs": gbs, "pct_peak": None if peak is None else 100 * gbs / peak})
            print(_format_rows(rows[-len(PROVIDERS):], header=not rows[:-len(PROVIDERS)]), flush=True)
    return rows


def _format_rows(rows, header=True) -> str:
    lines = ["| case | dtype | provider | ms (p50) | ms p20-p80 | MB moved | GB/s | % of peak | vs eager |",
             "|---|---|---|---|---|---|---|---|---|"] if header else []
    eager = {(r["case"], r["dtype"]): r["ms"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        pct = "-" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}"
        eager_ms = eager.get((r["case"], r["dtype"]))
        speedup = "-" if eager_ms is None else f"{eager_ms / r['ms']:.2f}x"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['provider']} | {r['ms']:.4f} | {r['ms_p20']:.4f}-"
                     f"{r['ms_p80']:.4f} | {r['bytes'] / 1e6:.3f} | {r['gbs']:.0f} | {pct} | {speedup} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check kernel == reference on the GPU first")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_transition needs a CUDA GPU; nothing to time here. (The kernel's correctness on CPU is "
              "tests/test_transition_kernel.py, under TRITON_INTERPRET=1.)")
        return 0
    import triton

    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    peak = peak_gbs(card)
    result = {"card": card, "peak_gbs": peak, "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda}
    if args.check:
        result["check"] = check(device)
        print(f"check: {result['check']}", flush=True)
    result["rows"] = bench(device, peak)

    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    md = [f"# Mixed-resolution transition kernel, {card}", "",
          f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
          f"peak DRAM bandwidth {peak or 'unknown'} GB/s; epsilon prediction, fresh noise; "
          "do_bench median, L2 flushed, launch included. Bytes = the transition's minimum "
          "(2 low-res reads + noise read + output write; seeded: no noise read).", ""]
    if "check" in result:
        c = result["check"]
        md += [f"Correctness (--check, {c['cases']} cases): max relative error "
               + ", ".join(f"{k} {v:.2e}" for k, v in c["max_rel_err"].items())
               + f" -> {'passed' if c['passed'] else 'FAILED'}", ""]
    md.append(_format_rows(result["rows"]))
    print(f"wrote {write_results(args.out, f'transition_{slug}', result, md)}")
    return 0 if result.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
