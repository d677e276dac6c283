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
_STRING = re.compile(rb'"(?:[^"\\]|\\.|\\\Z)*+(?:"|\Z)', re.DOTALL)
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def nesting_depth(raw: bytes) -> int:
    """The deepest [ / { nesting of a JSON text, brackets inside strings not counted; linear time."""
    import numpy as np

    skeleton = _STRING.sub(b'""', raw).translate(None, delete=bytes(set(range(256)) - _OPEN - _CLOSE))
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where(np.isin(codes, list(_OPEN)), 1, -1)
    return int(np.cumsum(steps).max())


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


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
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise PostDiffError(template.format(why=f"nested {depth} levels deep (at most {MAX_DEPTH})"), path)
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _Refused as err:
        raise PostDiffError(template.format(why=err), path) from None
    except json.JSONDecodeError as err:
        raise PostDiffError(template.format(why=err), path) from None
    except RecursionError:   # not reached after the depth check; kept so that no other error type escapes
        raise PostDiffError(template.format(why="nested too deep"), path) from None
