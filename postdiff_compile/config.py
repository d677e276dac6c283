"""PostDiffConfig and the named presets.

The fields are listed in docs/design.md (Vocabulary). A config serialises to JSON with a version so that an artifact
records exactly what was applied and `--config FILE.json` can give a whole config back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import safe_json
from .errors import PostDiffError

CONFIG_VERSION = 1
CROSS_ATTN_CACHE_MODES = ("off", "cond", "ave", "cfg")
CACHE_SCHEDULES = ("uniform", "quad_center")
RENOISE_MODES = ("fresh", "predicted")
# quad_center_steps searches the power down from cache_pow in steps of 0.02: 10 bounds it to 450 tries (DeepCache
# uses 1.4). Step counts, intervals and step indices above 10,000 mean nothing for a 1,000-step scheduler.
MAX_CACHE_POW = 10.0
MAX_COUNT = 10_000


@dataclass(frozen=True)
class PostDiffConfig:
    """What PostDiff does to each denoising step. The defaults are the identity (preset `none`)."""

    # Mixed resolution: the first `low_res_fraction` of the steps run on a latent scaled by `low_res_scale`.
    # The latent is scaled per side and rounded as `resolution.low_res_latent` says; at the switch x0 is
    # predicted, upsampled and re-noised with fresh noise ("fresh") or with the upsampled predicted noise
    # ("predicted"); `clamp_x0` > 0 clamps the predicted x0 to [-clamp_x0, clamp_x0] first (0 = off).
    low_res_scale: float = 1.0
    low_res_fraction: float = 0.0
    renoise: str = "fresh"
    clamp_x0: float = 0.0
    # DeepCache: full step every `cache_interval` steps (1 = off); branch as DeepCacheSDHelper's cache_branch_id.
    # Transformers (PixArt-alpha) have no U-Net skips: there the cached part is the middle blocks, and
    # `cache_branch` counts the blocks recomputed at each end (passes/block_cache.py).
    cache_interval: int = 1
    cache_branch: int = 0
    # Which steps are full: "uniform" (every k-th, as DeepCacheSDHelper) or "quad_center" (the DeepCache
    # paper code's non-uniform schedule: ceil(N / k) full steps, dense around step `cache_center`).
    cache_schedule: str = "uniform"
    cache_center: int = 15
    cache_pow: float = 1.4
    # Cross-attention cache: step m - 1 (0-based, m = `cross_attn_cache_step`) writes every attn2 output; from
    # step m on, CFG is off and they are read from the cache. Mode: cond, ave (T-GATE) or cfg.
    cross_attn_cache: str = "off"
    cross_attn_cache_step: int = 0
    # Attention broadcast (Pyramid Attention Broadcast's spatial part): every self-attention output is computed at
    # one step in `attn_broadcast_interval` (1 = off) and reused by the steps between, only while the step's
    # timestep t is strictly inside (attn_broadcast_t_low, attn_broadcast_t_high), in the scheduler's timestep
    # units; outside it every step computes. The defaults are PAB's timestep_skip_range. Rules: plan.py.
    attn_broadcast_interval: int = 1
    attn_broadcast_t_low: float = 100.0
    attn_broadcast_t_high: float = 800.0

    def __post_init__(self) -> None:
        if not 0.0 < self.low_res_scale <= 1.0:
            raise PostDiffError(f"low_res_scale must be in (0, 1], got {self.low_res_scale}")
        if not 0.0 <= self.low_res_fraction < 1.0:
            raise PostDiffError(f"low_res_fraction must be in [0, 1), got {self.low_res_fraction}")
        if self.renoise not in RENOISE_MODES:
            raise PostDiffError(f"renoise must be one of {', '.join(RENOISE_MODES)}, got {self.renoise!r}")
        if not 0 <= self.clamp_x0 < float("inf"):   # also refuses NaN
            raise PostDiffError(f"clamp_x0 must be a finite number >= 0 (0 = off), got {self.clamp_x0}")
        if self.cache_interval < 1:
            raise PostDiffError(f"cache_interval must be >= 1 (1 = off), got {self.cache_interval}")
        if self.cache_branch < 0:
            raise PostDiffError(f"cache_branch must be >= 0, got {self.cache_branch}")
        if self.cache_schedule not in CACHE_SCHEDULES:
            raise PostDiffError(f"cache_schedule must be one of {', '.join(CACHE_SCHEDULES)}, got {self.cache_schedule!r}")
        if not 1.0 < self.cache_pow <= MAX_CACHE_POW:   # also refuses NaN; quad_center lowers it 0.02 at a time
            raise PostDiffError(f"cache_pow must be in (1, {MAX_CACHE_POW:g}], got {self.cache_pow}")
        if not 0 <= self.cache_center <= MAX_COUNT:
            raise PostDiffError(f"cache_center must be in [0, {MAX_COUNT}], got {self.cache_center}")
        if self.attn_broadcast_interval < 1:
            raise PostDiffError(f"attn_broadcast_interval must be >= 1 (1 = off), got {self.attn_broadcast_interval}")
        if not -MAX_COUNT <= self.attn_broadcast_t_low < self.attn_broadcast_t_high <= MAX_COUNT:  # refuses NaN
            raise PostDiffError(f"the attention broadcast's timestep window needs -{MAX_COUNT} <= attn_broadcast_t_low "
                                f"< attn_broadcast_t_high <= {MAX_COUNT}, got ({self.attn_broadcast_t_low}, "
                                f"{self.attn_broadcast_t_high})")
        for name in ("cache_interval", "cache_branch", "cross_attn_cache_step", "attn_broadcast_interval"):
            if getattr(self, name) > MAX_COUNT:
                raise PostDiffError(f"{name} must be at most {MAX_COUNT}, got {getattr(self, name)}")
        if self.cross_attn_cache not in CROSS_ATTN_CACHE_MODES:
            raise PostDiffError(
                f"cross_attn_cache must be one of {', '.join(CROSS_ATTN_CACHE_MODES)}, got {self.cross_attn_cache!r}"
            )
        if self.cross_attn_cache_step < 0:
            raise PostDiffError(f"cross_attn_cache_step must be >= 0, got {self.cross_attn_cache_step}")
        if self.cross_attn_cache != "off" and self.cross_attn_cache_step < 1:
            raise PostDiffError("the cross-attention cache is written at step cross_attn_cache_step - 1, so "
                                f"cross_attn_cache_step must be >= 1, got {self.cross_attn_cache_step}")

    @property
    def is_identity(self) -> bool:
        return self == PostDiffConfig()

    @property
    def mixed_resolution(self) -> bool:
        return self.low_res_scale < 1 and self.low_res_fraction > 0

    def replace(self, **overrides: Any) -> "PostDiffConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise PostDiffError(
                f"unknown PostDiffConfig field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        typed = {name: _coerce(name, value) for name, value in overrides.items()}
        return dataclasses.replace(self, **typed)

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "PostDiffConfig":
        if not isinstance(data, dict):
            raise PostDiffError("a config must be a JSON object", source)
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)
        if type(version) is not int or version != CONFIG_VERSION:
            raise PostDiffError(f"config_version {version} is not supported (this tool writes {CONFIG_VERSION})", source)
        try:
            return cls().replace(**data)
        except PostDiffError as err:
            raise PostDiffError(str(err), source) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PostDiffConfig":
        path = Path(path)
        if not path.is_file():
            raise PostDiffError("config file not found", path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise PostDiffError(f"cannot read the config file ({err.strerror})", path) from None
        return cls.from_dict(safe_json.loads(raw, path, message="config file is not valid JSON ({why})"), str(path))


def _coerce(name: str, value: Any) -> Any:
    """The value as the field's type. Numbers may come as numbers or as their text (flags, environment);
    JSON true is not the integer 1, a list is not a string, and NaN or infinity is no setting."""
    field_type = {f.name: f.type for f in fields(PostDiffConfig)}[name]
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if isinstance(value, str) and field_type in ("int", "float") and len(value) <= 40:
        try:
            value = int(value) if field_type == "int" and value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            pass
    if field_type == "int":
        if type(value) is float and value.is_integer():
            return int(value)
        if type(value) is int:
            return value
    elif field_type == "float":
        if type(value) in (int, float):   # NaN and infinity are refused by each field's range in __post_init__
            return float(value)
    elif isinstance(value, str):
        return value
    raise PostDiffError(f"{name} must be of type {field_type}, got {shown}")


@dataclass(frozen=True)
class Preset:
    """A named config, per family where the families need different settings.

    `alternatives` are overrides of the family's config that make configurations of the same quality class:
    with a device's cost table (`--preset P --costs FILE`), the fastest of the preset's config and these is run.
    """
    name: str
    description: str
    default: PostDiffConfig
    per_family: dict[str, PostDiffConfig | str] = dataclasses.field(default_factory=dict)  # str: why unavailable
    alternatives: tuple[dict[str, Any], ...] = ()

    def for_family(self, family: str | None) -> PostDiffConfig:
        config = self.per_family.get(family, self.default) if family else self.default
        if isinstance(config, str):
            raise PostDiffError(f"preset {self.name!r} is not available for {family}: {config}")
        return config

    def candidates(self, family: str | None) -> list[PostDiffConfig]:
        """The preset's config for `family`, then its alternatives."""
        config = self.for_family(family)
        return [config, *(config.replace(**alternative) for alternative in self.alternatives)]

    @property
    def is_identity(self) -> bool:
        return self.default.is_identity and not self.per_family


# Mixed resolution as the paper runs it: the first half of the steps on a latent scaled by beta = 1/2 for
# SD1.x/2.x and 3/4 for SDXL and PixArt-alpha (paper-numbers.md section 1; `explain` reproduces the SD1.5
# "Mix" row, 19.035 T, within 0.1%).
_MIX = PostDiffConfig(low_res_scale=0.5, low_res_fraction=0.5)
_MIX_3_4 = PostDiffConfig(low_res_scale=0.75, low_res_fraction=0.5)

# The paper's DeepCache ablation (17.787 T of 30.420 T for SD1.5, 20 steps) is interval 2 with the branch that
# recomputes down_blocks[0] layer 0 and the last two layers of the last up block: DeepCacheSDHelper's
# cache_branch_id 1 (paper-numbers.md section 3; `postdiff-compile explain` reproduces it within 0.1%).
_DEEPCACHE = dict(cache_interval=2, cache_branch=1)
# PixArt-alpha has no U-Net skips; its deep cache is the residual of the middle transformer blocks
# (passes/block_cache.py): branch 2 keeps 2 of its 28 blocks at each end and caches the other 24. Not in the
# paper; chosen as the analogue of DeepCache's interval 2 with a shallow branch, quality unmeasured here.
_BLOCK_CACHE = dict(cache_interval=2, cache_branch=2)
# LCM (4 steps by default, no CFG): the same features counted for 4 steps. The cross-attention cache is written
# at step 2 (a full step anyway: the first at full resolution) and read by step 3, a DeepCache shallow step; with
# m = 2 the write would force step 1 full and fast would cost more than balanced. There is no CFG batch to
# drop, so the cache saves only the attn2 work of the steps that read it.
_LCM_GATE = dict(cross_attn_cache="cond", cross_attn_cache_step=3)
# Flow-matching transformers (SD3, FLUX): beta 3/4 as for the other 1024 px transformer (PixArt-alpha); block
# cache branch 2 of SD3-medium's 24 blocks and 4 of FLUX's 57 (19 double + 38 single), about the same share
# recomputed at each end as PixArt's 2 of 28. Not in the paper; chosen by analogy, quality unmeasured here.
_FLOW_FAMILIES = ("sd3", "flux", "flux_schnell")
_FLOW_BLOCK_CACHE = {"sd3": dict(cache_interval=2, cache_branch=2), "flux": dict(cache_interval=2, cache_branch=4),
                     "flux_schnell": dict(cache_interval=2, cache_branch=4)}
# fast for the flow-matching transformers adds, to balanced, the cache each one has beyond the block cache:
# - SD3 (CFG as a batch): the cross-attention cache in Cond mode adapted to joint attention (passes/joint_text.py):
#   CFG off from step m and the text stream not run; m = 14 of 28 is the switch step, so the cache is written at the
#   last low-resolution step, as the U-Nets' fast writes it (m = N / 2, "precomputed during the low-resolution
#   phase"); the text keys and values have no image tokens and cross the switch unresized. 33.3% of the baseline
#   against balanced's 46.5% (paper convention, 1024 px, 28 steps).
# - FLUX (dev, schnell; no CFG batch to drop): the attention broadcast (PAB's spatial part) at PAB's documented
#   timestep window (100, 800). Interval 3, not PAB's example 2: with the block cache at interval 2 the full steps
#   fall on even counts, so interval 2 would let only the shallow steps' few outer attentions be reused (44.8%
#   against balanced's 45.9% for dev); interval 3 lets every other full step in the window reuse all of them
#   (41.2%; true FLOPs 37.4% against 44.6%). schnell's 4 steps leave steps 1 and 3 (shallow, in the window) to
#   read: 43.7% against 45.3%. Quality is unmeasured here for all three.
_FLOW_FAST = {"sd3": dict(cross_attn_cache="cond", cross_attn_cache_step=14),
              "flux": dict(attn_broadcast_interval=3), "flux_schnell": dict(attn_broadcast_interval=3)}
# The reference model is pixel space and its DDIM clips x0 to [-1, 1] (clip_sample), as pixel-space DDIM does:
# an epsilon model's x0 is 1 / sqrt(abar) times its error at high noise. The transition's x0 is clipped the same.
_PIXEL = dict(clamp_x0=1.0)
# Reference model 2 ("scenes64") denoises VAE latents, which are not bounded by [-1, 1] (its DDIM has no
# clip_sample either): clamping its x0 would clip the latent, so its presets are scenes32's without _PIXEL,
# spelled out beside them although they equal the defaults. Its 32x32 latent goes to 16x16 at beta 1/2, a
# multiple of its U-Net's 4.


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("none", "identity: the plain denoiser at every step", PostDiffConfig()),
    Preset("quality", "mixed resolution: the first half of the steps at low resolution (beta 1/2, or 3/4 for "
           "SDXL, PixArt-alpha, SD3 and FLUX)", _MIX,
           {"sdxl": _MIX_3_4, "pixart_alpha": _MIX_3_4, "lcm_sdxl": _MIX_3_4, "scenes32": _MIX.replace(**_PIXEL),
            "scenes64": _MIX, **dict.fromkeys(_FLOW_FAMILIES, _MIX_3_4)}),
    # balanced = quality + DeepCache: for SD1.5 the paper's "Mix + Cache" row reading (a), 11.128 T of 11.129 T.
    # At interval 2 and 10 low-res steps the switch step is a full step anyway.
    Preset("balanced", "mixed resolution (as quality) + DeepCache, full step every 2nd step, branch 1 (transformers: "
           "their middle blocks cached instead, 24 of 28 for PixArt-alpha)",
           _MIX.replace(**_DEEPCACHE), {"sdxl": _MIX_3_4.replace(**_DEEPCACHE),
                                        "pixart_alpha": _MIX_3_4.replace(**_BLOCK_CACHE),
                                        "lcm_sdxl": _MIX_3_4.replace(**_DEEPCACHE),
                                        "scenes32": _MIX.replace(**_DEEPCACHE, **_PIXEL),
                                        "scenes64": _MIX.replace(**_DEEPCACHE),
                                        **{f: _MIX_3_4.replace(**c) for f, c in _FLOW_BLOCK_CACHE.items()}}),
    # fast adds the cross-attention cache in the paper's adopted "Cond" mode. m counts steps, tuned for 20:
    # - SD1.x/2.x, m = 10: the paper's SD1.5 ablation (Table B) trades FID for text alignment as m grows;
    #   m = 5 loses 1.6 CLIP points against the baseline, m = 10 keeps CLIP within 0.7 of it, and the
    #   CFG-off half is where the FLOPs go. T-GATE's SD default gate step is also 10. With s = 1/2 the
    #   cache is written at the last low-resolution step and resized at the switch ("precomputed during
    #   the low-resolution phase", paper-numbers.md section 2).
    # - SDXL, m = 10: T-GATE's SDXL default; the paper does not identify its SDXL setting.
    # - PixArt-alpha, m = 15: the only schedule that reproduces the paper's PixArt Mix+Cache FLOPs (54.718 T) is
    #   beta 3/4 for 10 steps, cross-attention cached for the last 5 of 20 (that row is `quality` with
    #   cross_attn_cache=cond, cross_attn_cache_step=15); fast adds balanced's block cache on top, as for the
    #   U-Nets fast adds the cross-attention cache to balanced.
    # - LCM, m = 3 of 4 steps (see _LCM_GATE).
    # fast's alternatives, for devices where a CFG-off step (batch 1) costs about what a CFG step does (a GPU with
    # per-launch costs, a CPU reading every weight whatever the batch): the same mixed resolution with the
    # cross-attention cache off and more work cached instead, DeepCache interval 3; or interval 2 with 3/4 of the
    # steps at low resolution. On the one quality measurement here (benchmarks/results/tune_scenes32_0.4.md,
    # Frechet distance on its 96-prompt check set, lower is better) both score better than fast itself: 1661 and
    # 1769 against 2117. They cost more FLOPs (32.7% and 28.7% of the baseline against 23.0%), so only a cost
    # table that shows the batch-1 steps saving little picks them.
    Preset("fast", "balanced + cross-attention cache, Cond mode, CFG off from step m (SD3: the joint blocks' text "
           "stream cached; FLUX: attention broadcast instead)",
           _MIX.replace(**_DEEPCACHE, cross_attn_cache="cond", cross_attn_cache_step=10),
           {"sdxl": _MIX_3_4.replace(**_DEEPCACHE, cross_attn_cache="cond", cross_attn_cache_step=10),
            "pixart_alpha": _MIX_3_4.replace(**_BLOCK_CACHE, cross_attn_cache="cond", cross_attn_cache_step=15),
            "lcm_sd15": _MIX.replace(**_DEEPCACHE, **_LCM_GATE),
            "lcm_sdxl": _MIX_3_4.replace(**_DEEPCACHE, **_LCM_GATE),
            "scenes32": _MIX.replace(**_DEEPCACHE, **_PIXEL, cross_attn_cache="cond", cross_attn_cache_step=10),
            "scenes64": _MIX.replace(**_DEEPCACHE, cross_attn_cache="cond", cross_attn_cache_step=10),
            **{f: _MIX_3_4.replace(**_FLOW_BLOCK_CACHE[f], **_FLOW_FAST[f]) for f in _FLOW_FAMILIES}},
           alternatives=(dict(cross_attn_cache="off", cross_attn_cache_step=0, cache_interval=3),
                         dict(cross_attn_cache="off", cross_attn_cache_step=0, low_res_fraction=0.75))),
)}


def resolve_config(preset: str = "none", base: PostDiffConfig | None = None, family: str | None = None,
                   **overrides: Any) -> PostDiffConfig:
    """A preset for `family` (or a whole `base` config) with field overrides; unknown names are an error."""
    if base is None:
        if preset not in PRESETS:
            raise PostDiffError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}")
        base = PRESETS[preset].for_family(family)
    return base.replace(**overrides)


@dataclass(frozen=True)
class ConfigRequest:
    """A preset name or base config plus overrides, resolved once the model's family is known; with a cost table
    (`costs`, costs.CostTable), a preset resolves to the fastest of its candidates on that device (fastest.py)."""
    preset: str = "none"
    base: PostDiffConfig | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    costs: Any = None

    def resolve(self, family: str | None) -> PostDiffConfig:
        return resolve_config(self.preset, self.base, family, **self.overrides)
