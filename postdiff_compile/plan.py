"""The step schedule as plain data: for each denoising step, which variant runs, the caches it reads and
writes, and whether CFG is on.

The plan is what a runtime (Python or C++) walks; nothing in a graph knows which step it is on.

Rules (peers.md 1.5, 2.3-2.5):
- DeepCache: a step is full when (i - start) % cache_interval == 0 ("uniform", DeepCacheSDHelper with
  start = 0), or when it is in the DeepCache paper code's `sample_from_quad_center` set ("quad_center").
  Other steps are shallow and read the deep feature of the last full step. A full step writes the
  feature when the next step reads it.
- Cross-attention cache with step m: steps < m run with CFG; step m - 1 is full and writes every attn2
  output; steps >= m run without CFG (batch 1, on the negative embeddings as T-GATE does) and read them.
- Both: the deep feature of a CFG step has the CFG batch and cannot feed a batch-1 step, and step m - 1
  must compute every attn2 to write them. So, as T-GATE's DeepCache loaders do, steps m - 1 and m are
  full and the uniform schedule restarts at each of them (start = m - 1, then start = m). Without CFG
  (LCM) only step m - 1 is forced full: the batch does not change at m. `check_plan`
  proves that every read finds a write of the same batch.
- Mixed resolution with switch step L = round(s * N): steps < L run at low resolution; after step L - 1 the
  transition (x0 prediction, upsample, re-noise) replaces the scheduler step, at no extra denoiser call.
  A low-resolution deep feature cannot feed a full-resolution step, so step L is full and the uniform
  schedule restarts there. The cross-attention cache crosses the switch: the runtime resizes it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from .config import PostDiffConfig
from .errors import PostDiffError
from .resolution import switch_step
from .variants import VariantSpec


@dataclass(frozen=True)
class Step:
    index: int
    variant: str                # VariantSpec name, e.g. "shallow+read_ca"
    cfg: bool                   # classifier-free guidance: the batch holds the negative and positive halves
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    low_res: bool = False       # runs on the low-resolution latent

    def to_json(self) -> dict:
        return {"index": self.index, "variant": self.variant, "cfg": self.cfg, "reads": list(self.reads),
                "writes": list(self.writes), "resolution": "low" if self.low_res else "full"}

    @classmethod
    def from_json(cls, data: dict) -> "Step":
        """The inverse of to_json (extra keys, such as a manifest's variant_id, are ignored)."""
        return cls(data["index"], data["variant"], data["cfg"], tuple(data["reads"]), tuple(data["writes"]),
                   data["resolution"] == "low")


def build_plan(config: PostDiffConfig, num_steps: int, cfg: bool = True) -> list[Step]:
    """The plan for `num_steps` steps; `cfg` says whether the pipeline uses classifier-free guidance."""
    if num_steps < 1:
        raise PostDiffError(f"the number of steps must be at least 1, got {num_steps}")
    switch = switch_step(config.low_res_scale, config.low_res_fraction, num_steps)
    gate = config.cross_attn_cache_step if config.cross_attn_cache != "off" else None
    if gate is not None and gate >= num_steps:
        warnings.warn(f"cross_attn_cache_step {gate} >= {num_steps} steps: the cross-attention cache would never "
                      "be read, so it is off for this call", stacklevel=2)
        gate = None
    full = full_steps(config, num_steps, gate, switch, cfg)

    specs = []
    for i in range(num_steps):
        ca = "compute" if gate is None else "write" if i == gate - 1 else "read" if i >= gate else "compute"
        deep = "full" if i in full else "shallow"
        write_dc = deep == "full" and i + 1 < num_steps and (i + 1) not in full
        specs.append(VariantSpec(deep, write_dc, ca))
    plan = [Step(i, s.name, cfg and (gate is None or i < gate), s.reads, s.writes, i < switch)
            for i, s in enumerate(specs)]
    check_plan(plan)
    return plan


def switch_of(plan: list[Step]) -> int:
    """The first full-resolution step, 0 when the plan has no low-resolution steps."""
    return sum(step.low_res for step in plan)


def full_steps(config: PostDiffConfig, num_steps: int, gate: int | None = None, switch: int = 0,
               cfg: bool = True) -> set[int]:
    """The steps that run the whole denoiser (all of them when DeepCache is off)."""
    k = config.cache_interval
    if k <= 1:
        return set(range(num_steps))
    # Step m - 1 computes every attn2 for the cache. With CFG, step m also starts afresh: the batch halves
    # there, so no deep feature from before can feed it. Without CFG (LCM) the batch never changes.
    gated = (({gate - 1, gate} if cfg else {gate - 1}) if gate is not None else set())
    forced = gated | ({switch} if switch else set())
    if config.cache_schedule == "quad_center":
        steps = set(quad_center_steps(num_steps, math.ceil(num_steps / k), config.cache_center, config.cache_pow))
        return steps | forced
    restarts = [0, *sorted(forced)]
    return {i for i in range(num_steps) if (i - max(r for r in restarts if r <= i)) % k == 0}


def quad_center_steps(num_steps: int, count: int, center: int, power: float) -> list[int]:
    """DeepCache's `sample_from_quad_center`: `count` full steps, dense around `center`.

    Reproduces the original's arithmetic, including that (-center) ** (1 / power) is a complex number
    of which the int32 cast keeps the real part (peers.md 1.5); the power is lowered by 0.02 until the
    count comes out right.
    """
    import numpy as np

    if count >= num_steps:
        return list(range(num_steps))
    while power > 1:
        start = complex(-center) ** (1 / power)
        stop = complex(num_steps - center) ** (1 / power)
        values = np.linspace(start, stop, count + 1) ** power
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # numpy's ComplexWarning about dropping the imaginary part
            ints = np.unique(values.real.astype(np.int32))
        steps = [0] + [int(x) + center for x in ints[1:-1]]
        if len(steps) == count:
            return steps
        power -= 0.02
    raise PostDiffError(f"the quad_center schedule finds no {count} full steps out of {num_steps} around step "
                        f"{center}; lower cache_center or change cache_interval")


def check_plan(plan: list[Step]) -> None:
    """Every cache a step reads was written earlier by a step of the same batch (CFG on or off) and the
    same resolution; low-resolution steps come first.

    The cross-attention cache is the exception by design: it is written from a CFG batch and reduced to
    one half by the write mode (cond, ave, cfg), so it is read by steps without CFG; and the runtime
    resizes it at the switch, so it may be read at full resolution.
    """
    from .passes.cross_attn import CACHE as CROSS_ATTN

    if any(step.low_res and not before.low_res for before, step in zip(plan, plan[1:])):
        raise PostDiffError("plan has a low-resolution step after a full-resolution one")
    written: dict[str, tuple[bool, bool]] = {}
    for step in plan:
        for name in step.reads:
            if name not in written:
                raise PostDiffError(f"plan step {step.index} reads cache {name!r} before any step writes it")
            cfg, low_res = written[name]
            if cfg != step.cfg:
                raise PostDiffError(f"plan step {step.index} reads cache {name!r} written at a different batch")
            if low_res != step.low_res and name != CROSS_ATTN:
                raise PostDiffError(f"plan step {step.index} reads cache {name!r} written at another resolution")
        for name in step.writes:
            written[name] = (False if name == CROSS_ATTN else step.cfg, step.low_res)
