"""The step schedule as plain data: for each denoising step, which variant runs and whether CFG is on.

The plan is what a runtime (Python or C++) walks; nothing in a graph knows which step it is on. The
caching and mixed-resolution passes add cache reads/writes and the resolution switch to the steps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import PostDiffConfig
from .errors import PostDiffError


@dataclass(frozen=True)
class Step:
    index: int
    variant: str        # name of the variant graph this step calls, e.g. "full"
    cfg: bool           # classifier-free guidance: the batch holds the negative and positive halves

    def to_json(self) -> dict:
        return asdict(self)


def build_plan(config: PostDiffConfig, num_steps: int, cfg: bool = True) -> list[Step]:
    if num_steps < 1:
        raise PostDiffError(f"the number of steps must be at least 1, got {num_steps}")
    missing = config.unsupported_features()
    if missing:
        raise PostDiffError(
            f"this version of postdiff-compile cannot run {', '.join(missing)} yet; use preset 'none' "
            "without those overrides"
        )
    return [Step(i, "full", cfg) for i in range(num_steps)]
