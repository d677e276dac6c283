"""`tune`: the best PostDiff configuration under a FLOPs budget, chosen on a small calibration set.

The paper picks its settings on a small calibration set. Here every configuration of a grid (beta, s,
DeepCache interval, cross-attention cache step) whose FLOPs fit the budget is scored on `calibration`
prompts; the best is the answer. To say how far that choice can be trusted, the same candidates are
scored on a larger, disjoint `full` prompt set, and the Spearman rank correlation of the two rankings is
reported (1 = the calibration set ranks the candidates exactly as the full set does).
"""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import PRESETS, PostDiffConfig
from ..errors import PostDiffError
from .evaluate import PromptSet, Sampler, evaluate, generate, real_features
from .study import finite, flops_fraction, write_text_atomic

LOWER_IS_BETTER = {"frechet": True, "caption_match": False, "attribute_accuracy": False, "psnr": False,
                   "ssim": False}


OBJECTIVES = ("flops", "latency")


@dataclass(frozen=True)
class TuneSettings:
    flops_budget: float | None = 0.4
    calibration: int = 48        # prompts in the calibration set
    full: int = 192              # prompts in the disjoint set the ranking is checked on (0: skip the check)
    metric: str = "frechet"
    guidance: float = 4.0
    steps: int = 20
    real: int = 2048
    # objective "latency": candidates fit by their latency predicted from a cost table (profile) instead of FLOPs,
    # under `latency_budget_ms` or at least `speedup` times faster than the baseline there
    objective: str = "flops"
    latency_budget_ms: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in LOWER_IS_BETTER:
            raise PostDiffError(f"--metric must be one of {', '.join(LOWER_IS_BETTER)}, got {self.metric!r}")
        if self.objective not in OBJECTIVES:
            raise PostDiffError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "latency":
            if (self.latency_budget_ms is None) == (self.speedup is None):
                raise PostDiffError("--objective latency needs one of --latency-budget MS or --speedup X")
            if not 0 < (self.latency_budget_ms or self.speedup) < float("inf"):
                raise PostDiffError("--latency-budget and --speedup must be positive numbers")
        elif self.flops_budget is None or not 0 < self.flops_budget <= 1:
            raise PostDiffError(f"--flops-budget is a fraction of the baseline's FLOPs in (0, 1], "
                                f"got {self.flops_budget}")
        if self.calibration < 2 or self.full < 0 or self.full == 1:
            raise PostDiffError("--calibration must be at least 2 prompts, --full 0 or at least 2 (a Frechet "
                                "distance needs two samples)")


def grid(steps: int, clamp_x0: float = 0.0) -> list[PostDiffConfig]:
    """Mixed resolution (beta, s) x DeepCache interval (branch 1) x cross-attention cache step (Cond mode)."""
    configs: list[PostDiffConfig] = []
    mixes = [(1.0, 0.0)] + [(b, s) for b in (0.75, 0.5) for s in (0.5, 0.75)]
    for (beta, s), k, m in itertools.product(mixes, (1, 2, 3), sorted({0, steps // 2, steps // 4})):
        configs.append(PostDiffConfig(low_res_scale=beta, low_res_fraction=s, clamp_x0=clamp_x0 if s else 0.0,
                                      cache_interval=k,
                                      cache_branch=1 if k > 1 else 0,
                                      cross_attn_cache="cond" if m else "off", cross_attn_cache_step=m))
    return configs


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties."""
    def ranks(values: list[float]) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for v in np.unique(values):
            r[values == v] = r[values == v].mean()
        return r

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two equally long lists of at least 2 values")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def name_of(config: PostDiffConfig) -> str:
    parts = []
    if config.mixed_resolution:
        parts.append(f"mix b{config.low_res_scale:g} s{config.low_res_fraction:g}")
    if config.cache_interval > 1:
        parts.append(f"deepcache k{config.cache_interval} b{config.cache_branch}")
    if config.cross_attn_cache != "off":
        parts.append(f"ca {config.cross_attn_cache} m{config.cross_attn_cache_step}")
    return ", ".join(parts) or "none"


@dataclass
class TuneResult:
    settings: TuneSettings
    candidates: list[dict]       # name, config, flops_fraction, calibration metrics, full metrics
    best: dict
    best_on_full: dict | None
    spearman: float | None
    seconds: float

    def to_json(self) -> dict:
        return {"settings": asdict(self.settings), "best": self.best, "best_on_full": self.best_on_full,
                "spearman": self.spearman, "candidates": self.candidates, "seconds": self.seconds}


def ranking(family, settings: TuneSettings, resolution: tuple[int, int], costs=None) -> list[dict]:
    """The grid's configurations that fit the budget: name, config, FLOPs fraction and, with a cost table, the
    predicted latency; by FLOPs, or with the latency objective by predicted latency, cheapest first."""
    from ..explain import explain

    base_total = flops_fraction(family, Sampler("base", steps=settings.steps), resolution, None)
    latency = settings.objective == "latency"
    if latency and costs is None:
        raise PostDiffError("--objective latency needs a cost table: --costs FILE (postdiff-compile profile)")
    rows = []
    for config in grid(settings.steps, PRESETS["quality"].for_family(family.name).clamp_x0):
        row = {"name": name_of(config), "config": config,
               "flops_fraction": flops_fraction(family, Sampler("c", steps=settings.steps, config=config), resolution,
                                                base_total)}
        if costs is not None:
            ex = explain(family, config, steps=settings.steps, resolution=resolution, costs=costs)
            row.update(predicted_ms=round(ex.latency.total_ms, 3),
                       predicted_speedup=round(ex.baseline_latency.total_ms / ex.latency.total_ms, 3))
        fits = (row["predicted_ms"] <= settings.latency_budget_ms if settings.latency_budget_ms is not None else
                row["predicted_speedup"] >= settings.speedup) if latency else row["flops_fraction"] <= settings.flops_budget
        if fits:
            rows.append(row)
    if not rows:
        budget = (f"a predicted latency of {settings.latency_budget_ms:g} ms" if settings.latency_budget_ms is not None
                  else f"a predicted speedup of {settings.speedup:g}x") if latency else \
            f"a FLOPs budget of {settings.flops_budget:.0%}"
        raise PostDiffError(f"no configuration of the grid fits {budget}; the cheapest is above it")
    return sorted(rows, key=lambda r: r["predicted_ms"] if latency else r["flops_fraction"])


def format_ranking(rows: list[dict]) -> str:
    timed = "predicted_ms" in rows[0]
    lines = ["| candidate | FLOPs |" + (" predicted ms | predicted speedup |" if timed else ""),
             "|---|---|" + ("---|---|" if timed else "")]
    for r in rows:
        lines.append(f"| {r['name']} | {r['flops_fraction']:.1%} |"
                     + (f" {r['predicted_ms']:.1f} | {r['predicted_speedup']:.2f}x |" if timed else ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class TuneJob:
    """One candidate of the grid, scored on the calibration set and, unless settings.full is 0, the full set."""
    model: str | None       # the reference-model folder (None: the shipped default, model 2)
    name: str
    config: PostDiffConfig
    settings: TuneSettings


def prompt_sets(settings: TuneSettings) -> list[tuple[str, PromptSet]]:
    # Disjoint from each other and from the study's (seeds 0..): calibration 100, full 200.
    sets = [("calibration", PromptSet.make(100, settings.calibration))]
    return sets + ([("full", PromptSet.make(200, settings.full))] if settings.full else [])


def score_candidate(job: TuneJob, pipe=None) -> dict[str, dict]:
    """The candidate's metrics by prompt set: a sweep's job (sweep.py), the same numbers in any process."""
    from .sweep import lab_state

    s = job.settings
    state = lab_state(job.model, pipe)
    real = state.once(("real", s.real), lambda: real_features(state.classifier, s.real))
    scores = {}
    for label, prompts in prompt_sets(s):
        reference = None
        if s.metric in ("psnr", "ssim"):
            reference = state.once(("baseline", label, len(prompts.captions), s.steps, s.guidance),
                                   lambda: generate(state.pipe, Sampler("base", steps=s.steps), prompts, s.guidance))
        images = generate(state.pipe, Sampler(job.name, steps=s.steps, config=job.config), prompts, s.guidance)
        scores[label] = evaluate(images, prompts, state.classifier, real, reference)
    return scores


def run_tune(pipe, family, settings: TuneSettings, stage: Callable[[str, int], Callable[[int], None]], costs=None,
             sweep=None, model: str | None = None) -> TuneResult:
    """Score every candidate that fits, on `sweep` (sweep.py; default: serially on `pipe`); `model` is the folder
    `pipe` was loaded from, for workers that load their own."""
    from .sweep import SerialSweep

    start = time.perf_counter()
    resolution = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    fits = ranking(family, settings, resolution, costs)
    jobs = [TuneJob(None if model is None else str(model), r["name"], r["config"], settings) for r in fits]
    sweep = sweep if sweep is not None else SerialSweep(pipe)
    scores = sweep.map(score_candidate, jobs, stage(f"{len(jobs)} candidates", len(jobs)))
    candidates = [{**ranked, "config": {k: v for k, v in ranked["config"].to_dict().items() if k != "config_version"},
                   **score} for ranked, score in zip(fits, scores)]
    sign = 1 if LOWER_IS_BETTER[settings.metric] else -1
    best = min(candidates, key=lambda r: sign * r["calibration"][settings.metric])
    rho = best_full = None
    if settings.full:
        best_full = min(candidates, key=lambda r: sign * r["full"][settings.metric])
        if len(candidates) > 1:
            rho = spearman([r["calibration"][settings.metric] for r in candidates],
                           [r["full"][settings.metric] for r in candidates])
    return TuneResult(settings, candidates, best, best_full, rho, time.perf_counter() - start)


def format_tune(result: TuneResult) -> str:
    s = result.settings
    m = s.metric
    budget = (f"{s.flops_budget:.0%} of the baseline FLOPs" if s.objective == "flops" else
              f"a predicted {s.latency_budget_ms:g} ms" if s.latency_budget_ms is not None else
              f"a predicted {s.speedup:g}x speedup")
    timed = "predicted_ms" in result.candidates[0]
    lines = [f"Tuning under {budget} ({s.steps} DDIM steps, CFG {s.guidance}); "
             f"metric {m}; {len(result.candidates)} candidates fit; {result.seconds / 60:.1f} min.", "",
             f"| candidate | FLOPs |{' predicted ms |' if timed else ''} {m}, calibration ({s.calibration}) | "
             f"{m}, full ({s.full}) |", "|---|---|---|---|" + ("---|" if timed else "")]
    sign = 1 if LOWER_IS_BETTER[m] else -1
    for r in sorted(result.candidates, key=lambda r: sign * r["calibration"][m]):
        full = f"{r['full'][m]:.4f}" if "full" in r else ""
        ms = f" {r['predicted_ms']:.1f} |" if timed else ""
        lines.append(f"| {r['name']} | {r['flops_fraction']:.1%} |{ms} {r['calibration'][m]:.4f} | {full} |")
    lines += ["", f"Chosen on the calibration set: **{result.best['name']}** ({result.best['flops_fraction']:.1%} "
                  "FLOPs)."]
    if result.best_on_full is not None:
        rho = "n/a (one candidate)" if result.spearman is None else f"{result.spearman:.3f}"
        lines.append(f"Best on the full set: {result.best_on_full['name']}. Spearman correlation of the two "
                     f"rankings: {rho} over {len(result.candidates)} candidates.")
    return "\n".join(lines)


def write_tune(result: TuneResult, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    write_text_atomic(paths[0], json.dumps(finite(result.to_json()), indent=1))
    write_text_atomic(paths[1], format_tune(result) + "\n")
    return paths
