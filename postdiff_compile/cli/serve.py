"""postdiff-compile serve ARTIFACT: the artifact behind an HTTP JSON API on Ray Serve (docs/serving.md).

    postdiff-compile serve DIR [--backend onnxruntime] [--replicas 1] [--max-batch 16] [--batch-wait-ms 10]
                           [--host 127.0.0.1] [--port 8000] [--ray ADDRESS] [--print-config]

The artifact is checked (manifest, checksums, toolchain) before Ray starts: a damaged one is one error line and
exit status 2. Without --ray a local Ray instance starts; Ray opens listeners of its own beside the HTTP port.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from ..errors import PostDiffError
from .parser import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="postdiff-compile serve",
                    description="Serve an artifact over HTTP with Ray Serve: POST /generate, GET /healthz, GET /info; "
                                "concurrent requests run as one batch.")
    parser.add_argument("artifact", type=Path, help="artifact folder (compile it with --max-batch N to batch)")
    parser.add_argument("--backend", default="onnxruntime", help="torch, onnxruntime, aoti or tensorrt "
                                                                 "(default: onnxruntime)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (default: 1)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most requests run as one batch (default: 16; at most the artifact's largest bucket)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a batch waits to fill (default: 10 ms)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (default: 0: a CPU each)")
    parser.add_argument("--threads", type=int, help="CPU threads per replica")
    parser.add_argument("--ray", metavar="ADDRESS", help="join the Ray cluster at ADDRESS instead of starting one")
    parser.add_argument("--print-config", action="store_true",
                        help="print a Ray Serve config (YAML) for `serve deploy` on a cluster and stop")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser


def check(args: argparse.Namespace) -> None:
    from ..runtime.artifact import load

    for name, least in (("replicas", 1), ("max_batch", 1), ("port", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise PostDiffError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.port > 65535 or not 0 <= args.batch_wait_ms <= 10_000:
        raise PostDiffError("--port must be at most 65535 and --batch-wait-ms in [0, 10000]")
    load(args.artifact, args.backend)       # manifest, checksums, toolchain: refused before Ray starts


def config_yaml(args: argparse.Namespace) -> str:
    """A Ray Serve config file for `serve deploy` (the artifact path must exist on the cluster's nodes)."""
    actor = f"num_gpus: {args.gpus:g}" if args.gpus else "num_cpus: 1"
    return f"""# postdiff-compile serve {args.artifact}: deploy with `serve deploy THIS.yaml` (docs/serving.md)
http_options:
  host: {args.host}
  port: {args.port}
applications:
  - name: postdiff
    route_prefix: /
    import_path: postdiff_compile.serve.app:app_from_args
    args:
      artifact: {str(Path(args.artifact).resolve())!r}
      backend: {args.backend}
      replicas: {args.replicas}
      max_batch: {args.max_batch}
      batch_wait_ms: {args.batch_wait_ms:g}
      gpus: {args.gpus:g}
    deployments:
      - name: postdiff
        num_replicas: {args.replicas}
        ray_actor_options:
          {actor}
"""


def run(args: argparse.Namespace) -> int:
    check(args)
    if args.print_config:
        print(config_yaml(args), end="")
        return 0
    if importlib.util.find_spec("ray") is None:
        raise PostDiffError("serve needs Ray Serve: pip install 'postdiff-compile[serve]'")
    import ray
    from ray import serve

    from ..serve.app import build_app

    ray.init(address=args.ray, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args.artifact, args.backend, args.replicas, args.max_batch, args.batch_wait_ms,
                            args.threads, args.gpus), name="postdiff", route_prefix="/")
        print(f"serving {args.artifact} on http://{args.host}:{args.port} (POST /generate, GET /healthz, GET /info); "
              "Ctrl-C stops", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
