"""When detection fails: the full-size family a checkpoint comes closest to, and the error that names it."""
from __future__ import annotations

from ..errors import PostDiffError
from .families import FAMILIES
from .shape_evidence import Shapes


def closest_family(shapes: Shapes) -> tuple[str, str, str, list[str]]:
    """(family, layout, "present/total", missing names) for the best-matching full-size family.

    Names alone do not separate SD1.x from SD2.x (same names, other widths), so a name only counts as
    present when its shape matches too; ties go to the family with more names present.
    """
    from .reference_shapes import layouts_of, reference_table

    best, best_key = None, None
    for family in FAMILIES:   # in the families' order: the first of equal scores wins
        for layout in layouts_of(family):
            ref = reference_table()[f"{family}/{layout}"]
            named = sum(1 for n in ref if n in shapes)
            exact = sum(1 for n, shape in ref.items() if tuple(shapes.get(n, ())) == shape)
            key = (exact / len(ref), named / len(ref))
            if best_key is None or key > best_key:
                best_key = key
                best = (family, layout, f"{named}/{len(ref)}", sorted(n for n in ref if n not in shapes))
    assert best is not None
    return best


def unknown_architecture(shapes: Shapes, source: str | None, why: str,
                         evidence: list[str] | None = None) -> PostDiffError:
    family, layout, present, missing = closest_family(shapes)
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    seen = f" (found: {'; '.join(evidence)})" if evidence else ""
    return PostDiffError(
        f"unknown architecture: {why}{seen}. Closest family: {family} in {layout} layout "
        f"({present} of its tensors present); missing: {shown}",
        source,
    )
