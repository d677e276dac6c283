"""postdiff-compile: a training-free deployment compiler for diffusion denoisers.

Public API (imports stay light: torch, diffusers and the exporters load on first use):
    optimize(pipe, preset="none", **overrides)   run a diffusers pipeline through the postdiff runtime
    restore(pipe)                                undo optimize
    load(DIR, backend="torch")                   run a compiled artifact (torch, onnxruntime or tensorrt)
    load_denoiser(source, dtype=None)            offline loading with family detection
    PostDiffConfig, PRESETS, resolve_config      what to apply
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import PRESETS, PostDiffConfig, resolve_config
from .errors import PostDiffError
from .version import __version__  # noqa: F401  (the package face shows it)

__all__ = ["optimize", "restore", "load", "load_denoiser", "PostDiffConfig", "PostDiffError", "PRESETS", "resolve_config"]

if TYPE_CHECKING:
    from .models.load import load_denoiser
    from .runtime.artifact import load
    from .runtime.pipeline import optimize, restore


def __getattr__(name: str) -> Any:
    if name in ("optimize", "restore"):
        from .runtime import pipeline

        return getattr(pipeline, name)
    if name == "load":
        from .runtime.artifact import load

        return load
    if name == "load_denoiser":
        from .models.load import load_denoiser

        return load_denoiser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
