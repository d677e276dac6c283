"""Write an output folder so that it appears complete or not at all, whatever happens to the writer.

Everything is written into `.NAME.PID.XXXX.partial` beside the target and renamed into place at the end; an
existing target (with force) is moved aside to `.NAME.PID.XXXX.old` first and deleted only after the new one
is in place. A failure, Ctrl-C or SIGTERM (the CLI turns it into an exception) leaves the previous folder
as it was and removes the partial one.

SIGKILL cannot be caught, so the next writer of the same target cleans up: while it holds the target's
lock, a `.partial` or `.old` folder whose PID is no longer running belongs to a dead run; it is deleted,
except that an `.old` folder is renamed back when the target is missing (the run died between the two
renames). The lock (`.NAME.lock`, an flock held for the whole write) makes a second writer of the same
target fail at once with one error instead of both "succeeding"; it is removed when the writer ends.
The parent is created and written to before any slow work, so an unusable output location fails first.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import PostDiffError


def check_target(target: Path, force: bool) -> None:
    target = Path(target)
    if target.is_symlink():
        raise PostDiffError("output path is a symbolic link; give the real folder", target)
    if target.exists() and not force:
        raise PostDiffError("output folder already exists; pass --force to replace it", target)
    if target.exists() and not target.is_dir():
        raise PostDiffError("output path exists and is not a folder", target)


def _os_error(what: str, err: OSError, path: Path) -> PostDiffError:
    return PostDiffError(f"{what}: {err.strerror or err}", path)


def _make_parent(target: Path) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error("cannot create the output folder's parent", err, parent) from None
    if not parent.is_dir():
        raise PostDiffError("the output folder's parent is not a folder", parent)
    return parent


class _TargetLock:
    """An exclusive flock on `.NAME.lock` beside the target; the file is removed on release."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> "_TargetLock":
        for _ in range(100):   # the file may be unlinked by its last holder between our open and our flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise _os_error("cannot write beside the output folder", err, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise PostDiffError(f"another process (PID {holder}) is writing this output folder now; wait "
                                        "for it to finish or choose another output folder", self.target) from None
                raise _os_error("cannot lock the output folder", err, self.path) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)
        raise PostDiffError("cannot lock the output folder: its lock file keeps changing", self.path)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def leftovers(target: Path) -> list[tuple[Path, str, int]]:
    """(path, "partial" or "old", owner PID) of the temporary folders writers of `target` leave beside it."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d{{1,10}})\.[^.]+\.(partial|old)$")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if (m := pattern.match(entry.name)) and entry.is_dir(follow_symlinks=False):
                found.append((Path(entry.path), m[2], int(m[1])))
    return found


def _clean_up_dead_runs(target: Path) -> None:
    """Called with the lock held: no live writer of this target can own what is removed."""
    for path, kind, pid in sorted(leftovers(target), key=lambda f: f[1] == "partial"):
        if pid == os.getpid() or _alive(pid):
            continue
        if kind == "old" and not target.exists():
            path.rename(target)   # a run died between moving the old folder aside and moving the new one in
        else:
            shutil.rmtree(path, ignore_errors=True)


def _temporary(target: Path, kind: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=f".{kind}"))
    except OSError as err:
        raise _os_error("cannot write beside the output folder", err, target.parent) from None


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    target = Path(target)
    check_target(target, force)
    _make_parent(target)
    with _TargetLock(target):
        _clean_up_dead_runs(target)
        check_target(target, force)   # again under the lock: a run that just finished may have written it
        before = {path for path, _, _ in leftovers(target)}
        try:
            tmp = _temporary(target, "partial")
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact should get the usual permissions
            yield tmp
            old = None
            if target.exists():
                old = _temporary(target, "old")
                old.rmdir()
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            # Found anew, not by `tmp`: a SIGTERM that lands between mkdtemp and the assignment (the CLI raises it as
            # an exception) left the partial folder behind with no name to remove it by (seen once in the default
            # tier, 7 Dec). Under the lock, a partial folder of this PID that was not there before is this run's.
            for path, kind, pid in leftovers(target):
                if kind == "partial" and pid == os.getpid() and path not in before:
                    shutil.rmtree(path, ignore_errors=True)
