"""One weights file shared by every ONNX variant of an artifact.

Each variant's ONNX graph refers to its initializers as external data (location, offset, length) in the
same `weights.bin`, so a tensor that ten variants use is stored once: a `fast` artifact holds about as
many weight bytes as the checkpoint, not ten copies. ONNX Runtime and TensorRT's parser both read
external data at an offset.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

FILE = "weights.bin"
# onnx's own external-data writer aligns large tensors to 64 KiB so that they can be memory-mapped on
# every platform; small ones only to 64 bytes, to keep the file dense.
LARGE = 1 << 20
LARGE_ALIGN = 1 << 16
SMALL_ALIGN = 64


class WeightsFile:
    """Appends tensors' bytes once each; the key is (name, content) so that a name never aliases two values."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / FILE
        self._file = open(self.path, "wb")
        self._index: dict[tuple[str, str], tuple[int, int]] = {}

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """(offset, length) of `data` in the file, writing it if this name/content is new."""
        key = (name, hashlib.sha256(data).hexdigest())
        if key not in self._index:
            align = LARGE_ALIGN if len(data) >= LARGE else SMALL_ALIGN
            self._file.write(b"\0" * (-self._file.tell() % align))
            offset = self._file.tell()
            self._file.write(data)
            self._index[key] = (offset, len(data))
        return self._index[key]

    @property
    def tensors(self) -> int:
        return len(self._index)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "WeightsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
