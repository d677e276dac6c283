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
- Attention broadcast with interval N (Pyramid Attention Broadcast, `broadcast_roles`): a counter of steps that
  restarts at 0 at step 0, at the switch and (with the cross-attention cache) at steps m - 1 and m, where the
  attentions' shape or batch changes or step m - 1 must compute them for the cross-attention cache. A step reads
  every self-attention output from the cache when its count is not a multiple of N and its timestep t lies
  strictly inside (attn_broadcast_t_low, attn_broadcast_t_high); the others compute them, and write them when a
  later step reads them before they are computed again. Without restarts this is diffusers' PAB hook, whose
  counter counts the attention's calls, one per step. A DeepCache shallow step takes part with the attentions it
  runs (the blocks it recomputes); the middle blocks' entries are those of the last full step that wrote them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .caches import CROSS_ATTN
from .config import PostDiffConfig
from .errors import PostDiffError
from .models.families import FamilySpec
from .resolution import low_res_latent, switch_step
from .variant_spec import VariantSpec


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


@dataclass(frozen=True, kw_only=True)
class Transition:
    """The switch from low to full resolution as a runtime needs it; the manifest's `transition` entry holds
    these and the numbers behind them (transition_spec.py; the rules in docs/manifest.md)."""
    switch_step: int                        # L: the first full-resolution step; step L - 1 ends with the transition
    full_latent: tuple[int, int]
    low_latent: tuple[int, int]
    prediction_type: str
    renoise: str = "fresh"
    clamp_x0: float = 0.0

    @classmethod
    def from_manifest(cls, entry: dict) -> Transition:
        return cls(switch_step=entry["switch_step"], full_latent=tuple(entry["full_latent_size"]),
                   low_latent=tuple(entry["low_latent_size"]), prediction_type=entry["prediction_type"],
                   renoise=entry["renoise"], clamp_x0=entry["clamp_x0"])


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything a runtime needs to execute a compiled denoiser: the steps, the DeepCache branch of the shallow
    variants, how a CFG step's cross-attention outputs become the cache, and the transition. Iterating it
    walks the steps."""
    steps: tuple[Step, ...]
    cache_branch: int = 0
    cross_attn_reduce: str = "off"          # cond | ave | cfg; "off" when no step writes the cache
    transition: Transition | None = None

    def __post_init__(self):
        if (self.transition.switch_step if self.transition else 0) != self.switch_step:
            raise PostDiffError(f"the plan switches resolution at step {self.switch_step}, its transition at "
                                f"{self.transition.switch_step if self.transition else 'none'}")

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def switch_step(self) -> int:
        """The first full-resolution step, 0 when the plan has no low-resolution steps."""
        return switch_step_of(self.steps)

    @property
    def cfg(self) -> bool:
        return any(step.cfg for step in self.steps)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Plan:
        """The plan of an artifact: its `plan` and `transition` entries and the two settings of its `config`
        that say how to run them. The one place a runtime reads them."""
        config = manifest["config"]
        transition = manifest["transition"]
        return cls(steps=tuple(Step.from_json(s) for s in manifest["plan"]),
                   cache_branch=config.get("cache_branch", 0), cross_attn_reduce=config.get("cross_attn_cache", "off"),
                   transition=Transition.from_manifest(transition) if transition is not None else None)


def make_plan(config: PostDiffConfig, num_steps: int, *, family: FamilySpec, full_latent: tuple[int, int],
              prediction_type: str, cfg: bool = True, timesteps: Sequence[float] | None = None,
              window: tuple[int, int] | None = None) -> Plan:
    """`build_plan` with the settings that run it and, with mixed resolution, the transition. `timesteps`, the
    scheduler's, are needed only by an attention broadcast that reads at some step; `window` as in build_plan."""
    steps = tuple(build_plan(config, num_steps, cfg=cfg, timesteps=timesteps, window=window))
    switch = switch_step_of(steps)
    transition = Transition(switch_step=switch, full_latent=tuple(full_latent),
                            low_latent=low_res_latent(family, full_latent, config.low_res_scale),
                            prediction_type=prediction_type, renoise=config.renoise,
                            clamp_x0=config.clamp_x0) if switch else None
    return Plan(steps=steps, cache_branch=config.cache_branch, cross_attn_reduce=config.cross_attn_cache,
                transition=transition)


def build_plan(config: PostDiffConfig, num_steps: int, cfg: bool = True,
               timesteps: Sequence[float] | None = None, window: tuple[int, int] | None = None) -> list[Step]:
    """The plan for `num_steps` steps; `cfg` says whether the pipeline uses classifier-free guidance; `timesteps`
    are the scheduler's (the attention broadcast's window is in timesteps).

    `window` = (start, stop): only steps start..stop-1 of the `num_steps`-step schedule run, numbered from 0 (an
    image-to-image strength, an SDXL base that stops at denoising_end or a refiner that starts at denoising_start).
    They are the steps the whole schedule's plan has there, with step `start` a restart: nothing before it ran, so
    it is full and computes every attention, and a cross-attention cache gate at or before it moves to start + 1 (step
    `start` writes the cache). The resolution switch stays where the whole schedule has it: a window that starts
    after it has no low-resolution steps."""
    if num_steps < 1:
        raise PostDiffError(f"the number of steps must be at least 1, got {num_steps}")
    start, stop = window or (0, num_steps)
    if not 0 <= start < stop <= num_steps:
        raise PostDiffError(f"the steps to run, {start} to {stop - 1}, must lie within the {num_steps}-step schedule")
    switch = switch_step(config.low_res_scale, config.low_res_fraction, num_steps)
    if start < switch and stop <= switch:
        raise PostDiffError(f"these steps ({start} to {stop - 1} of {num_steps}) all run at low resolution: the switch "
                            f"to full resolution is at step {switch}; stop later or lower low_res_fraction")
    gate = config.cross_attn_cache_step if config.cross_attn_cache != "off" else None
    if gate is not None and gate <= start:
        gate = start + 1
    if gate is not None and gate >= stop:
        if window is None:
            warnings.warn(f"cross_attn_cache_step {gate} >= {num_steps} steps: the cross-attention cache would "
                          "never be read, so it is off for this call", stacklevel=2)
        gate = None
    full = full_steps(config, num_steps, gate, switch, cfg, start)
    restarts = {0, start, switch, *((gate - 1, gate) if gate is not None else ())}
    broadcast = broadcast_roles(config, num_steps, full, restarts, timesteps)

    specs = []
    for i in range(num_steps):
        ca = "compute" if gate is None else "write" if i == gate - 1 else "read" if i >= gate else "compute"
        deep = "full" if i in full else "shallow"
        write_dc = deep == "full" and i + 1 < stop and (i + 1) not in full
        specs.append(VariantSpec(deep, write_dc, ca, broadcast[i]))
    plan = [Step(i - start, s.name, cfg and (gate is None or i < gate), s.reads, s.writes, i < switch)
            for i, s in enumerate(specs) if start <= i < stop]
    check_plan(plan)
    return plan


def broadcast_roles(config: PostDiffConfig, num_steps: int, full: set[int], restarts: set[int],
                    timesteps: Sequence[float] | None) -> list[str]:
    """Per step, what the attention broadcast does: "compute", "write" or "read" (the rule in this module's
    docstring). Timesteps are read only for steps the counter would let read."""
    interval = config.attn_broadcast_interval
    roles = ["compute"] * num_steps
    if interval <= 1:
        return roles
    count = 0
    for i in range(num_steps):
        count = 0 if i in restarts else count
        if count % interval and _in_broadcast_window(config, timesteps, i):
            roles[i] = "read"
        count += 1
    for i, role in enumerate(roles):
        if role == "compute" and _read_before_overwritten(roles, i, full, restarts):
            roles[i] = "write"
    return roles


def _read_before_overwritten(roles: list[str], index: int, full: set[int], restarts: set[int]) -> bool:
    """Whether a later step reads what step `index` computed before a restart or a computing step that holds all
    of it again: a full step runs every attention, so only the next full computing step does; a shallow step's
    (the blocks it recomputes) any computing step."""
    for j in range(index + 1, len(roles)):
        if j in restarts:
            return False
        if roles[j] == "read":
            return True
        if j in full or index not in full:
            return False
    return False


def _in_broadcast_window(config: PostDiffConfig, timesteps: Sequence[float] | None, index: int) -> bool:
    if timesteps is None:
        raise PostDiffError("the attention broadcast reuses attention only inside its timestep window "
                            "(attn_broadcast_t_low, attn_broadcast_t_high): planning it needs the scheduler's timesteps")
    return config.attn_broadcast_t_low < float(timesteps[index]) < config.attn_broadcast_t_high


def switch_step_of(plan: list[Step] | tuple[Step, ...]) -> int:
    """The first full-resolution step, 0 when the plan has no low-resolution steps."""
    return sum(step.low_res for step in plan)


def full_steps(config: PostDiffConfig, num_steps: int, gate: int | None = None, switch: int = 0,
               cfg: bool = True, start: int = 0) -> set[int]:
    """The steps that run the whole denoiser (all of them when DeepCache is off); `start`, the first step run,
    restarts the schedule."""
    k = config.cache_interval
    if k <= 1:
        return set(range(num_steps))
    # Step m - 1 computes every attn2 for the cache. With CFG, step m also starts afresh: the batch halves
    # there, so no deep feature from before can feed it. Without CFG (LCM) the batch never changes.
    gated = (({gate - 1, gate} if cfg else {gate - 1}) if gate is not None else set())
    forced = gated | ({switch} if switch else set()) | ({start} if start else set())
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
