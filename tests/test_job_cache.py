"""CachedSweep (lab/job_cache.py, `study`/`tune --cache DIR`): a sweep cut short resumes with the jobs not done,
gives what a run in one go gives, and never reuses results of other weights."""
from dataclasses import dataclass

import pytest

from postdiff_compile.lab.job_cache import CachedSweep, weights_fingerprint
from postdiff_compile.lab.sweep import SerialSweep

RUNS: list[int] = []
FAIL_AT: set[int] = set()


@dataclass(frozen=True)
class _Job:
    n: int
    scale: float


def _score(job: _Job, pipe=None) -> dict:
    if job.n in FAIL_AT:
        raise RuntimeError(f"killed at job {job.n}")
    RUNS.append(job.n)
    return {"value": job.n * job.scale, "list": [job.n, 0.1]}


@pytest.fixture(autouse=True)
def _fresh():
    RUNS.clear()
    FAIL_AT.clear()


def test_a_sweep_cut_short_resumes_with_the_jobs_not_done(tmp_path):
    jobs = [_Job(n, 0.5) for n in range(5)]
    whole = SerialSweep(None).map(_score, jobs)
    RUNS.clear()
    FAIL_AT.add(3)
    cached = CachedSweep(SerialSweep(None), tmp_path / "cache", "weights-a")
    with pytest.raises(RuntimeError, match="killed at job 3"):
        cached.map(_score, jobs)
    assert RUNS == [0, 1, 2] and len(list((tmp_path / "cache").glob("*.json"))) == 3
    FAIL_AT.clear()
    RUNS.clear()
    done = []
    assert cached.map(_score, jobs, on_done=done.append) == whole
    assert RUNS == [3, 4] and cached.reused == 3 and sum(done) == 5
    RUNS.clear()
    assert cached.map(_score, jobs) == whole and RUNS == [] and cached.reused == 5


def test_other_weights_jobs_or_a_damaged_file_run_again(tmp_path):
    jobs = [_Job(n, 0.5) for n in range(3)]
    CachedSweep(SerialSweep(None), tmp_path, "weights-a").map(_score, jobs)
    RUNS.clear()
    assert CachedSweep(SerialSweep(None), tmp_path, "weights-b").map(_score, jobs) == \
        SerialSweep(None).map(_score, jobs)
    assert RUNS == [0, 1, 2, 0, 1, 2]        # another fingerprint: nothing reused
    RUNS.clear()
    CachedSweep(SerialSweep(None), tmp_path, "weights-a").map(_score, [_Job(0, 0.25)])
    assert RUNS == [0]                        # another job (settings): run
    RUNS.clear()
    files = sorted(tmp_path.glob("*.json"), key=lambda p: p.stat().st_mtime)
    files[0].write_text('{"job": "trunc')
    cache = CachedSweep(SerialSweep(None), tmp_path, "weights-a")
    assert cache.map(_score, jobs) == [{"value": n * 0.5, "list": [n, 0.1]} for n in range(3)]
    assert len(RUNS) == 1 and cache.reused == 2 and not list(tmp_path.glob(".*.tmp"))


def test_the_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "w.safetensors"
    weights.write_bytes(b"one")
    (tmp_path / "config.json").write_text("{}")
    first = weights_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text('{"other": 1}')
    assert weights_fingerprint(tmp_path) == first            # configs are in the job's settings, not here
    weights.write_bytes(b"two")
    assert weights_fingerprint(tmp_path) != first
