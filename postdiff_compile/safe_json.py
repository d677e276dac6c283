"""JSON from files we did not write: bounded before it is parsed, strict while it is.

Python's json recurses once per nesting level (a header nested 1,000 deep is a RecursionError), converts
integers of any length (over 4,300 digits is a ValueError), and accepts NaN and Infinity. Every file this
tool reads from a user or an artifact goes through `loads`, which refuses all three with a PostDiffError
naming the file, so that hostile input is one error line, never another exception type.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from .errors import PostDiffError

MAX_DEPTH = 64           # the deepest file this tool writes or reads (a manifest) nests 7 levels
MAX_INT_DIGITS = 40      # above any size, offset or count a checkpoint or manifest can hold (2**128)
# A string, or an unterminated one up to the end: the pattern matches at every quote, so a substitution
# is one linear pass even on hostile bytes (a pattern that can fail rescans the rest from each quote).
# Unrolled ("normal* (escape normal*)*") because it runs over every header and manifest read.
_STRING = re.compile(rb'"[^"\\]*+(?:\\(?:.|\Z)[^"\\]*+)*+(?:"|\Z)', re.DOTALL)
_LONG_INT = re.compile(rb"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def _skeleton(raw: bytes) -> bytes:
    """The JSON text with every string emptied: what is left is numbers, literals and punctuation."""
    return _STRING.sub(b'""', raw)


def nesting_depth(raw: bytes, skeleton: bytes | None = None) -> int:
    """The deepest [ / { nesting of a JSON text, brackets inside strings not counted; linear time."""
    import numpy as np

    brackets = (skeleton if skeleton is not None else _skeleton(raw)).translate(
        None, delete=bytes(set(range(256)) - _OPEN - _CLOSE))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where(np.isin(codes, list(_OPEN)), 1, -1)
    return int(np.cumsum(steps).max())


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


class _Refused(ValueError):
    pass


def loads(raw: bytes | str, path: str | os.PathLike | None, what: str = "JSON", message: str | None = None) -> Any:
    """Parse `raw` or raise a PostDiffError `<path>: not valid <what>: <why>` (or `message` with {why} filled in)."""
    template = message or f"not valid {what}: {{why}}"
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PostDiffError(template.format(why=f"not UTF-8 text (byte {err.start})"), path) from None
    skeleton = _skeleton(raw)
    depth = nesting_depth(raw, skeleton)
    if depth > MAX_DEPTH:
        raise PostDiffError(template.format(why=f"nested {depth} levels deep (at most {MAX_DEPTH})"), path)
    # Found in the text outside strings, not with a parse_int hook: a hook is a Python call per integer, and
    # a header has a million of them.
    if (long := _LONG_INT.search(skeleton)) is not None:
        raise PostDiffError(template.format(why=f"an integer of {len(long[0])} digits (at most {MAX_INT_DIGITS})"),
                            path)
    try:
        return json.loads(text, parse_float=_parse_float, parse_constant=_parse_constant)
    except _Refused as err:
        raise PostDiffError(template.format(why=err), path) from None
    except json.JSONDecodeError as err:
        raise PostDiffError(template.format(why=err), path) from None
    except RecursionError:   # not reached after the depth check; kept so that no other error type escapes
        raise PostDiffError(template.format(why="nested too deep"), path) from None
