"""The study the paper is about, on the reference model: fewer steps against cheaper steps.

Every point is a `Sampler` (scheduler, steps, PostDiff config). Each is run on the same prompts and noise,
scored by `evaluate.py` and costed with `explain` (true FLOPs: 2 x MACs, attention included, as a
fraction of the 20-step DDIM baseline with CFG). Every point runs on the same `seed_sets` prompt/noise sets:
each number is a mean with its 95% interval, and two points are compared set by set (`intervals.py`); a
difference whose interval includes zero is not a finding.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import PRESETS, PostDiffConfig
from .evaluate import (FRESH_REAL_SEED, MAX_PSNR, SCHEDULERS, PromptSet, Sampler, evaluate, generate,
                       real_features)
from .intervals import WITHIN, interval, verdict
from ..metrics.quality import frechet_distance

BASELINE = Sampler("ddim-20 (baseline)", "ddim", 20)
METRICS = ("caption_match", "attribute_accuracy", "frechet", "psnr", "ssim")
NOISE_METRICS = ("caption_match", "attribute_accuracy", "acc_colour", "acc_shape", "frechet")
VERDICT_METRICS = ("frechet", "caption_match", "acc_colour")


@dataclass(frozen=True)
class StudySettings:
    prompts: int = 192          # prompts (images) per point
    seed_sets: int = 3          # prompt/noise sets the baseline is run on: the noise floor
    guidance: float = 4.0
    real: int = 2048            # real images the Frechet distance compares against
    steps: tuple[int, ...] = (4, 6, 8, 10, 14)   # the fewer-steps baselines, per scheduler


def postdiff_points(family: str) -> list[Sampler]:
    """The PostDiff configurations swept (all at 20 DDIM steps): each technique alone, then the presets."""
    clamp = PRESETS["quality"].for_family(family).clamp_x0      # the family's transition clamp (pixel space: 1)
    mix = PostDiffConfig(low_res_scale=0.5, low_res_fraction=0.5, clamp_x0=clamp)
    points = [
        Sampler("mix b1/2 s1/4", config=mix.replace(low_res_fraction=0.25)),
        Sampler("mix b1/2 s1/2", config=mix),
        Sampler("mix b3/4 s1/2", config=mix.replace(low_res_scale=0.75)),
        Sampler("mix b1/2 s3/4", config=mix.replace(low_res_fraction=0.75)),
        Sampler("deepcache k2 b1", config=PostDiffConfig(cache_interval=2, cache_branch=1)),
        Sampler("deepcache k3 b1", config=PostDiffConfig(cache_interval=3, cache_branch=1)),
        Sampler("ca-cache cond m10", config=PostDiffConfig(cross_attn_cache="cond", cross_attn_cache_step=10)),
        Sampler("ca-cache cond m5", config=PostDiffConfig(cross_attn_cache="cond", cross_attn_cache_step=5)),
        Sampler("ca-cache ave m10", config=PostDiffConfig(cross_attn_cache="ave", cross_attn_cache_step=10)),
    ]
    for name in ("balanced", "fast"):
        points.append(Sampler(f"preset {name}", config=PRESETS[name].for_family(family)))
    points.append(Sampler("preset fast, 10 steps", steps=10,
                          config=PRESETS["fast"].for_family(family).replace(cross_attn_cache_step=5)))
    return points


def fewer_step_points(settings: StudySettings) -> list[Sampler]:
    return [Sampler(f"{s}-{k}", s, k) for s in SCHEDULERS for k in settings.steps] + \
        [Sampler("dpmsolver++-20", "dpmsolver++", 20)]


def flops_fraction(family, sampler: Sampler, resolution: tuple[int, int], baseline_total: float | None) -> float:
    total = _true_flops(family, sampler.config, sampler.steps, resolution)
    return total / baseline_total if baseline_total else total


@lru_cache(maxsize=None)
def _true_flops(family, config: PostDiffConfig, steps: int, resolution: tuple[int, int]) -> float:
    from ..explain import explain

    return explain(family, config, steps=steps, resolution=resolution).total.true


@dataclass
class StudyResult:
    settings: StudySettings
    # One per point: name, kind, scheduler, steps, config, flops_fraction, each metric's mean over the prompt/noise
    # sets, "ci95" (each metric's 95% half-width), "per_set" (each metric's values) and the paired verdicts
    # "vs_baseline" and, for PostDiff points, "vs_fewer_steps" (`compare`)
    rows: list[dict]
    noise: dict[str, float]      # std of each metric of the baseline over the seed sets
    real_floor: float            # Frechet distance of fresh real images at the same n: the metric's floor
    seconds: float
    model: str = "scenes32"

    def to_json(self) -> dict:
        return {"model": self.model, "settings": asdict(self.settings), "rows": self.rows, "noise_std": self.noise,
                "frechet_real_floor": self.real_floor, "seconds": self.seconds}


@dataclass(frozen=True)
class StudyJob:
    """One point on one prompt/noise set: a sweep's job (sweep.py)."""
    model: str | None       # the reference-model folder (None: the shipped default, model 2)
    sampler: Sampler
    prompt_set: int
    settings: StudySettings


def score_point(job: StudyJob, pipe=None) -> dict:
    """The point's metrics on its prompt set, fidelity against the baseline on the same set (which the process
    draws once): the same numbers in any process."""
    from .sweep import lab_state

    s = job.settings
    state = lab_state(job.model, pipe)
    real = state.once(("real", s.real), lambda: real_features(state.classifier, s.real))
    prompts = PromptSet.make(job.prompt_set, s.prompts)
    baseline = state.once(("study baseline", job.prompt_set, s.prompts, s.guidance),
                          lambda: generate(state.pipe, BASELINE, prompts, s.guidance))
    if job.sampler == BASELINE:
        return {**evaluate(baseline, prompts, state.classifier, real), "psnr": MAX_PSNR, "ssim": 1.0}
    images = generate(state.pipe, job.sampler, prompts, s.guidance)
    return evaluate(images, prompts, state.classifier, real, baseline)


def run_study(pipe, family, settings: StudySettings, stage: Callable[[str, int], Callable[[int], None]],
              points: list[Sampler] | None = None, sweep=None, model: str | None = None) -> StudyResult:
    """Every point on every prompt/noise set (the same sets, so settings compare set by set), on `sweep` (default:
    serially on `pipe`); `model` is the folder `pipe` was loaded from, for workers that load their own."""
    from .sweep import SerialSweep, lab_state

    start = time.perf_counter()
    resolution = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    base_total = flops_fraction(family, BASELINE, resolution, None)
    samplers = [BASELINE, *(points if points is not None else fewer_step_points(settings) + postdiff_points(family.name))]
    model = None if model is None else str(model)
    jobs = [StudyJob(model, sampler, i, settings) for sampler in samplers for i in range(settings.seed_sets)]
    sweep = sweep if sweep is not None else SerialSweep(pipe)
    results = sweep.map(score_point, jobs, stage(f"{len(samplers)} points x {settings.seed_sets} prompt/noise sets "
                                                 f"of {settings.prompts}", len(jobs)))
    rows = []
    for k, sampler in enumerate(samplers):
        per_set = results[k * settings.seed_sets:(k + 1) * settings.seed_sets]
        kind = "baseline" if sampler == BASELINE else "fewer steps" if sampler.config.is_identity else "postdiff"
        rows.append(_row(sampler, kind, flops_fraction(family, sampler, resolution, base_total), per_set))
    base = rows[0]["per_set"]
    noise = {m: float(np.std(base[m], ddof=1)) if settings.seed_sets > 1 else float("nan") for m in NOISE_METRICS}
    state = lab_state(model, pipe)
    real = state.once(("real", settings.real), lambda: real_features(state.classifier, settings.real))
    real_floor = frechet_distance(real_features(state.classifier, settings.prompts, FRESH_REAL_SEED), real)
    compare(rows)
    return StudyResult(settings, rows, noise, real_floor, time.perf_counter() - start, family.name)


def _row(sampler: Sampler, kind: str, fraction: float, per_set: list[dict]) -> dict:
    row = {"name": sampler.name, "kind": kind, "scheduler": sampler.scheduler, "steps": sampler.steps,
           "config": {k: v for k, v in sampler.config.to_dict().items() if k != "config_version"},
           "flops_fraction": fraction, "ci95": {}, "per_set": {}}
    for metric in per_set[0]:
        values = [s[metric] for s in per_set]
        row[metric], row["ci95"][metric] = interval(values)
        row["per_set"][metric] = values
    return row


def compare(rows: list[dict]) -> None:
    """Add each row's paired verdicts: against the baseline ("vs_baseline") and, for PostDiff points, against
    the best fewer-steps curve at the same FLOPs ("vs_fewer_steps"), on each of `VERDICT_METRICS`."""
    base = next(r for r in rows if r["kind"] == "baseline")
    sets = len(base["per_set"]["frechet"])
    for r in rows:
        if r is base:
            continue
        r["vs_baseline"] = {m: verdict(np.subtract(r["per_set"][m], base["per_set"][m]), m == "frechet")
                            for m in VERDICT_METRICS}
        if r["kind"] != "postdiff":
            continue
        r["vs_fewer_steps"] = {}
        for m in VERDICT_METRICS:
            refs = [equal_flops_baseline(rows, r["flops_fraction"], m, i) for i in range(sets)]
            if None not in refs:
                r["vs_fewer_steps"][m] = verdict(np.subtract(r["per_set"][m], refs), m == "frechet")


def equal_flops_baseline(rows: list[dict], fraction: float, metric: str = "frechet",
                         prompt_set: int | None = None) -> float | None:
    """The best fewer-steps value of `metric` at `fraction` FLOPs, interpolating each scheduler's curve linearly
    in FLOPs (None outside the range it covers); on one prompt set's values if `prompt_set` is given."""
    lower_is_better = metric == "frechet"
    best = None
    for scheduler in SCHEDULERS:
        curve = sorted((r["flops_fraction"], r[metric] if prompt_set is None else r["per_set"][metric][prompt_set])
                       for r in rows if r["kind"] in ("fewer steps", "baseline") and r["scheduler"] == scheduler)
        xs, ys = [c[0] for c in curve], [c[1] for c in curve]
        if len(xs) < 2 or not xs[0] <= fraction <= xs[-1]:
            continue
        value = float(np.interp(fraction, xs, ys))
        if best is None or (value < best if lower_is_better else value > best):
            best = value
    return best


def _pm(row: dict, metric: str, digits: int) -> str:
    half = row.get("ci95", {}).get(metric, math.nan)
    return f"{row[metric]:.{digits}f}" + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")


def _said(comparison: dict | None, digits: int) -> str:
    if not comparison:
        return ""
    half = comparison["ci95"]
    text = f"{comparison['delta']:+.{digits}f}" + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")
    return text + ("" if comparison["verdict"] == WITHIN else f" **{comparison['verdict']}**")


def format_table(result: StudyResult) -> str:
    noise, s = result.noise, result.settings
    lines = [
        f"Reference model ({result.model}), {s.prompts} prompts per point on each of {s.seed_sets} prompt/noise "
        f"sets, CFG {s.guidance}, {s.real} real images for the Frechet distance; {result.seconds / 60:.1f} min.",
        "",
        f"Each value is the mean over the sets ± the half-width of its 95% interval (Student's t, {s.seed_sets - 1} "
        "degrees of freedom). A difference (d) is paired set by set; it is called better or worse only where its "
        "interval excludes zero. Colour and shape accuracy are over the captioned objects.",
        "",
        f"Noise floor: std over {s.seed_sets} prompt/noise sets of the baseline: caption match "
        f"{noise['caption_match']:.4f}, attribute accuracy {noise['attribute_accuracy']:.4f}, Frechet "
        f"{noise['frechet']:.3f}; fresh real images at the same n score Frechet {result.real_floor:.3f}.",
        "",
        "| point | kind | FLOPs | caption match | colour acc. | shape acc. | Frechet | d Frechet vs baseline "
        "| d Frechet vs fewer steps at equal FLOPs | d caption match vs fewer steps | PSNR vs baseline (dB) "
        "| SSIM vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result.rows, key=lambda r: (r["kind"] != "baseline", r["kind"], -r["flops_fraction"])):
        versus = r.get("vs_fewer_steps", {})
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['flops_fraction']:.1%} | {_pm(r, 'caption_match', 3)} | "
            f"{_pm(r, 'acc_colour', 3)} | {_pm(r, 'acc_shape', 3)} | {_pm(r, 'frechet', 2)} | "
            f"{_said(r.get('vs_baseline', {}).get('frechet'), 2)} | {_said(versus.get('frechet'), 2)} | "
            f"{_said(versus.get('caption_match'), 3)} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


def plot(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, metric, label in ((axes[0], "frechet", "Frechet distance (lower is better)"),
                              (axes[1], "caption_match", "caption match (higher is better)")):
        def bars(rows: list[dict]) -> list[float]:
            return [r.get("ci95", {}).get(metric, 0.0) for r in rows]

        for scheduler, style, colour in zip(SCHEDULERS, ("o-", "s--", "^:"), ("grey", "black", "tab:green")):
            pts = sorted((r for r in result.rows if r["kind"] in ("fewer steps", "baseline")
                          and r["scheduler"] == scheduler), key=lambda r: r["flops_fraction"])
            ax.errorbar([r["flops_fraction"] for r in pts], [r[metric] for r in pts], yerr=bars(pts), fmt=style,
                        color=colour, label=f"fewer steps, {scheduler}", alpha=0.8, capsize=2)
        post = [r for r in result.rows if r["kind"] == "postdiff"]
        ax.errorbar([r["flops_fraction"] for r in post], [r[metric] for r in post], yerr=bars(post), fmt="o",
                    color="tab:red", zorder=3, capsize=2, label="PostDiff configs (20 DDIM steps unless named)")
        for r in post:
            ax.annotate(r["name"], (r["flops_fraction"], r[metric]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto_front(result.rows, metric)
        ax.step([r["flops_fraction"] for r in front], [r[metric] for r in front], where="post", color="tab:blue",
                alpha=0.5, label="Pareto front (means)")
        ax.set_xlabel("FLOPs, fraction of 20-step DDIM with CFG")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Fewer steps or cheaper steps: {result.model}, {result.settings.prompts} prompts x "
                 f"{result.settings.seed_sets} sets per point, 95% intervals")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def pareto_front(rows: list[dict], metric: str = "frechet") -> list[dict]:
    """Points no other point beats in both FLOPs and `metric`, by increasing FLOPs."""
    sign = 1 if metric == "frechet" else -1
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["flops_fraction"], sign * r[metric])):
        if sign * r[metric] < best:
            front.append(r)
            best = sign * r[metric]
    return front


def finite(data):
    """`data` with NaN and infinities as None: strict JSON."""
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def load_result(path: Path) -> StudyResult:
    """A study written by `write_results`, read back (to redraw its plot)."""
    data = json.loads(Path(path).read_text())
    settings = StudySettings(**{**data["settings"], "steps": tuple(data["settings"]["steps"])})
    rows = [{k: (MAX_PSNR if k == "psnr" and v is None else v) for k, v in r.items()} for r in data["rows"]]
    for r in rows:      # a single set's interval is NaN, written as null
        r["ci95"] = {k: (math.nan if v is None else v) for k, v in r.get("ci95", {}).items()}
    noise = {k: (math.nan if v is None else v) for k, v in data["noise_std"].items()}
    return StudyResult(settings, rows, noise, data["frechet_real_floor"], data["seconds"],
                       data.get("model", "scenes32"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path`, then rename: a results file is complete or absent, never half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(result: StudyResult, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    write_text_atomic(paths[0], json.dumps(finite(result.to_json()), indent=1))
    write_text_atomic(paths[1], format_table(result) + "\n")
    plot(result, paths[2])
    return paths
