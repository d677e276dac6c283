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


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (to the CPU, contiguous; tensors sharing storage are stored each on its own)."""
    from safetensors.torch import save_file

    plain = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        # safetensors refuses two names over one storage (tied weights): store the second one apart.
        plain[name] = tensor.clone() if where in seen and tensor.numel() else tensor
        seen.add(where)
    save_file(plain, str(path))


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
                        for name, info in header.tensors.items()}

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
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise PostDiffError(f"cannot read the weights: {err}", path) from None


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
