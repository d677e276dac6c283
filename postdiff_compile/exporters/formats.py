"""The artifact formats, listed once: `compile` writes through this registry and the runtime opens through it.

Each format is one module holding its writer, its verifier and its opener (imported on first use, so that
`import postdiff_compile` loads no onnx, tensorrt or inductor). A format module defines:

    write(job: VariantJob) -> dict        write one variant; its manifest `files` entry. A format whose file runs
                                          other code than the verified torch graph (ONNX, TensorRT, AOTInductor)
                                          runs it on the job's inputs and records `job.verify`; a .pt2 file is
                                          the verified graph itself, re-exported, and is not run again
    open_file(path, device, sha256, weights) -> fn   the variant file as a callable: tensors in, tensors out;
                                          `weights` (weights_file.ArtifactWeights, or None for a format-1 file)
                                          the artifact's weights the file reads
and may define:
    check_available()                     refuse early a format this machine cannot build (TensorRT without a GPU)
    begin(build: Build) / end(build) / abort(build)   per-build state (the tools' versions; the TensorRT
                                          device), opened before the first variant, closed after the last one
                                          (abort: after a failure)

Every format's graphs use the build's one weights file (`Build.write_weights`, weights_file.py).
    check_file(path)                      what to check before any file is opened (`inspect` runs it)
    check_toolchain(folder, manifest, device)   refuse what this machine cannot run faithfully

Adding a format is a new module and one line in FORMATS.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import PostDiffError
from ..verification import compare_outputs


@dataclass(frozen=True)
class Format:
    name: str                   # the manifest's name: "pt2"
    backend: str                # the runtime backend that opens it: "torch"
    module: str                 # its module, relative to this package
    needs: tuple[str, ...] = ()  # formats it is built from (an engine from the ONNX graph)

    def impl(self) -> ModuleType:
        return importlib.import_module(self.module, __package__)


# In build order: a format comes after those it needs.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("pt2", "torch", ".pt2"),
    Format("onnx", "onnxruntime", ".onnx_export"),
    Format("tensorrt", "tensorrt", ".tensorrt_export", needs=("onnx",)),
    Format("aoti", "aoti", ".aoti"),
)}
BACKENDS = tuple(f.backend for f in FORMATS.values())
DEFAULT_FORMATS = ("pt2",)


def of_backend(backend: str) -> Format:
    for fmt in FORMATS.values():
        if fmt.backend == backend:
            return fmt
    raise PostDiffError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def check_available(formats: tuple[str, ...]) -> None:
    """Before any slow work: one error for a format this machine cannot build."""
    for name in formats:
        check = getattr(FORMATS[name].impl(), "check_available", None)
        if check is not None:
            check()


def parse_formats(formats: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"pt2,onnx" -> ("pt2", "onnx"), with the formats each one is built from."""
    names = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise PostDiffError(f"unknown format {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")
    for name in list(names):
        names.extend(FORMATS[name].needs)
    return tuple(f for f in FORMATS if f in names)


@dataclass(kw_only=True)
class Build:
    """One artifact build, shared by its variants' writers."""
    folder: Path                        # the temporary folder the files go to
    formats: tuple[str, ...]
    device: torch.device                # where the variants' weights are
    dtype_name: str
    tolerance: float                    # relative L2 error every written file must stay within
    reference: str                      # what the files are compared against, for the manifest
    source: str | None = None           # named in errors
    timed: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
    stages: dict[str, float] = field(default_factory=dict)      # seconds per stage, filled by `timed`
    toolchain: dict[str, str] = field(default_factory=dict)     # versions the formats add to the manifest's
    entries: dict[str, Any] = field(default_factory=dict)       # top-level manifest entries formats write
    state: dict[str, Any] = field(default_factory=dict)         # a format's own per-build state, by its name
    weights: Any = None                 # weights_file.WrittenWeights, once write_weights ran

    def write_weights(self, module: torch.nn.Module, extra: dict[str, torch.Tensor] | None = None) -> None:
        """The artifact's one weights file, before any graph: every format's graphs point into it. `extra`: other
        graphs' tensors by the names those graphs give them (ControlNets: controlnet_build.controlnet_tensors)."""
        from .hashing import file_entry
        from .weights_file import FILE, NAMES, WrittenWeights, denoiser_tensors, write_weights

        with self.timed("write weights"):
            path = self.folder / FILE
            write_weights(path, {**denoiser_tensors(module), **(extra or {})})
            self.weights = WrittenWeights(path)
            self.entries["weights"] = {**file_entry(path), "tensors": len(self.weights.index), "names": NAMES}

    def _hook(self, what: str) -> None:
        for name in self.formats:
            hook = getattr(FORMATS[name].impl(), what, None)
            if hook is not None:
                hook(self)

    def __enter__(self) -> Build:
        self._hook("begin")
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self._hook("end" if kind is None else "abort")
        finally:
            if self.weights is not None:
                self.weights.close()


@dataclass(kw_only=True)
class VariantJob:
    """One variant to write in every format of the build, with the inputs and eager outputs to verify against."""
    build: Build
    tag: str                            # the variant id, e.g. "full@b2_8x8"
    variant: Any                        # variants.Variant
    feed: tuple[torch.Tensor, ...]      # the verification inputs, in the artifact's dtype
    expected: tuple[torch.Tensor, ...]  # the eager outputs for `feed`
    seed: int
    program: Any = None                 # the torch.export program, made once by pt2.program_of

    @property
    def stem(self) -> str:
        return self.tag.replace("+", "-")

    def verify(self, got: tuple[torch.Tensor, ...], what: str, under: str = "") -> dict:
        """The manifest's verification entry for outputs `got` of the file `what` ("ONNX graph"), or one error."""
        check = compare_outputs(got, self.expected, self.seed)
        tolerance = self.build.tolerance
        if not check.rel_l2_error <= tolerance:
            raise PostDiffError(f"the {what} of variant {self.tag} differs from its torch variant{under}: relative "
                                f"L2 error {check.rel_l2_error:.3g} > {tolerance:g}", self.build.source)
        return {**check.to_json(), "reference": self.build.reference, "tolerance": tolerance}


def major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def write_variant(job: VariantJob) -> dict[str, dict]:
    """The variant's `files` entry: each format's file, written and verified."""
    return {name: FORMATS[name].impl().write(job) for name in job.build.formats}
