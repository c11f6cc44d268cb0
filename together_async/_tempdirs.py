"""Temporary directories named for the process that owns them, and the sweep of dead ones.

A run without a state file (gather_batches) and an Emulator without a data directory work in a
temporary directory that they remove when they end. A process killed with SIGKILL cannot, so
each name carries its owner's pid (`<prefix>-<pid>-<random>`) and making a new one removes those
of the same prefix, in the same temporary root, whose pid is gone. The owner also holds an
exclusive lock on a file inside (released by the kernel when the process dies), and the sweep
leaves a directory whose lock it cannot take: a pid says nothing across PID namespaces that
share one /tmp (containers), a lock does. Blocking: call these in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the sweep is skipped there anyway
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "make_owned_temp_dir",
    "may_be_alive",
    "release_temp_dir",
    "remove_dead_temp_dirs",
    "remove_owned_temp_dir",
]

_LOCK_NAME = ".owner.lock"
# The lock files this process holds, by directory: closing one releases its lock.
_HELD: dict[Path, int] = {}

logger = logging.getLogger("together_async.tempdirs")


def make_owned_temp_dir(prefix: str) -> Path:
    """Make `<tmp>/<prefix>-<pid>-XXXXXXXX`, locked as this process's, first removing those
    of dead processes. Call `release_temp_dir` once it is removed."""
    root = tempfile.gettempdir()
    remove_dead_temp_dirs(root, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    if fcntl is not None:
        fd = os.open(path / _LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a file system without locks: the pid alone tells
        else:
            _HELD[path] = fd
    return path


def release_temp_dir(path: Path) -> None:
    """Let go of the lock on a directory made by `make_owned_temp_dir` (safe to call twice)."""
    fd = _HELD.pop(path, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_owned_temp_dir(path: Path) -> None:
    """Remove a directory made by `make_owned_temp_dir`, then let go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    release_temp_dir(path)


def _locked_by_another(path: Path) -> bool:
    """Whether a live process holds the directory's lock (its owner, in any PID namespace)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # made by a version without locks, or before it was locked: pid decides
    except OSError:
        return True  # cannot look: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_dead_temp_dirs(root: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove the `<prefix>-<pid>-*` directories in `root` whose process is gone.

    Kept: a live (or unknowable) pid's, another user's, symlinks and anything not a directory,
    and every name not exactly of that shape. Failures are logged, never raised: the sweep is
    housekeeping and must not stop the run that makes a new directory. Returns what was removed.
    """
    if os.name != "posix":
        # Elsewhere os.kill(pid, 0) is no liveness probe (on Windows it ends the process).
        return []
    pattern = re.compile(re.escape(prefix) + r"-([1-9][0-9]*)-[A-Za-z0-9_]+")
    removed: list[Path] = []
    me = os.getuid()
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        logger.debug("cannot list %s for leftover directories: %s", root, exc)
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != me:
                continue
        except OSError:
            continue
        pid = int(match.group(1))
        path = Path(entry.path)
        if pid == os.getpid() or may_be_alive(pid) or _locked_by_another(path):
            continue
        # rmtree refuses a symlink (swapped in since the check) and removes nothing through it.
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            logger.info("could not remove %s, left by a process that is gone", path)
        else:
            logger.debug("removed %s, left by process %d that is gone", path, pid)
            removed.append(path)
    return removed


def may_be_alive(pid: int) -> bool:
    """Whether process `pid` may be running: only a sure "no such process" says it is not
    (another user's live process, or one that cannot be asked about, counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # PermissionError: someone else's live process; anything else: unknowable
    return True
