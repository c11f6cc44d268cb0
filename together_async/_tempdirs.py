"""Temporary directories named for the process that owns them, and the sweep of dead ones.

A run without a state file (gather_batches) and an Emulator without a data directory work in a
temporary directory that they remove when they end. A process killed with SIGKILL cannot, so
each name carries its owner's pid (`<prefix>-<pid>-<random>`) and making a new one removes those
of the same prefix, in the same temporary root, whose pid is gone. Blocking: call
make_owned_temp_dir in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["make_owned_temp_dir", "remove_dead_temp_dirs"]

logger = logging.getLogger("together_async.tempdirs")


def make_owned_temp_dir(prefix: str) -> Path:
    """Make `<tmp>/<prefix>-<pid>-XXXXXXXX`, first removing those of dead processes."""
    root = tempfile.gettempdir()
    remove_dead_temp_dirs(root, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))


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
        if pid == os.getpid() or _maybe_alive(pid):
            continue
        path = Path(entry.path)
        # rmtree refuses a symlink (swapped in since the check) and removes nothing through it.
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            logger.info("could not remove %s, left by a process that is gone", path)
        else:
            logger.debug("removed %s, left by process %d that is gone", path, pid)
            removed.append(path)
    return removed


def _maybe_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # PermissionError: someone else's live process; anything else: unknowable
    return True
