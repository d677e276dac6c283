"""The tensor names and shapes of every known family's full-size checkpoint, in each of its layouts.

The unknown-architecture error names the closest family and what is missing from it. Building every
family's model on the meta device to find out took 10-27 s per error; the table is bundled instead
(configs/reference_shapes.json.gz, 64 KB) and a slow test checks that it equals what `build_table` makes
from the bundled configs. Regenerate it after changing a family or a key map:

    python -m postdiff_compile.models.reference_shapes
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .families import FAMILIES, get_family
from .key_maps import RELEASED_PREFIX

TABLE = "reference_shapes.json.gz"


def layouts_of(family: str) -> tuple[str, ...]:
    return get_family(family).checkpoint_layouts


def build_shapes(family: str, layout: str) -> dict[str, tuple[int, ...]]:
    """Built on the meta device from the bundled config and mapped to `layout`'s names."""
    from .build import build_denoiser
    from .key_maps import original_source

    spec = get_family(family)
    model = build_denoiser(spec.denoiser_class, spec.config(), device="meta")
    prefix = RELEASED_PREFIX.get(layout, "")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        src = original_source(layout, key, spec.config(), prefix)
        shapes[src.name] = (src.stored_rows(tensor.shape[0]), *tensor.shape[1:])  # fused tensors hold all parts
    return shapes


def build_table() -> dict[str, dict[str, tuple[int, ...]]]:
    return {f"{family}/{layout}": build_shapes(family, layout) for family in FAMILIES for layout in layouts_of(family)}


@lru_cache(maxsize=1)
def reference_table() -> dict[str, dict[str, tuple[int, ...]]]:
    """The bundled table: "family/layout" -> {name: shape}."""
    raw = resources.files(__package__).joinpath("configs").joinpath(TABLE).read_bytes()
    table = json.loads(gzip.decompress(raw))
    return {key: {name: tuple(shape) for name, shape in shapes.items()} for key, shapes in table.items()}


def write_table(path: Path | None = None) -> Path:
    path = path or Path(__file__).with_name("configs") / TABLE
    text = json.dumps({k: {n: list(s) for n, s in v.items()} for k, v in build_table().items()},
                      separators=(",", ":"), sort_keys=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


if __name__ == "__main__":
    print(write_table())
