"""Write an output folder so that it appears complete or not at all.

Everything is written into a temporary folder beside the target and renamed into place at the end; an
existing target (with force) is moved aside first and deleted only after the new one is in place. A
failure at any point leaves the previous folder as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import PostDiffError


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise PostDiffError("output folder already exists; pass --force to replace it", target)
    if target.exists() and not target.is_dir():
        raise PostDiffError("output path exists and is not a folder", target)


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    target = Path(target)
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact should get the usual permissions
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            old.rmdir()
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
