"""The quality subcommands, on the reference model (or one trained like it):

    postdiff-compile study   [MODEL] [--prompts N] [--seed-sets K] [--guidance G] [--out DIR] [--name NAME]
    postdiff-compile tune    [MODEL] --flops-budget F [--calibration N] [--full N] [--metric M] [--out DIR]
    postdiff-compile tune    [MODEL] --objective latency --costs FILE (--latency-budget MS | --speedup X) [--rank-only]
    postdiff-compile samples [MODEL] [--prompts N] [--steps N] [--seed S] [--out FILE.png]

MODEL is a reference-model folder: model 2's (scenes64, train_unet's WORK/model) or model 1's (scenes32, written by
python -m postdiff_compile.lab.reference.train); the default is model 2, shipped in the package. The metrics'
classifiers know these models' scenes only (32 and 64 px), so other models are refused.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .parser import Parser
from ..errors import PostDiffError

RESULTS = Path("benchmarks/results")
LOCAL = "local"     # --ray without an address: start a Ray instance on this machine


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", type=Path,
                        help="reference-model folder: model 1's (scenes32) or model 2's (scenes64, train_unet's "
                             "WORK/model) (default: the shipped model 2)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")


def _ray_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="keep each finished job's result in DIR; run again with the same DIR to resume a run "
                             "cut short (results of other weights, settings or versions are not reused)")
    parser.add_argument("--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
                        help="run each configuration as a Ray task: on a Ray instance started here (no ADDRESS; "
                             "Ray opens its own listeners) or on the cluster at ADDRESS (auto, ray://HOST:PORT); "
                             "the results equal the serial run's")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "study":
        parser = Parser(
            prog="postdiff-compile study",
            description="Fewer steps (DDIM, DPM-Solver++, Euler) against PostDiff configurations on the reference "
                        "model, every point on the same prompt/noise sets: a FLOPs-versus-quality table with 95% "
                        "intervals and paired verdicts (.md, .json) and a Pareto plot (.png).")
        _common(parser)
        parser.add_argument("--prompts", type=int, default=192, help="images per point and set (default: 192)")
        parser.add_argument("--seed-sets", type=int, default=3,
                            help="prompt/noise sets every point runs on: its mean and 95%% interval (default: 3)")
        parser.add_argument("--steps", default="4,6,8,10,14", help="fewer-steps counts (default: 4,6,8,10,14)")
        _ray_argument(parser)
        parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder (default: {RESULTS})")
        parser.add_argument("--name", help="file name stem (default: study_<family>: study_scenes32, study_scenes64)")
    elif command == "tune":
        parser = Parser(
            prog="postdiff-compile tune",
            description="The best configuration under a FLOPs budget on a small calibration set, and how well "
                        "the calibration ranking predicts the ranking on a larger set (Spearman).")
        _common(parser)
        parser.add_argument("--flops-budget", type=float, help="fraction of the baseline's FLOPs (objective flops)")
        parser.add_argument("--objective", choices=("flops", "latency"), default="flops",
                            help="fit candidates by FLOPs (default) or by latency predicted from --costs")
        parser.add_argument("--costs", type=Path, metavar="FILE.json",
                            help="a cost table from `postdiff-compile profile` of the reference model")
        parser.add_argument("--latency-budget", type=float, metavar="MS", help="objective latency: predicted ms")
        parser.add_argument("--speedup", type=float, metavar="X",
                            help="objective latency: at least X times the baseline's predicted latency")
        _ray_argument(parser)
        parser.add_argument("--rank-only", action="store_true",
                            help="print the candidates that fit, cheapest first, and stop (no images generated)")
        parser.add_argument("--calibration", type=int, default=48, help="calibration prompts (default: 48)")
        parser.add_argument("--full", type=int, default=192,
                            help="prompts of the check set (default: 192; 0 skips the check)")
        parser.add_argument("--metric", default="frechet",
                            help="frechet, caption_match, attribute_accuracy, psnr or ssim (default: frechet)")
        parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
        parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder (default: {RESULTS})")
        parser.add_argument("--name", help="file name stem (default: tune_<family>_<budget>)")
    else:
        parser = Parser(prog="postdiff-compile samples",
                                         description="A grid of samples: the baseline beside each preset, "
                                                     "same prompts and noise.")
        _common(parser)
        parser.add_argument("--prompts", type=int, default=8, help="rows (default: 8)")
        parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
        parser.add_argument("--seed", type=int, default=0, help="prompt set seed (default: 0)")
        parser.add_argument("--out", type=Path,
                            help="PNG to write (default: benchmarks/results/samples_<family>.png)")
    return parser


def _sweep(args: argparse.Namespace):
    """`--ray [ADDRESS]`: the sweep's jobs as Ray tasks (a local instance, or the cluster at ADDRESS); else serial."""
    import contextlib

    if getattr(args, "ray", None) is None:
        return contextlib.nullcontext(None)
    if importlib.util.find_spec("ray") is None:
        raise PostDiffError("--ray needs Ray: pip install 'postdiff-compile[serve]'")
    from ..lab.sweep import RaySweep

    return RaySweep(None if args.ray == LOCAL else args.ray, threads=args.threads or 1)


def run(command: str, args: argparse.Namespace) -> int:
    import torch

    from ..lab.reference_models import lab_family, load_lab_pipeline
    from ..models.families import get_family
    from .report import RichProgress

    family_name = lab_family(args.model)

    # Every argument is checked before the model loads: a study runs for many minutes.
    minimum = {"prompts": 2 if command == "study" else 1, "seed_sets": 1, "threads": 1}
    for name, least in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise PostDiffError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if command == "study":
        try:
            steps = tuple(int(s) for s in args.steps.split(","))
        except ValueError:
            steps = ()
        if not steps or min(steps) < 1:
            raise PostDiffError(f"--steps takes a comma-separated list of step counts >= 1, got {args.steps!r}")
    elif isinstance(args.steps, int) and args.steps < 1:
        raise PostDiffError(f"--steps must be at least 1, got {args.steps}")
    if command == "study" and importlib.util.find_spec("matplotlib") is None:   # the plot is drawn last
        raise PostDiffError("study draws its plot with matplotlib: pip install 'postdiff-compile[study]'")
    if command == "tune":
        from ..lab.tune import TuneSettings

        from ..costs import CostTable

        if args.objective == "flops" and args.flops_budget is None:
            raise PostDiffError("tune needs --flops-budget F (or --objective latency with --costs)")
        tune_settings = TuneSettings(args.flops_budget, args.calibration, args.full, args.metric, args.guidance,
                                     args.steps, objective=args.objective, latency_budget_ms=args.latency_budget,
                                     speedup=args.speedup)
        costs = CostTable.read(args.costs) if args.costs is not None else None
        if costs is not None and costs.family != family_name:
            raise PostDiffError(f"tune runs the reference model ({family_name}); the cost table is for {costs.family}",
                                args.costs)
        if args.rank_only:
            from ..lab.tune import format_ranking, ranking

            family = get_family(family_name)
            print(format_ranking(ranking(family, tune_settings, family.default_resolution, costs)))
            return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    family = get_family(family_name)
    pipe = load_lab_pipeline(args.model)
    if command == "study":
        from ..lab.study import StudySettings, format_table, run_study, write_results

        settings = StudySettings(args.prompts, args.seed_sets, args.guidance, steps=steps)
        with _sweep(args) as sweep, RichProgress() as progress:
            result = run_study(pipe, family, settings, progress.stage, sweep=_cached(args, sweep, pipe, family_name),
                               model=args.model)
        paths = write_results(result, args.out, args.name or f"study_{family_name}")
        print(format_table(result))
    elif command == "tune":
        from ..lab.tune import format_tune, run_tune, write_tune

        with _sweep(args) as sweep, RichProgress() as progress:
            result = run_tune(pipe, family, tune_settings, progress.stage, costs,
                              sweep=_cached(args, sweep, pipe, family_name), model=args.model)
        stem = f"{args.flops_budget:g}" if args.objective == "flops" else \
            f"{args.latency_budget:g}ms" if args.latency_budget is not None else f"{args.speedup:g}x"
        paths = write_tune(result, args.out, args.name or f"tune_{family_name}_{stem}")
        print(format_tune(result))
    else:
        from ..lab.evaluate import PromptSet
        from ..lab.samples import sample_grid, write_grid

        with RichProgress() as progress:
            sheet, captions = sample_grid(pipe, family.name, PromptSet.make(args.seed, args.prompts), args.steps,
                                          args.guidance, progress.stage)
        paths = write_grid(sheet, captions, args.out or RESULTS / f"samples_{family_name}.png")
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _cached(args: argparse.Namespace, sweep, pipe, family_name: str):
    """`--cache DIR`: the sweep (serial if None) behind a cache of finished jobs, keyed by the model's weights."""
    if args.cache is None:
        return sweep
    from ..lab.job_cache import CachedSweep, weights_fingerprint
    from ..lab.reference_models import shipped_folder
    from ..lab.sweep import SerialSweep

    inner = sweep if sweep is not None else SerialSweep(pipe)
    chunk = 1 if sweep is None else sweep.num_cpus or 16     # Ray: save a round of tasks at a time
    return CachedSweep(inner, args.cache, weights_fingerprint(args.model or shipped_folder(family_name)), chunk)
