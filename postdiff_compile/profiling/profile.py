"""`profile`: what each variant of a plan costs on this device and backend, and what the runner costs around them.

1. One warm generation through a recording wrapper learns the plan's variants, with the inputs and outputs of
   each one's first call (real values: caches, timesteps).
2. Every variant is timed alone on those inputs: warm, interleaved rounds (one call of each per round, the order
   rotated), median.
3. The runner's overhead per step is timed with every variant replaced by a stub that returns its recorded
   outputs: the scheduler update, CFG combination, cache bookkeeping and the transition, with no graph run. It is
   measured apart from the variant times, so that a prediction built from the two can be checked against
4. real generations, also timed (the table records their median beside the prediction).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..capture import Bucket, TensorSpec, example_inputs
from ..costs import CostTable, sidecar_path
from .probe import measure_peak, sync
from .timing import interleaved_rounds


class _Recorded:
    """A variant as the loop sees it; calls go to the real one (timed, first inputs and outputs kept) or, as a
    stub, return the kept outputs."""

    def __init__(self, variant, variant_id: str, owner: "_Recorder"):
        self.variant, self.id, self.owner = variant, variant_id, owner
        self.inputs, self.outputs = variant.inputs, variant.outputs
        self.example: tuple[torch.Tensor, ...] | None = None
        self.result: tuple[torch.Tensor, ...] | None = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.owner.stub:
            return self.result
        result = tuple(self.variant(*inputs))
        if self.example is None:
            self.example = tuple(t.clone() for t in inputs)
            self.result = tuple(t.clone() for t in result)
        return result


class _Recorder:
    """A VariantSource over another one, keeping one _Recorded per variant, in the order the plan first runs them."""

    def __init__(self, source):
        self.source, self.stub = source, False
        self.seen: dict[str, _Recorded] = {}
        self.calls: list[str] = []   # the variant of each step, since the last clear

    def get(self, name: str, bucket: Bucket, cache_branch: int = 0) -> _Recorded:
        variant_id = f"{name}@{bucket.tag}"
        self.calls.append(variant_id)
        if variant_id not in self.seen:
            self.seen[variant_id] = _Recorded(self.source.get(name, bucket, cache_branch), variant_id, self)
        return self.seen[variant_id]


@dataclass
class ProfileResult:
    table: CostTable
    variant_runs_ms: dict[str, list[float]]
    plan_ids: list[str]                  # the variant of each step
    generation_ms: list[float]
    overhead_runs_ms: list[float]
    sidecar: Path | None = None
    denoiser_config: dict | None = None   # the architecture profiled (for its graphs' roofline)
    generate: Callable[[], object] | None = None   # one more real generation, on what was profiled
    calls: dict[str, Callable[[], object]] = field(default_factory=dict)   # one timed call of each variant

    @property
    def predicted_ms(self) -> float:
        """The profiled plan's time as the table predicts it (what explain --costs prints for it)."""
        t = self.table
        return sum(t.variants_ms[v] for v in self.plan_ids) + t.step_overhead_ms * len(self.plan_ids)


def measure(generate: Callable[[object], object], source, steps: int, device: torch.device, rounds: int,
            on_stage: Callable[[str], None] | None = None) -> dict:
    """Steps 1-4 of the module docstring. `generate(variant_source)` runs one generation over `source`."""
    say = on_stage or (lambda text: None)
    recorder = _Recorder(source)
    say("warm-up generation")
    generate(recorder)
    recorder.calls.clear()
    generate(recorder)   # warm: every backend's first call of a graph is slower
    plan_ids = list(recorder.calls)
    say(f"timing {len(recorder.seen)} variants, {rounds} interleaved rounds")

    def call(v: _Recorded):
        return lambda: v.variant(*v.example)
    runs = {v.id: call(v) for v in recorder.seen.values()}
    for fn in runs.values():
        fn()
    variant_s = interleaved_rounds(runs, rounds, sync=lambda: sync(device))
    say(f"timing the runner with stub variants and {rounds} real generations")

    def timed_generation(stub: bool) -> Callable[[], None]:
        def run():
            recorder.stub = stub
            generate(recorder)
        return run
    loop_s = interleaved_rounds({"stub": timed_generation(True), "real": timed_generation(False)}, rounds,
                                sync=lambda: sync(device))
    recorder.stub = False
    return {"variant_runs_ms": {k: [1e3 * t for t in v] for k, v in variant_s.items()}, "plan_ids": plan_ids,
            "calls": runs,
            "overhead_runs_ms": [1e3 * t / steps for t in loop_s["stub"]],
            "generation_ms": [1e3 * t for t in loop_s["real"]]}


def build_table(measured: dict, *, device_name: str, backend: str, family: str, dtype: torch.dtype, cache_branch: int,
                toolchain: dict, config: dict, steps: int, peak_device: torch.device | None) -> CostTable:
    med = statistics.median
    return CostTable(device=device_name, backend=backend, family=family, dtype=str(dtype).removeprefix("torch."),
                     cache_branch=cache_branch,
                     variants_ms={k: round(med(v), 4) for k, v in measured["variant_runs_ms"].items()},
                     step_overhead_ms=round(med(measured["overhead_runs_ms"]), 4), toolchain=toolchain,
                     peak=measure_peak(peak_device, dtype) if peak_device is not None else None,
                     measured_total_ms=round(med(measured["generation_ms"]), 3), profiled_config=config, steps=steps,
                     created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or 'CPU'} ({torch.get_num_threads()} threads)"


def conditioning(specs: list[TensorSpec], device: torch.device, dtype: torch.dtype, added: tuple[str, ...]) -> dict:
    """Fixed random batch-1 embeddings and added inputs for timing (the values do not change the time)."""
    one = [TensorSpec(s.name, (1, *s.shape[1:]), s.dtype) for s in specs]
    values = {s.name: t.to(device, dtype) for s, t in zip(one, example_inputs(one))}
    cond = {k: values[k] for k in added if k in values}
    embeds = values["encoder_hidden_states"]
    return {"prompt_embeds": embeds, "negative_prompt_embeds": torch.randn_like(embeds),
            "added_cond": cond or None, "negative_added_cond": cond or None}


def with_result(measured: dict, table: CostTable, denoiser_config: dict | None, generate: Callable[[], object],
                sidecar: Path | None = None) -> ProfileResult:
    return ProfileResult(table, measured["variant_runs_ms"], measured["plan_ids"], measured["generation_ms"],
                         measured["overhead_runs_ms"], sidecar, denoiser_config, generate, calls=measured["calls"])


def write_sidecar(folder: Path, table: CostTable) -> Path:
    return table.write(sidecar_path(folder, table.backend, table.device))
