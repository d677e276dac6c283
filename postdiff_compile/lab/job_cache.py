"""A sweep that keeps each finished job's result as a file, so that a study or tune cut short resumes where it
stopped (`--cache DIR`). On reference model 2 the study is 17 points x 3 sets x 192 images, hours on two CPU
cores: longer than one sitting, and a crash or a killed session would otherwise lose all of it.

A result is found by a key over the job function, the job (a frozen dataclass: its model folder, sampler or
configuration, prompt set and settings), the model's weights (sha256 of its .safetensors files, so that
re-shipped or retrained weights are never mixed with old results) and the package version. Results are JSON
files written atomically; jobs not found run on the inner sweep (serial or Ray) a chunk at a time, each chunk's
results saved before the next starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import PostDiffError


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over the folder's .safetensors files (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def job_key(fn: Callable, job, fingerprint: str) -> str:
    from ..version import __version__

    text = json.dumps({"fn": f"{fn.__module__}.{fn.__qualname__}", "job": repr(job), "weights": fingerprint,
                       "version": __version__})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class CachedSweep:
    """`inner` (SerialSweep or RaySweep) with the results of finished jobs kept in `folder`."""

    def __init__(self, inner, folder: str | Path, fingerprint: str, chunk: int = 1):
        self.inner, self.folder, self.fingerprint, self.chunk = inner, Path(folder), fingerprint, max(1, chunk)
        self.reused = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PostDiffError(f"cannot make the cache folder: {err.strerror}", folder) from None

    def _load(self, key: str):
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["result"]
        except (OSError, ValueError, KeyError):
            return None    # a file that is not ours whole: the job runs again and replaces it

    def _save(self, key: str, job, result) -> None:
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"job": repr(job), "result": result}, default=float))
        os.replace(tmp, self.folder / f"{key}.json")

    def map(self, fn: Callable, jobs: Sequence, on_done: Callable[[int], None] | None = None) -> list:
        keys = [job_key(fn, job, self.fingerprint) for job in jobs]
        found = {k: r for k in keys if (r := self._load(k)) is not None}
        self.reused = len(found)
        if on_done and found:
            on_done(len(found))
        todo = [(k, job) for k, job in zip(keys, jobs) if k not in found]
        for start in range(0, len(todo), self.chunk):
            chunk = todo[start:start + self.chunk]
            for (key, job), result in zip(chunk, self.inner.map(fn, [j for _, j in chunk], on_done)):
                # Through JSON as a reused result is, so that a resumed run and one in a go give the same numbers.
                self._save(key, job, result)
                found[key] = json.loads(json.dumps(result, default=float))
        return [found[k] for k in keys]
