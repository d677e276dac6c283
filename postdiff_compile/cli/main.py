"""postdiff-compile: compile a diffusion checkpoint into a verified artifact folder.

    postdiff-compile [SOURCE] --preset NAME --out DIR [--format pt2,onnx,tensorrt,aoti] [--resolution HxW] [--steps N]
    postdiff-compile run DIR [--backend torch|onnxruntime|tensorrt] ...   (execute an artifact: cli/artifact.py)
    postdiff-compile inspect DIR                                          (its plan, FLOPs and verification)
    postdiff-compile explain (--family NAME | SOURCE) (--preset NAME | --all-presets) [--resolution HxW]
                             [--steps N] [--json]
    postdiff-compile profile (DIR | SOURCE) [--backend B] [--device D]   (a cost table for this device: cli/profile.py)
    postdiff-compile refit DIR --out NEW (--weights F | --lora F [--lora-scale S])   (new weights: cli/refit.py)
    postdiff-compile study | tune | samples [MODEL] ...   (quality on the reference model: cli/quality.py)
    postdiff-compile serve DIR [--backend B] [--replicas R] [--port P] ...  (HTTP with Ray Serve: cli/serve.py)

Every PostDiffConfig field is a kebab-case flag that overrides the preset; --config FILE.json gives a whole
config. Bad input prints one `error:` line naming the problem and the file, and exits with status 2.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..config import PRESETS, ConfigRequest
from .flags import add_config_flags, add_costs_flag, config_from_args, parse_resolution
from .parser import Parser
from ..errors import PostDiffError

QUALITY_COMMANDS = ("study", "tune", "samples")


def build_parser() -> argparse.ArgumentParser:
    from ..models.families import FAMILIES

    parser = Parser(
        prog="postdiff-compile",
        description="Compile a diffusion checkpoint (SD1.x, SD2.x, SDXL, PixArt-alpha) into an artifact folder: "
                    "exported graphs, the step plan and a manifest with each graph's verification error. "
                    "With no SOURCE, compiles the small reference model trained for this project, shipped in the package.")
    parser.add_argument("source", nargs="?", help=".safetensors file or diffusers folder (default: the shipped reference model)")
    parser.add_argument("--out", type=Path, help="artifact folder to write (default: ./postdiff-out/NAME-PRESET)")
    parser.add_argument("--resolution", type=parse_resolution, metavar="HxW", help="image size (default: the family's)")
    parser.add_argument("--steps", type=int, help="denoising steps the plan covers (default: the family's, 20; 4 for LCM)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the checkpoint's")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"],
                        help="override the detected prediction type")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="override the detected family: a custom U-Net "
                        "whose widths match no released family then takes this family's presets")
    parser.add_argument("--format", default="pt2", metavar="FORMATS",
                        help="comma-separated: pt2 (torch.export programs), onnx (ONNX graphs, one shared weights "
                             "file, checked with onnxruntime), tensorrt (an engine per variant; needs a GPU and "
                             "tensorrt; brings onnx along), aoti (AOTInductor packages, for the aoti backend and the "
                             "C++ runner; slow to build). Default: pt2")
    parser.add_argument("--max-batch", type=int, default=1, metavar="N",
                        help="also build every variant for calls of up to N images (buckets: the powers of two "
                             "below N, and N; a call is padded to the next), for a server that batches requests. "
                             "Default: 1")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    add_config_flags(parser)
    add_costs_flag(parser)
    return parser


def build_explain_parser() -> argparse.ArgumentParser:
    from ..models.families import FAMILIES

    parser = Parser(
        prog="postdiff-compile explain",
        description="Print the per-step plan of a config and its FLOPs, counted from the variant graphs of the "
                    "real architecture built on the meta device (no weights, no download).")
    parser.add_argument("source", nargs="?", help=".safetensors checkpoint (only its header is read)")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="explain a known family instead of a file")
    parser.add_argument("--resolution", type=parse_resolution, metavar="HxW", help="image size (default: the family's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's, 20; 4 for LCM)")
    parser.add_argument("--no-cfg", action="store_true", help="a pipeline without classifier-free guidance")
    parser.add_argument("--json", action="store_true", help="print one JSON object (FLOPs in FLOPs, not TFLOPs)")
    parser.add_argument("--all-presets", action="store_true",
                        help="one line per preset (flags still override each): its FLOPs and fraction of the baseline")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    add_config_flags(parser)
    add_costs_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import artifact, quality

    command = argv[0] if argv and argv[0] in ("explain", "profile", "refit", "serve", *QUALITY_COMMANDS,
                                              *artifact.ARTIFACT_COMMANDS) else None
    if command in ("profile", "refit", "serve"):
        import importlib
        tool = importlib.import_module(f".{command}", __package__)
        parser = tool.build_parser()
    elif command in artifact.ARTIFACT_COMMANDS:
        parser = artifact.build_parser(command)
    elif command in QUALITY_COMMANDS:
        parser = quality.build_parser(command)
    else:
        parser = build_explain_parser() if command == "explain" else build_parser()
    args = parser.parse_args(argv[1:] if command else argv)
    in_main = threading.current_thread() is threading.main_thread()   # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        if command in ("profile", "refit", "serve"):
            return tool.run(args)
        if command in artifact.ARTIFACT_COMMANDS:
            return artifact.run(command, args)
        if command in QUALITY_COMMANDS:
            return quality.run(command, args)
        return _explain(args) if command == "explain" else _compile(args)
    except PostDiffError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:   # Ctrl-C, or SIGTERM (below): the atomic writers have cleaned up
        print(f"{'terminated' if isinstance(err, Terminated) else 'interrupted'}; no output was written",
              file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:  # a bug, not bad input: say so, keep the traceback behind --debug
        if args.debug:
            raise
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that `finally` blocks remove what a run had half written."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _compile(args: argparse.Namespace) -> int:
    from ..compile import compile_artifact
    from ..exporters.formats import parse_formats
    from ..variant_build import batch_buckets
    from .default_model import DESCRIPTION, embedded_default_path
    from ..lab.reference_models import DEFAULT_FAMILY, family_of
    from .report import RichProgress, print_summary

    config = config_from_args(args)
    formats = parse_formats(args.format)
    if args.steps is not None and args.steps < 1:
        raise PostDiffError(f"--steps must be at least 1, got {args.steps}")
    batch_buckets(args.max_batch)      # a bad --max-batch fails before the model loads
    source = args.source
    if source is None:
        source = str(embedded_default_path())
    if family_of(source):
        args.dtype = args.dtype or "float32"     # shipped in float16 to stay small; CPUs compute in float32
    stem = DEFAULT_FAMILY if args.source is None else Path(source).name.split(".")[0]
    out = args.out or Path("postdiff-out") / f"{stem}-{args.preset}"
    with RichProgress() as progress:
        result = compile_artifact(source, config, out, resolution=args.resolution, steps=args.steps,
                                  force=args.force, dtype=args.dtype, prediction_type=args.prediction_type,
                                  progress=progress, formats=formats, max_batch=args.max_batch, family=args.family)
    print_summary(result)
    if args.source is None:   # said after the work, so that an error is the only line a failed run prints
        print(f"no SOURCE given: compiled {DESCRIPTION} from {source}", file=sys.stderr)
    return 0


def _explain(args: argparse.Namespace) -> int:
    import json

    from ..explain import architecture_of, explain
    from ..fastest import resolve_request
    from .tables import format_explanation, format_preset_table
    from ..models.families import get_family

    request = config_from_args(args)
    if (args.family is None) == (args.source is None):
        raise PostDiffError("explain needs exactly one of --family NAME or a .safetensors SOURCE")
    if args.steps is not None and args.steps < 1:
        raise PostDiffError(f"--steps must be at least 1, got {args.steps}")
    if args.family:
        family, denoiser_config = get_family(args.family), None
    else:
        family, denoiser_config = architecture_of(args.source)
    stage = None if args.json else (lambda text: print(text, file=sys.stderr))
    if request.costs is not None and request.costs.family != family.name:
        raise PostDiffError(f"the cost table was measured on a {request.costs.family} denoiser, not {family.name}",
                            args.costs)
    steps = family.check_steps(args.steps or family.default_steps)
    resolution = args.resolution or family.default_resolution

    def explained(request: ConfigRequest):
        config = resolve_request(request, family, steps=steps, resolution=resolution, denoiser_config=denoiser_config)
        own = request.resolve(family.name)
        if request.costs is not None and stage is not None and config != own:
            changed = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if getattr(own, k, v) != v)
            stage(f"preset {request.preset} on {request.costs.device} ({request.costs.backend}): its alternative "
                  f"{changed} is predicted faster")
        return explain(family, config, steps=steps, resolution=resolution, denoiser_config=denoiser_config,
                       cfg=not args.no_cfg, costs=request.costs, on_stage=stage)
    if args.all_presets:
        if args.config is not None:
            raise PostDiffError("--all-presets explains the named presets; it does not take --config")
        results = {}
        for name in PRESETS:
            try:
                results[name] = explained(ConfigRequest(name, None, request.overrides, request.costs))
            except PostDiffError as err:
                if err.path is not None:
                    raise
                results[name] = str(err)
        print(json.dumps({k: v if isinstance(v, str) else v.to_json() for k, v in results.items()}, indent=2)
              if args.json else format_preset_table(family.name, steps, results))
        return 0
    result = explained(request)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_explanation(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
