"""The one weights file of an artifact: `weights.safetensors`, every tensor the graphs use, stored once.

Its tensor names are the denoiser's state-dict keys (its parameters and buffers, as `named_parameters` and
`named_buffers` give them), so that every format reads the same bytes: the ONNX graphs point at a tensor's bytes
by offset (external data), the .pt2 programs are saved without weights and bound to these tensors at load, the
AOTInductor packages are compiled without their constants and load them at open; the C++ runner reads the file
with its own safetensors reader. `refit` writes a new file with the same names, shapes, dtypes and layout, so that
every offset stays valid and no graph changes.

Format version 1 artifacts stored the ONNX weights in `weights.bin` (raw bytes at offsets) and a copy of the
weights in every .pt2 program and AOTInductor package; they are still read (V1_FILE).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PostDiffError

FILE = "weights.safetensors"
V1_FILE = "weights.bin"
NAMES = "the denoiser's state-dict keys (its parameters and buffers)"
PARAM_PREFIX = "denoiser."   # the graphs hold the denoiser under this attribute (capture.DenoiserCall)


def denoiser_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by state-dict name, as the graphs' weights are named."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


PAD_PREFIX = "__pad__."   # filler tensors that align the next one; never a state-dict key
# onnxruntime memory-maps an initializer's external data only at an aligned offset, and otherwise reads it into
# memory of its own, per session: with the tensors packed back to back, as the safetensors library writes them,
# opening the four sessions of a full-size SD1.5 `fast` artifact ran out of 24 GB. So, as onnx's own external-data
# writer does, large tensors start at a multiple of 64 KiB and the others at a multiple of 64 bytes; the gaps are
# U8 tensors named PAD_PREFIX + n, because a safetensors file may not have unindexed bytes.
LARGE, LARGE_ALIGN, SMALL_ALIGN = 1 << 20, 1 << 16, 64
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as safetensors, in their order, each aligned (see LARGE_ALIGN)."""
    import json

    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    for name, t in plain.items():
        if t.dtype not in _DTYPES:
            raise PostDiffError(f"tensor {name!r} has dtype {t.dtype}, which the weights file cannot store", path)
    # The header's size first (its digits depend on the offsets): padded with spaces to a multiple of 64 KiB, so
    # that the data starts aligned; an upper bound of the offsets' digits keeps the size fixed.
    entries, layout, offset, pads = {}, [], 0, 0
    for name, t in plain.items():
        nbytes = t.numel() * t.element_size()
        align = LARGE_ALIGN if nbytes >= LARGE else SMALL_ALIGN
        gap = -offset % align
        if gap:
            entries[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            layout.append(gap)
            pads += 1
            offset += gap
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        layout.append(t)
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % LARGE_ALIGN)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for item in layout:
            if isinstance(item, int):
                f.write(b"\0" * item)
            elif item.numel():
                f.write(item.view(torch.uint8).numpy().tobytes() if item.dim() else item.reshape(1).view(torch.uint8)
                        .numpy().tobytes())


@dataclass(frozen=True)
class Stored:
    dtype: str                  # safetensors dtype: "F16"
    shape: tuple[int, ...]
    offset: int                 # absolute offset of the first byte in the file
    length: int


class WeightsIndex:
    """Where each tensor of a weights file lies, from its header alone."""

    def __init__(self, path: Path):
        from ..models.safetensors_header import read_header

        self.path = Path(path)
        header = read_header(self.path)
        header.check_data_present()
        self.tensors = {name: Stored(info.dtype, info.shape, header.data_start + info.begin, info.end - info.begin)
                        for name, info in header.tensors.items() if not name.startswith(PAD_PREFIX)}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> Stored:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.tensors)


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, named as stored. On the CPU the tensors are read into memory once and
    shared by every graph of the artifact that uses them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise PostDiffError(f"cannot read the weights: {err}", path) from None
    return {name: t for name, t in tensors.items() if not name.startswith(PAD_PREFIX)}


def same_layout(new: Path, old: Path) -> None:
    """Refuse a weights file whose tensors do not lie where the artifact's graphs read them."""
    a, b = WeightsIndex(new), WeightsIndex(old)
    for name, stored in b.tensors.items():
        if name not in a:
            raise PostDiffError(f"the new weights have no tensor {name!r}", new)
        if a[name] != stored:
            raise PostDiffError(f"tensor {name!r} is {a[name].dtype} {list(a[name].shape)} at offset "
                                f"{a[name].offset}, the artifact's {stored.dtype} {list(stored.shape)} at "
                                f"{stored.offset}", new)
    extra = sorted(set(a.tensors) - set(b.tensors))
    if extra:
        raise PostDiffError(f"the new weights have a tensor the artifact does not: {extra[0]!r}", new)
    if os.path.getsize(new) != os.path.getsize(old):
        raise PostDiffError("the new weights file is not laid out as the artifact's", new)


class ArtifactWeights:
    """An artifact's weights file at run time: read once per device, the same tensors for every graph."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        key = str(torch.device(device))
        if key not in self._tensors:
            self._tensors[key] = load_weights(self.path, key)
        return self._tensors[key]


class WrittenWeights(ArtifactWeights):
    """The weights file of a build, as the exporters see it while they write graphs that point into it."""

    def __init__(self, path: Path):
        import mmap

        super().__init__(path)
        self.index = WeightsIndex(path)
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None

    def bytes_of(self, name: str) -> bytes | None:
        if name not in self.index or self._map is None:
            return None
        entry = self.index[name]
        return self._map[entry.offset:entry.offset + entry.length]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()


def artifact_weights(folder: Path, manifest: dict) -> ArtifactWeights | None:
    """The weights every graph of a format-2 artifact uses; None for format 1, whose graphs hold their own."""
    entry = manifest.get("weights")
    if manifest.get("format_version", 1) < 2 or entry is None:
        return None
    return ArtifactWeights(Path(folder) / entry["file"])
