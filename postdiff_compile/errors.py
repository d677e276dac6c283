"""The one exception type a user sees.

Every check of user input raises `PostDiffError` with a sentence naming the problem and the file it
concerns. The CLI prints `error: <message>` on one line and exits with status 2; the library lets it
propagate (it is a ValueError, so callers that catch bad-argument errors keep working).
"""
from __future__ import annotations

import contextlib
import os


class PostDiffError(ValueError):
    """Bad input: a missing or malformed file, an unknown architecture, an invalid setting."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


@contextlib.contextmanager
def naming(path: str | os.PathLike):
    """Errors raised inside that name no file are re-raised naming `path` (the source a check concerns)."""
    try:
        yield
    except PostDiffError as err:
        if err.path is not None:
            raise
        raise PostDiffError(str(err), path) from None
