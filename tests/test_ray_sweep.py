"""tune on Ray tasks against the serial run, and a sweep whose worker dies. Marker `ray`: these start a local Ray
instance, inside a loopback-only network namespace (tests/ray_support.py)."""
import json
import os
import time
from dataclasses import dataclass

import pytest

from postdiff_compile.lab.reference_models import DEFAULT_FAMILY, load_lab_pipeline
from postdiff_compile.lab.tune import TuneSettings, run_tune
from postdiff_compile.models.families import get_family

pytestmark = pytest.mark.ray


def _stage(name, total):
    return lambda n: None


def test_tune_on_ray_equals_the_serial_run(ray_sweep):
    settings = TuneSettings(flops_budget=0.3, calibration=2, full=2, steps=4)
    pipe, family = load_lab_pipeline(None), get_family(DEFAULT_FAMILY)
    start = time.perf_counter()
    serial = run_tune(pipe, family, settings, _stage)
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    parallel = run_tune(pipe, family, settings, _stage, sweep=ray_sweep)     # workers load the shipped model
    ray_s = time.perf_counter() - start
    print(f"tune, {len(serial.candidates)} candidates: serial {serial_s:.1f} s, Ray (2 CPUs) {ray_s:.1f} s "
          f"(Ray started in {ray_sweep.seconds_to_start:.1f} s before)")
    assert len(serial.candidates) >= 2
    assert [c["name"] for c in parallel.candidates] == [c["name"] for c in serial.candidates]
    for a, b in zip(serial.candidates, parallel.candidates):
        for part in ("calibration", "full"):
            for metric, value in a[part].items():
                assert b[part][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["name"], part, metric)
    assert parallel.best["name"] == serial.best["name"]
    assert parallel.best_on_full["name"] == serial.best_on_full["name"]
    assert (parallel.spearman is None) == (serial.spearman is None)
    if serial.spearman is not None:
        assert parallel.spearman == pytest.approx(serial.spearman, abs=1e-9)


def test_study_on_ray_equals_the_serial_run(ray_sweep):
    from postdiff_compile.config import PRESETS
    from postdiff_compile.lab.evaluate import Sampler
    from postdiff_compile.lab.study import StudySettings, run_study

    settings = StudySettings(prompts=3, seed_sets=2, real=32, steps=(4,))
    points = [Sampler("ddim-4", "ddim", 4), Sampler("mix", config=PRESETS["quality"].for_family(DEFAULT_FAMILY))]
    pipe, family = load_lab_pipeline(None), get_family(DEFAULT_FAMILY)
    serial = run_study(pipe, family, settings, _stage, points)
    parallel = run_study(pipe, family, settings, _stage, points, sweep=ray_sweep)
    assert [r["name"] for r in parallel.rows] == [r["name"] for r in serial.rows]
    for a, b in zip(serial.rows, parallel.rows):
        for metric, values in a["per_set"].items():
            assert b["per_set"][metric] == pytest.approx(values, rel=1e-6, abs=1e-9), (a["name"], metric)
    mine, theirs = serial.rows[2]["vs_fewer_steps"]["frechet"], parallel.rows[2]["vs_fewer_steps"]["frechet"]
    assert theirs["verdict"] == mine["verdict"] and theirs["delta"] == pytest.approx(mine["delta"], rel=1e-6)


@dataclass(frozen=True)
class _DieOnce:
    marker: str
    value: int


def _die_once(job: _DieOnce, pipe=None) -> int:
    """Kills its own worker process the first time it runs (as a crash or an OOM kill would)."""
    if not os.path.exists(job.marker):
        with open(job.marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)
    return job.value * 2


def test_a_task_whose_worker_dies_is_retried(ray_sweep, tmp_path):
    jobs = [_DieOnce(str(tmp_path / "died"), 3), _DieOnce(str(tmp_path / "other"), 5)]
    assert ray_sweep.map(_die_once, jobs) == [6, 10]
    assert json.loads((tmp_path / "died").read_text()) != os.getpid()   # it was a worker, not this process


def test_ray_tests_refuse_to_run_outside_a_loopback_only_namespace(monkeypatch):
    import ray_support

    monkeypatch.setattr(ray_support, "interfaces", lambda: ["lo", "eth0"])
    with pytest.raises(pytest.fail.Exception, match="unshare -n"):
        ray_support.check_namespace()
