"""sha256 of files and the manifest's entry for a written file (a file name, its sha256 and its size)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """The manifest's entry for a written file."""
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
