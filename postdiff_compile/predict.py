"""A plan's latency on a device, predicted from a cost table instead of counted in FLOPs.

A step costs its variant's measured time plus the runner's measured overhead per step. A variant the table has
not measured (another config's variants, another branch) costs its roofline estimate (metrics/roofline.py) scaled
by how far the estimates of the measured variants were off on this device and backend: the median of measured /
estimated. Without a probe in the table, an unmeasured variant is an error naming it.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .costs import CostTable
from .errors import PostDiffError
from .metrics.roofline import Traffic


@dataclass(frozen=True)
class Latency:
    """Predicted milliseconds of each step's variant call (in plan order), whether each was measured, and
    the runner's overhead per step."""
    device: str
    backend: str
    step_ms: tuple[float, ...]
    measured: tuple[bool, ...]
    overhead_ms: float
    calibration: float | None       # measured / roofline of the measured variants (None: no probe)

    @property
    def total_ms(self) -> float:
        return sum(self.step_ms) + self.overhead_ms * len(self.step_ms)

    def to_json(self) -> dict:
        return {"device": self.device, "backend": self.backend, "total_ms": round(self.total_ms, 3),
                "overhead_ms_per_step": self.overhead_ms, "roofline_calibration": self.calibration,
                "steps_ms": [round(ms, 3) for ms in self.step_ms], "measured": list(self.measured)}


class Predictor:
    """Variant times from one table; `traffic_of(variant_id, cache_branch)` gives the graph traffic of any variant
    (explain's meta-device captures), asked only for what the table lacks and for the calibration."""

    def __init__(self, table: CostTable, family: str, cache_branch: int, itemsize: int,
                 traffic_of: Callable[[str, int], Traffic]):
        if table.family != family:
            raise PostDiffError(f"the cost table was measured on a {table.family} denoiser, not {family}")
        self.table, self.branch, self.itemsize, self.traffic_of = table, cache_branch, itemsize, traffic_of
        self._calibration: float | None = None

    def _measured(self, variant_id: str) -> float | None:
        shallow = variant_id.startswith("shallow")   # a shallow variant's cost depends on the branch it keeps
        if shallow and self.branch != self.table.cache_branch:
            return None
        return self.table.variants_ms.get(variant_id)

    @property
    def calibration(self) -> float | None:
        if self.table.peak is None:
            return None
        if self._calibration is None:
            ratios = [ms / self.traffic_of(v, self.table.cache_branch).estimate_ms(self.table.peak, self.itemsize)
                      for v, ms in sorted(self.table.variants_ms.items())]
            self._calibration = statistics.median(ratios)
        return self._calibration

    def variant_ms(self, variant_id: str) -> tuple[float, bool]:
        measured = self._measured(variant_id)
        if measured is not None:
            return measured, True
        if self.table.peak is None:
            raise PostDiffError(f"the cost table ({self.table.backend} on {self.table.device}) has no time for "
                                f"variant {variant_id} and no device probe to estimate it; profile an artifact "
                                "that runs it")
        estimate = self.traffic_of(variant_id, self.branch).estimate_ms(self.table.peak, self.itemsize)
        return estimate * self.calibration, False

    def latency(self, variant_ids: list[str]) -> Latency:
        times = [self.variant_ms(v) for v in variant_ids]
        return Latency(self.table.device, self.table.backend, tuple(ms for ms, _ in times),
                       tuple(m for _, m in times), self.table.step_overhead_ms, self.calibration)
