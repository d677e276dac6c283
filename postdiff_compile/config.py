"""PostDiffConfig and the named presets.

Field names follow ../shared/DESIGN.md. A config serialises to JSON with a version so that an artifact
records exactly what was applied and `--config FILE.json` can give a whole config back.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import PostDiffError

CONFIG_VERSION = 1
CROSS_ATTN_CACHE_MODES = ("off", "cond", "ave", "cfg")


@dataclass(frozen=True)
class PostDiffConfig:
    """What PostDiff does to each denoising step. The defaults are the identity (preset `none`)."""

    # Mixed resolution: the first `low_res_fraction` of the steps run on a latent scaled by `low_res_scale`.
    low_res_scale: float = 1.0
    low_res_fraction: float = 0.0
    # DeepCache: full step every `cache_interval` steps (1 = off); branch as DeepCacheSDHelper's cache_branch_id.
    cache_interval: int = 1
    cache_branch: int = 0
    # Cross-attention cache: after step `cross_attn_cache_step`, CFG off and attn2 outputs read from a cache.
    cross_attn_cache: str = "off"
    cross_attn_cache_step: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.low_res_scale <= 1.0:
            raise PostDiffError(f"low_res_scale must be in (0, 1], got {self.low_res_scale}")
        if not 0.0 <= self.low_res_fraction < 1.0:
            raise PostDiffError(f"low_res_fraction must be in [0, 1), got {self.low_res_fraction}")
        if self.cache_interval < 1:
            raise PostDiffError(f"cache_interval must be >= 1 (1 = off), got {self.cache_interval}")
        if self.cache_branch < 0:
            raise PostDiffError(f"cache_branch must be >= 0, got {self.cache_branch}")
        if self.cross_attn_cache not in CROSS_ATTN_CACHE_MODES:
            raise PostDiffError(
                f"cross_attn_cache must be one of {', '.join(CROSS_ATTN_CACHE_MODES)}, got {self.cross_attn_cache!r}"
            )
        if self.cross_attn_cache_step < 0:
            raise PostDiffError(f"cross_attn_cache_step must be >= 0, got {self.cross_attn_cache_step}")

    @property
    def is_identity(self) -> bool:
        return self == PostDiffConfig()

    def unsupported_features(self) -> list[str]:
        """Features this build of the runtime cannot execute yet (each lands with its own pass)."""
        missing = []
        if self.low_res_fraction > 0 and self.low_res_scale < 1:
            missing.append("mixed resolution (low_res_scale/low_res_fraction)")
        if self.cache_interval > 1:
            missing.append("DeepCache (cache_interval > 1)")
        if self.cross_attn_cache != "off":
            missing.append("the cross-attention cache (cross_attn_cache != 'off')")
        return missing

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
        if version != CONFIG_VERSION:
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
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PostDiffError(f"config file is not valid JSON ({err})", path) from None
        return cls.from_dict(data, str(path))


def _coerce(name: str, value: Any) -> Any:
    field_type = {f.name: f.type for f in fields(PostDiffConfig)}[name]
    try:
        if field_type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if field_type == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise PostDiffError(f"{name} must be of type {field_type}, got {value!r}") from None


# Presets are filled in by the issues that build their passes; `none` is the identity.
PRESETS: dict[str, PostDiffConfig] = {
    "none": PostDiffConfig(),
}


def resolve_config(preset: str = "none", base: PostDiffConfig | None = None, **overrides: Any) -> PostDiffConfig:
    """A preset (or a whole `base` config) with field overrides applied; unknown names are an error."""
    if base is None:
        if preset not in PRESETS:
            raise PostDiffError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}")
        base = PRESETS[preset]
    return base.replace(**overrides)
