"""Where the independent jobs of a sweep (tune's candidates, study's points) run: one after another in this
process, or as Ray tasks, on a local Ray instance or a cluster.

A job is a small frozen dataclass and its function a module-level function `fn(job, pipe=None)`, so Ray can ship
both; the function gets its model from `lab_state`, which a worker builds once from the job's model folder and a
serial sweep fills with the pipeline already in memory. Every job draws its prompts and noise from its own seeds,
so a job computes the same numbers wherever it runs, and the driver writes the results, in the jobs' order, as
the serial run does. A task whose worker dies is retried (`RETRIES`); a job that raises fails the sweep.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RETRIES = 3     # a task whose worker process died (killed, out of memory) runs again, up to this many times


@dataclass
class LabState:
    """What every job of one model needs, built once per process: the pipeline, the classifier of its image size,
    the real images' features and, by key, anything else a job function memoises (reference images)."""
    pipe: Any
    classifier: Any
    memo: dict = field(default_factory=dict)

    def once(self, key, make: Callable[[], Any]):
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


_STATES: dict = {}


def lab_state(model: str | None, pipe=None) -> LabState:
    """The process's state for `model` (a reference-model folder; None: the shipped default, model 2), around `pipe` if
    given (a serial sweep's pipeline, already loaded)."""
    key = (model, id(pipe))
    if key not in _STATES:
        from .classifier import load_classifier
        from .reference_models import load_lab_pipeline

        if pipe is None:
            pipe = load_lab_pipeline(model)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        _STATES[key] = LabState(pipe, load_classifier(size=size))
    return _STATES[key]


class SerialSweep:
    """The jobs one after another in this process, on the pipeline given."""

    def __init__(self, pipe):
        self.pipe = pipe

    def map(self, fn: Callable, jobs: Sequence, on_done: Callable[[int], None] | None = None) -> list:
        results = []
        for job in jobs:
            results.append(fn(job, pipe=self.pipe))
            if on_done:
                on_done(1)
        return results


def _run_in_worker(fn: Callable, job, threads: int):
    import torch

    torch.set_num_threads(threads)
    return fn(job)


class RaySweep:
    """The jobs as Ray tasks, one CPU and `threads` torch threads each. `address` None starts a local Ray instance
    (ray.init's default; its listeners are Ray's: run it where that is acceptable, docs/serving.md) with
    `num_cpus` CPUs; "auto" or "ray://HOST:PORT" joins a running cluster, whose workers need postdiff-compile
    installed and the model folder at the same path."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, threads: int = 1,
                 temp_dir: str | None = None):
        self.address, self.num_cpus, self.threads, self.temp_dir = address, num_cpus, threads, temp_dir
        self.seconds_to_start = None

    def __enter__(self) -> "RaySweep":
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        start = time.perf_counter()
        kwargs = dict(include_dashboard=False, log_to_driver=False)
        if self.address is None:
            kwargs.update(num_cpus=self.num_cpus, _temp_dir=self.temp_dir)
        ray.init(address=self.address, **kwargs)
        self.seconds_to_start = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()

    def map(self, fn: Callable, jobs: Sequence, on_done: Callable[[int], None] | None = None) -> list:
        import ray

        task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(_run_in_worker)
        refs = [task.remote(fn, job, self.threads) for job in jobs]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if on_done:
                on_done(len(done))
        return ray.get(refs)
