"""Read and validate a safetensors header without reading the tensor data.

Format: 8 bytes little-endian u64 N, then N bytes of JSON mapping tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header), plus an
optional "__metadata__" object of strings. Detection of a 4 GB checkpoint reads only these N bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .. import safe_json
from ..errors import PostDiffError

# The safetensors library refuses headers above 100 MB; a real one for SDXL is under 300 KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_RANK = 8   # safetensors has no limit; no denoiser tensor has more than 5 dimensions

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0  # absolute file offset of the first data byte
    file_size: int = 0

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def check_data_present(self) -> None:
        """Raise if the file is shorter than its header promises (an interrupted download or copy)."""
        needed = max((info.end for info in self.tensors.values()), default=0)
        have = self.file_size - self.data_start
        if needed > have:
            raise PostDiffError(
                f"file is truncated: the header describes {needed} bytes of tensor data but only {have} follow it",
                self.path,
            )


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    path = Path(path)
    if not path.exists():
        raise PostDiffError("file not found", path)
    if path.is_dir():
        raise PostDiffError("expected a .safetensors file, found a folder", path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise PostDiffError(f"not a safetensors file: only {len(prefix)} bytes long", path)
        if prefix[:2] == b"PK":  # zip: torch.save's format since 1.6
            raise PostDiffError(
                "not a safetensors file: this looks like a PyTorch pickle checkpoint (.ckpt/.pt/.bin); "
                "convert it to safetensors first (pickles can run arbitrary code, so they are not loaded)",
                path,
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            hint = " (it looks like a legacy PyTorch pickle)" if prefix[:1] == b"\x80" else ""
            raise PostDiffError(
                f"not a valid safetensors file{hint}: header length {header_len} is larger than the file "
                f"({file_size} bytes)",
                path,
            )
        if header_len > MAX_HEADER_BYTES:
            raise PostDiffError(f"not a valid safetensors file: header length {header_len} exceeds 100 MB", path)
        raw = f.read(header_len)
    header = safe_json.loads(raw, path, message="not a valid safetensors file: malformed header JSON ({why})")
    if not isinstance(header, dict):
        raise PostDiffError("not a valid safetensors file: the header is not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PostDiffError("not a valid safetensors file: __metadata__ is not a JSON object of strings", path)
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry, path)
    return SafetensorsHeader(path, tensors, metadata, 8 + header_len, file_size)


def _is_count(value: object) -> bool:
    # JSON true is a Python bool, which is an int: a shape of [true, 4] is not a shape.
    return type(value) is int and 0 <= value < 1 << 63


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tensor_info(name: str, entry: object, path: Path) -> TensorInfo:
    def bad(why: str) -> PostDiffError:
        return PostDiffError(f"not a valid safetensors file: tensor {_short(name)} {why}", path)

    if not isinstance(entry, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
        raise bad(f"has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(f"has invalid data_offsets {_short(offsets)}")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise bad(f"has data_offsets {offsets} that do not match its shape {shape} and dtype {dtype}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def write_header_only(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], dtype: str = "F16",
                      metadata: dict[str, str] | None = None) -> None:
    """Write a valid header with no tensor data after it: a detection fixture for a multi-GB checkpoint."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw)
