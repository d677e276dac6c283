"""A short probe of a device's ceilings for the roofline estimate: matmul rate, copy bandwidth, one tiny op."""
from __future__ import annotations

import statistics
import time

import torch

from ..costs import DevicePeak


def _median_s(fn, device: torch.device, repeat: int) -> float:
    fn()   # warm: allocations, kernel selection
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype) -> DevicePeak:
    """About a second on a CPU. A CPU computes float16 through float32 at best, so it is probed in float32."""
    gpu = device.type == "cuda"
    dtype = dtype if gpu else torch.float32
    n = 4096 if gpu else 768
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul = _median_s(lambda: torch.mm(a, b), device, 5)
    elements = (256 if gpu else 16) * 2**20
    src, dst = torch.empty(elements, device=device, dtype=dtype), torch.empty(elements, device=device, dtype=dtype)
    src.fill_(1)
    copy = _median_s(lambda: dst.copy_(src), device, 5)
    tiny = torch.ones(8, device=device, dtype=dtype)
    per_op = _median_s(lambda: [torch.add(tiny, 1) for _ in range(200)], device, 5) / 200
    return DevicePeak(matmul_gflops=round(2 * n**3 / matmul / 1e9, 2),
                      copy_gbs=round(2 * elements * src.element_size() / copy / 1e9, 2),
                      op_us=round(per_op * 1e6, 3))
