"""`postdiff-compile explain`: the per-step plan of a config and its FLOPs, counted from the variant graphs.

The real full-size architecture is built on the meta device (no weights, nothing downloaded) and
captured like a real model, so the FLOPs are read off exactly the graphs a compiled artifact would run.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .capture import Bucket
from .config import PostDiffConfig
from .costs import CostTable
from .errors import PostDiffError
from .metrics.flops import FlopCount, count_flops
from .metrics.roofline import Traffic, traffic
from .models.families import FamilySpec, get_family
from .plan import Step, make_plan, switch_step_of
from .predict import Latency, Predictor

if TYPE_CHECKING:   # variants imports torch.export machinery; explain's callers may only want the dataclasses
    from .variants import VariantStore


@dataclass
class StepCost:
    step: Step
    flops: FlopCount


@dataclass
class Explanation:
    family: str
    resolution: tuple[int, int]
    latent: tuple[int, int]
    low_res_latent: tuple[int, int] | None   # None without mixed resolution
    config: PostDiffConfig
    steps: list[StepCost]
    baseline: FlopCount          # every step the plain denoiser with the same CFG use
    variants: dict[str, FlopCount]
    latency: Latency | None = None            # with a cost table: the plan's predicted time on its device
    baseline_latency: Latency | None = None   # the same for the baseline

    @property
    def variant_ids(self) -> list[str]:
        return [step_variant_id(s.step, self.latent, self.low_res_latent) for s in self.steps]

    @property
    def total(self) -> FlopCount:
        return sum((s.flops for s in self.steps), FlopCount(0, 0))

    def to_json(self) -> dict:
        total = self.total
        return {
            "family": self.family, "resolution": list(self.resolution), "latent_size": list(self.latent),
            "low_res_latent_size": list(self.low_res_latent) if self.low_res_latent else None,
            "switch_step": switch_step_of([s.step for s in self.steps]),
            "steps": len(self.steps), "config": self.config.to_dict(),
            "flops_units": "FLOPs; paper = conv+linear MACs x batch, attention excluded; true = 2 x MACs, "
                           "attention included",
            "plan": [{**s.step.to_json(), "flops_paper": s.flops.paper, "flops_true": s.flops.true}
                     for s in self.steps],
            "variants": {name: {"flops_paper": f.paper, "flops_true": f.true} for name, f in self.variants.items()},
            "total_flops_paper": total.paper, "total_flops_true": total.true,
            "baseline_flops_paper": self.baseline.paper, "baseline_flops_true": self.baseline.true,
            "fraction_paper": total.paper / self.baseline.paper, "fraction_true": total.true / self.baseline.true,
            **({"latency": self.latency.to_json(), "baseline_latency": self.baseline_latency.to_json(),
                "predicted_speedup": round(self.baseline_latency.total_ms / self.latency.total_ms, 4)}
               if self.latency is not None else {}),
        }


def step_variant_id(step: Step, latent: tuple[int, int], low: tuple[int, int] | None) -> str:
    """The id a manifest and a cost table give the variant a step runs ("shallow@b2_16x16")."""
    return f"{step.variant}@{Bucket(2 if step.cfg else 1, *(low if step.low_res else latent), 0, None).tag}"


def parse_variant_id(variant_id: str) -> tuple[str, int, tuple[int, int]]:
    """The inverse of step_variant_id: (variant name, batch, latent size)."""
    name, _, tag = variant_id.partition("@")
    batch, _, size = tag.partition("_")
    height, _, width = size.partition("x")
    return name, int(batch.removeprefix("b")), (int(height), int(width))


def architecture_of(source: str) -> tuple[FamilySpec, dict]:
    """Family and denoiser config of a .safetensors checkpoint, from its header alone."""
    from .models.detect import detect
    from .models.safetensors_header import read_header

    path = Path(source)
    if not path.is_file():
        raise PostDiffError("explain takes a .safetensors file (or use --family)", path)
    header = read_header(path)
    detection = detect(header.shapes, str(path), header.metadata)
    return get_family(detection.family), detection.config


_VARIANT_FLOPS: dict[tuple[str, str, int], FlopCount] = {}
_VARIANT_TRAFFIC: dict[tuple[str, str, int], Traffic] = {}
_META_STORES: dict[str, VariantStore] = {}


def _architecture(family: FamilySpec, denoiser_config: dict | None) -> str:
    """The memo key of a denoiser architecture: a checkpoint whose config is its family's shares the family's."""
    custom = denoiser_config and dict(denoiser_config) != dict(family.config())
    return f"{family.name}:{json.dumps(denoiser_config, sort_keys=True) if custom else 'default'}"


def _memo(architecture: str, variant_id: str, cache_branch: int) -> tuple[str, str, int]:
    """A variant's count depends only on the architecture, the bucket and, for DeepCache variants, the branch:
    sweeps that explain many configs (tune, study) capture each variant once per process."""
    name = variant_id.partition("@")[0]
    return architecture, variant_id, cache_branch if "shallow" in name or "write_dc" in name else 0


def _meta_store(family: FamilySpec, denoiser_config: dict | None, architecture: str) -> VariantStore:
    """One meta-device denoiser and its captures per architecture and process: explaining several presets
    (--all-presets, tune, study) captures each bucket once, not once per preset."""
    from .models.build import build_denoiser
    from .variants import VariantStore

    if architecture not in _META_STORES:
        denoiser = build_denoiser(family.denoiser_class, denoiser_config or family.config(), "meta").eval()
        _META_STORES[architecture] = VariantStore(denoiser, family)
    return _META_STORES[architecture]


def explain(family: FamilySpec, config: PostDiffConfig, *, steps: int | None = None,
            resolution: tuple[int, int] | None = None, denoiser_config: dict | None = None, cfg: bool = True,
            costs: CostTable | None = None, on_stage: Callable[[str], None] | None = None) -> Explanation:
    """The plan of `config` and its FLOPs; with `costs` (a profile's table), also its predicted latency."""
    from .variants import check_cache_branch

    height, width = resolution or family.default_resolution
    latent = family.check_resolution(height, width)
    steps = family.check_steps(steps or family.default_steps)
    cfg = cfg and family.classifier_free_guidance   # an LCM pipeline never batches CFG
    plan = make_plan(config, steps, family=family, full_latent=latent, prediction_type=family.prediction_type,
                     cfg=cfg, timesteps=family_timesteps(family, steps, latent) if config.attn_broadcast_interval > 1
                     else None)
    low = plan.transition.low_latent if plan.transition else None
    architecture = _architecture(family, denoiser_config)
    store = _meta_store(family, denoiser_config, architecture)
    check_cache_branch(store.denoiser, config)   # before any capture
    dtype = next(store.denoiser.parameters()).dtype
    flops_of: dict[str, FlopCount] = {}

    def cost(name: str, batch: int, size: tuple[int, int]) -> FlopCount:
        bucket = Bucket(batch, *size, family.text_length, dtype)
        key = f"{name}@{bucket.tag}"
        if key not in flops_of:
            memo = _memo(architecture, key, config.cache_branch)
            if memo not in _VARIANT_FLOPS:
                if on_stage:
                    on_stage(f"capturing {key}")
                _VARIANT_FLOPS[memo] = count_flops(store.get(name, bucket, config.cache_branch).module.graph)
            flops_of[key] = _VARIANT_FLOPS[memo]
        return flops_of[key]

    per_step = [StepCost(step, cost(step.variant, 2 if step.cfg else 1, low if step.low_res else latent))
                for step in plan]
    baseline = sum((cost("full", 2 if cfg else 1, latent) for _ in plan), FlopCount(0, 0))
    result = Explanation(family.name, (height, width), latent, low, config, per_step, baseline, flops_of)
    if costs is not None:
        _predict(result, costs, family, denoiser_config, cfg, on_stage)
    return result


def family_timesteps(family: FamilySpec, steps: int, latent: tuple[int, int]) -> list[float]:
    """The timesteps of the family's bundled scheduler as its pipeline sets them for this latent (FLUX's sigmas and
    shift mu): what the attention broadcast's timestep window is planned on."""
    from .schedulers import scheduler_timesteps, timestep_kwargs

    config = family.scheduler()
    tokens = latent[0] * latent[1] // family.latent_multiple ** 2
    return scheduler_timesteps(config, steps, timestep_kwargs(config, steps, tokens, family.kind.linspace_sigmas))


def variant_traffic(family: FamilySpec, variant_id: str, cache_branch: int = 0, denoiser_config: dict | None = None,
                    on_stage: Callable[[str], None] | None = None) -> Traffic:
    """What one variant of the real architecture moves and computes, op by op (the roofline's input)."""
    architecture = _architecture(family, denoiser_config)
    store = _meta_store(family, denoiser_config, architecture)
    name, batch, size = parse_variant_id(variant_id)
    memo = _memo(architecture, variant_id, cache_branch)
    if memo not in _VARIANT_TRAFFIC:
        if on_stage:
            on_stage(f"capturing {variant_id}")
        bucket = Bucket(batch, *size, family.text_length, next(store.denoiser.parameters()).dtype)
        _VARIANT_TRAFFIC[memo] = traffic(store.get(name, bucket, cache_branch).module)
    return _VARIANT_TRAFFIC[memo]


def _predict(result: Explanation, costs: CostTable, family: FamilySpec, denoiser_config: dict | None, cfg: bool,
             on_stage: Callable[[str], None] | None) -> None:
    import torch

    predictor = Predictor(costs, family.name, result.config.cache_branch, getattr(torch, costs.dtype).itemsize,
                          lambda v, branch: variant_traffic(family, v, branch, denoiser_config, on_stage))
    result.latency = predictor.latency(result.variant_ids)
    full = step_variant_id(Step(0, "full", cfg), result.latent, None)
    result.baseline_latency = predictor.latency([full] * len(result.steps))
