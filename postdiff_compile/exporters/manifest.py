"""manifest.json: what an artifact holds, where it came from and how well each graph was verified.

Format version 0 is the foundation's draft; the exporters issue freezes version 1 with a JSON Schema.
"""
from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from pathlib import Path

FORMAT = "postdiff-artifact"
FORMAT_VERSION = 0


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def toolchain() -> dict[str, str]:
    import diffusers
    import safetensors
    import torch

    from .. import __version__

    return {"postdiff_compile": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
            "platform": platform.platform()}


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / "manifest.json"
    path.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n")
    return path
