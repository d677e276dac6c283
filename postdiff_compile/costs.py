"""Cost tables: what each variant costs on one device and backend, measured, and what the runner costs around
the variant calls. `postdiff-compile profile` writes them; `explain --costs`, `tune --objective latency` and
`--preset P --costs` read them (predict.py turns one into a plan's predicted latency).

A table is data only (JSON, read with safe_json): an artifact's profiling sidecar `costs/<backend>@<device>.json`
is outside the manifest's checksum, so profiling leaves the artifact the same artifact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import safe_json
from .errors import PostDiffError

COSTS_VERSION = 1
SIDECAR_FOLDER = "costs"


@dataclass(frozen=True)
class DevicePeak:
    """What a short probe measured on the device: the roofline's two ceilings and the cost of one tiny op."""
    matmul_gflops: float     # a square matmul in the table's dtype
    copy_gbs: float          # bytes read + written per second by a large copy
    op_us: float             # one tiny element-wise op, dispatch and launch included


@dataclass(frozen=True)
class CostTable:
    device: str                        # "AMD EPYC ... (2 threads)" or the GPU's name
    backend: str                       # eager, torch, onnxruntime, aoti, tensorrt
    family: str
    dtype: str
    cache_branch: int                  # of the shallow variants measured (their cost depends on it)
    variants_ms: dict[str, float]      # by variant id, "full@b2_32x32": median of warm, interleaved calls
    step_overhead_ms: float            # the runner's time per step outside the variant calls
    toolchain: dict[str, str] = field(default_factory=dict)
    peak: DevicePeak | None = None     # for the roofline estimate of variants the table has not measured
    measured_total_ms: float | None = None   # the profiled plan's generations, for comparison with a prediction
    profiled_config: dict | None = None
    steps: int | None = None
    created: str = ""

    def __post_init__(self) -> None:
        bad = [k for k, v in self.variants_ms.items() if not (isinstance(v, (int, float)) and 0 < v < 1e9)]
        if bad or not 0 <= self.step_overhead_ms < 1e9:
            raise PostDiffError(f"cost table: times must be positive milliseconds (variants {', '.join(bad) or '-'}, "
                                f"step overhead {self.step_overhead_ms})")

    def to_json(self) -> dict:
        return {"costs_version": COSTS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str | Path | None = None) -> CostTable:
        if not isinstance(data, dict) or data.get("costs_version") != COSTS_VERSION:
            raise PostDiffError(f"not a cost table of version {COSTS_VERSION} (postdiff-compile profile writes them)",
                                source)
        data = {k: v for k, v in data.items() if k != "costs_version"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PostDiffError(f"cost table: unknown field(s) {', '.join(unknown)}", source)
        try:
            peak = data.get("peak")
            if peak is not None:
                data["peak"] = DevicePeak(**peak)
            table = cls(**data)
        except TypeError as err:
            raise PostDiffError(f"cost table: {err}", source) from None
        except PostDiffError as err:
            raise PostDiffError(str(err), source) from None
        if not isinstance(table.variants_ms, dict) or not table.variants_ms:
            raise PostDiffError("cost table: no variant times", source)
        return table

    @classmethod
    def read(cls, path: str | Path) -> CostTable:
        path = Path(path)
        if not path.is_file():
            raise PostDiffError("cost table not found", path)
        data = safe_json.loads(path.read_bytes(), path, message="cost table is not valid JSON ({why})")
        if isinstance(data, dict) and "costs_version" not in data and isinstance(data.get("table"), dict):
            data = data["table"]   # a `profile` results file: the table and each variant's roofline
        return cls.from_json(data, path)

    def write(self, path: str | Path) -> Path:
        """Written beside its target and moved into place, so that a reader never sees half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def sidecar_path(folder: str | Path, backend: str, device: str) -> Path:
    """Where `profile` keeps an artifact's table for one backend and device."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", device).strip("-")[:80] or "device"
    return Path(folder) / SIDECAR_FOLDER / f"{backend}@{slug}.json"
