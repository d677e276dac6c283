"""When detection fails: the full-size family a checkpoint comes closest to, and the error that names it."""
from __future__ import annotations

from ..errors import PostDiffError
from .families import FAMILIES
from .key_maps import LDM_PREFIX
from .shape_evidence import Shapes


def closest_family(shapes: Shapes) -> tuple[str, str, str, list[str], list[str]]:
    """(family, layout, "present/total", missing names, names with other shapes) for the best-matching
    full-size family.

    Names alone do not separate SD1.x from SD2.x (same names, other widths), so a name only counts as
    present when its shape matches too; ties go to the family with more names present.
    """
    from .reference_shapes import layouts_of, reference_table

    best, best_key = None, None
    prefixed = any(k.startswith(LDM_PREFIX) for k in shapes)
    for family in FAMILIES:   # in the families' order: the first of equal scores wins
        for layout in layouts_of(family):
            ref = _named_as_in_file(reference_table()[f"{family}/{layout}"], prefixed)
            named = sum(1 for n in ref if n in shapes)
            exact = sum(1 for n, shape in ref.items() if tuple(shapes.get(n, ())) == shape)
            key = (exact / len(ref), named / len(ref))
            if best_key is None or key > best_key:
                best_key = key
                best = (family, layout, f"{named}/{len(ref)}", sorted(n for n in ref if n not in shapes),
                        sorted(n for n, shape in ref.items() if n in shapes and tuple(shapes[n]) != shape))
    assert best is not None
    return best


def _named_as_in_file(ref: Shapes, prefixed: bool) -> Shapes:
    # The table names each layout as its released files do (SD and SD3 single files under the LDM prefix, FLUX
    # and PixArt without); ComfyUI saves FLUX with it and other tools strip it, so compare as the file names them.
    if any(n.startswith(LDM_PREFIX) for n in ref) == prefixed:
        return ref
    if prefixed:
        return {LDM_PREFIX + n: shape for n, shape in ref.items()}
    return {n.removeprefix(LDM_PREFIX): shape for n, shape in ref.items()}


def unknown_architecture(shapes: Shapes, source: str | None, why: str,
                         evidence: list[str] | None = None) -> PostDiffError:
    family, layout, present, missing, differing = closest_family(shapes)
    # Every name present, some shapes changed (a damaged or edited file): name those instead.
    label, names = ("missing", missing) if missing or not differing else ("other shapes", differing)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    seen = f" (found: {'; '.join(evidence)})" if evidence else ""
    return PostDiffError(
        f"unknown architecture: {why}{seen}. Closest family: {family} in {layout} layout "
        f"({present} of its tensors present); {label}: {shown}",
        source,
    )
