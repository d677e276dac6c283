"""One artifact variant file opened on a backend, callable like an in-memory variant.

The opener is the format's (exporters/formats.py); a `BackendVariant` called with torch tensors in the order of
`.inputs` returns torch tensors in the order of `.outputs` on the runner's device, so that the denoising loop
does not know which backend it drives.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..exporters.formats import of_backend
from ..exporters.manifest import member


@dataclass
class BackendVariant:
    id: str
    inputs: list[str]
    outputs: list[str]
    run: Callable[..., tuple[torch.Tensor, ...]]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.run(*inputs))


def open_variant(backend: str, folder: Path, entry: dict, device: torch.device, weights=None) -> BackendVariant:
    """`weights`: the artifact's weights file (weights_file.ArtifactWeights) for the graphs that name it."""
    fmt = of_backend(backend)
    file = entry["files"][fmt.name]
    path = member(folder, file["file"], f"{fmt.name} graph of variant {entry['id']}")
    run = fmt.impl().open_file(path, device, file["sha256"], weights if "weights" in file else None)
    return BackendVariant(entry["id"], [i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]], run)
