"""What the benchmark scripts share: what a results file records about the code and machine that wrote it,
how it is written, the interleaved timing rounds, and the random-weight denoisers they time.

The scripts import it as `common` (benchmarks/ is on sys.path when a script in it runs).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from postdiff_compile.profiling.timing import interleaved_rounds  # noqa: F401  (the scripts import it from here)

# DeepCache with interval 2 and branch 1, as PostDiffConfig overrides: the paper's setting, and the one
# DeepCacheSDHelper is given (set_params(cache_interval=2, cache_branch_id=1)) where it is the peer.
DEEPCACHE = dict(cache_interval=2, cache_branch=1)


def git_commit() -> str | None:
    """The checkout's short commit id, or None outside a git checkout (a copied tree on a lent machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict:
    """When, by which command and at which commit a results file was written."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python", *sys.argv]), "commit": git_commit()}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_results(out: Path, name: str, record: dict, markdown: str | list[str]) -> Path:
    """`record` as out/NAME.json and `markdown` (text, or lines) as out/NAME.md; the markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown if isinstance(markdown, str) else "\n".join(markdown) + "\n"
    (out / f"{name}.md").write_text(text)
    return out / f"{name}.md"


def random_denoiser(family_name: str, device="cpu", dtype=None, seed: int = 0):
    """The family's full-size denoiser (its bundled diffusers config) with seeded random weights, in eval mode."""
    import torch

    from postdiff_compile.models.build import denoiser_class
    from postdiff_compile.models.families import get_family

    family = get_family(family_name)
    config = {k: v for k, v in family.config().items() if not k.startswith("_")}
    torch.manual_seed(seed)
    with torch.device(device):   # initialised where it runs: 860M parameters take a while on a CPU
        model = denoiser_class(family.denoiser_class).from_config(config)
    if dtype is not None and dtype != torch.float32:   # diffusers warns about any .to(dtype), even a no-op one
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def deepcache_helper_run(pipe, generator, **call):
    """A call of `pipe` under DeepCache's own DeepCacheSDHelper with our DeepCache setting (DEEPCACHE), enabled
    for that call only; `generator()` gives each call its fresh generator."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=DEEPCACHE["cache_interval"], cache_branch_id=DEEPCACHE["cache_branch"])

    def run():
        helper.enable()
        try:
            return pipe(**call, generator=generator()).images
        finally:
            helper.disable()
    return run
