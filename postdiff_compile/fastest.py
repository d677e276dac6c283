"""A preset resolved for a device: of the configurations in the preset's quality class (Preset.candidates), the one
a cost table predicts fastest. Without a table a preset is its FLOPs-chosen config, as always."""
from __future__ import annotations

from dataclasses import dataclass

from .config import PRESETS, ConfigRequest, PostDiffConfig
from .costs import CostTable
from .errors import PostDiffError
from .models.families import FamilySpec


@dataclass(frozen=True)
class Choice:
    config: PostDiffConfig
    ranking: tuple[tuple[PostDiffConfig, float], ...]   # every candidate and its predicted ms, fastest first


def fastest_in_class(preset: str, family: FamilySpec, costs: CostTable, *, steps: int | None = None,
                     resolution: tuple[int, int] | None = None, overrides: dict | None = None,
                     denoiser_config: dict | None = None, cfg: bool = True) -> Choice:
    from .explain import explain

    if preset not in PRESETS:
        raise PostDiffError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}")
    predicted = []
    for candidate in PRESETS[preset].candidates(family.name):
        config = candidate.replace(**(overrides or {}))
        result = explain(family, config, steps=steps, resolution=resolution, denoiser_config=denoiser_config, cfg=cfg,
                         costs=costs)
        predicted.append((config, result.latency.total_ms))
    ranking = tuple(sorted(predicted, key=lambda c: c[1]))   # stable: a tie keeps the preset's own config
    return Choice(ranking[0][0], ranking)


def resolve_request(request: PostDiffConfig | ConfigRequest, family: FamilySpec, *, steps: int,
                    resolution: tuple[int, int], denoiser_config: dict | None = None) -> PostDiffConfig:
    """A request as the family, step count and resolution resolve it; a preset with a cost table, for the device."""
    if not isinstance(request, ConfigRequest):
        return request
    if request.costs is None or request.base is not None:
        return request.resolve(family.name)
    return fastest_in_class(request.preset, family, request.costs, steps=steps, resolution=resolution,
                            overrides=request.overrides, denoiser_config=denoiser_config).config
