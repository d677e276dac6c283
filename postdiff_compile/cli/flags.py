"""The flags several subcommands share: the configuration (--preset, --config, one flag per PostDiffConfig field),
--costs, and --resolution's HxW."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import PRESETS, ConfigRequest, PostDiffConfig


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--preset, --config and one flag per PostDiffConfig field; shared by every subcommand taking a config."""
    group = parser.add_argument_group("configuration (flags override the preset or --config file)")
    group.add_argument("--preset", default="none", help=f"named config: {', '.join(PRESETS)} (default: none)")
    group.add_argument("--config", type=Path, metavar="FILE.json", help="a whole PostDiffConfig as JSON")
    for field in dataclasses.fields(PostDiffConfig):
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                           type={"int": int, "float": float}.get(field.type, str), metavar=field.name.upper())


def config_from_args(args: argparse.Namespace) -> ConfigRequest:
    """The config the flags ask for; presets depend on the family, so it is resolved once that is known.

    Resolving for no family here checks the preset name, the --config file and every override now,
    before any slow work.
    """
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PostDiffConfig)
                 if getattr(args, f.name) is not None}
    base = PostDiffConfig.from_json_file(args.config) if args.config is not None else None
    costs = None
    if getattr(args, "costs", None) is not None:
        from ..costs import CostTable

        costs = CostTable.read(args.costs)
    request = ConfigRequest(args.preset, base, overrides, costs)
    request.resolve(None)
    return request


def add_costs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--costs", type=Path, metavar="FILE.json",
                        help="a cost table from `postdiff-compile profile`: predict latency on its device, and resolve "
                             "--preset to the fastest configuration of the preset's quality class there")


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 512x512, got {text!r}") from None
    return height, width
