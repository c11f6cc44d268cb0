"""The temporary directories of a gather without state_path and of an Emulator without
data_dir carry their owner's pid; making one removes those that a killed process left (dead
pid), and nothing else: a live pid's, another prefix's, a symlink, a plain file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from together_async import AsyncTogether, gather_batches
from together_async._tempdirs import remove_dead_temp_dirs
from together_async.emulator import Emulator

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.name != "posix", reason="pid liveness is probed with os.kill"),
]

FAST = {"poll_interval": 0.02, "max_interval": 0.1}

# Streams a gather without state_path against an Emulator without data_dir, prints a marker
# once a first shard's results are in (both temp dirs exist and hold files), then waits to be
# killed.
KILLED_RUN = """
import anyio
from together_async import AsyncTogether, stream_batches
from together_async.emulator import Emulator

async def main() -> None:
    async with Emulator() as emulator, AsyncTogether(
        base_url=emulator.base_url, api_key=emulator.api_key
    ) as client:
        rows = [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(6)]
        stream = stream_batches(
            client, rows, model="m", max_requests_per_batch=2, poll_interval=0.02,
            max_interval=0.1,
        )
        async for _ in stream:
            print("first results", flush=True)
            await anyio.sleep_forever()

anyio.run(main)
"""


def a_dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def bodies(count: int) -> list[dict[str, Any]]:
    """Chat bodies without a model."""
    return [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(count)]


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory that tempfile uses as its root for the test."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def leftover(root: Path, name: str) -> Path:
    """A directory `name` in `root` holding a file, as a killed run leaves it."""
    directory = root / name
    directory.mkdir()
    (directory / "state.sqlite").write_bytes(b"x" * 1000)
    return directory


def owned_by(root: Path, prefix: str, pid: int) -> list[str]:
    """Names in `root` of directories with `prefix` made by process `pid`."""
    return sorted(name for name in os.listdir(root) if name.startswith(f"{prefix}-{pid}-"))


async def test_a_gather_without_state_removes_a_dead_processs_temp_dir(
    client: AsyncTogether, temp_root: Path
) -> None:
    """A gather without state_path removes the together-<pid>- directory of a dead pid."""
    dead = leftover(temp_root, f"together-{a_dead_pid()}-abcd1234")
    assert len(await gather_batches(client, bodies(2), model="m", **FAST)) == 2
    assert not dead.exists()


async def test_a_gather_keeps_temp_dirs_that_are_not_a_dead_processs(
    client: AsyncTogether, temp_root: Path
) -> None:
    """A live pid's directory, other names, another prefix's, a symlink and a file with the
    prefix all stay; the gather's own directory is gone once it returns."""
    dead_pid = a_dead_pid()
    elsewhere = leftover(temp_root.parent, "target")
    kept = [
        leftover(temp_root, f"together-{os.getpid()}-live0001"),
        leftover(temp_root, "together-foo"),
        leftover(temp_root, f"together-{dead_pid}x-abcd1234"),
        leftover(temp_root, f"together-{dead_pid}-"),
        leftover(temp_root, f"together-emulator-{dead_pid}-abcd1234"),
        leftover(temp_root, f"together-upload-{dead_pid}-abcd1234"),
    ]
    link = temp_root / f"together-{dead_pid}-link0001"
    link.symlink_to(elsewhere, target_is_directory=True)
    plain = temp_root / f"together-{dead_pid}-file0001"
    plain.write_text("x")
    before = sorted(os.listdir(temp_root))
    assert len(await gather_batches(client, bodies(2), model="m", **FAST)) == 2
    assert sorted(os.listdir(temp_root)) == before
    assert all((path / "state.sqlite").exists() for path in kept)
    assert link.is_symlink() and (elsewhere / "state.sqlite").exists()
    assert plain.read_text() == "x"


async def test_an_emulator_without_data_dir_removes_a_dead_processs_temp_dir(
    temp_root: Path,
) -> None:
    """Starting an Emulator without data_dir removes the together-emulator-<pid>- directory
    of a dead pid and keeps a live pid's; its own is named for this process."""
    dead = leftover(temp_root, f"together-emulator-{a_dead_pid()}-abcd1234")
    live = leftover(temp_root, f"together-emulator-{os.getpid()}-live0001")
    async with Emulator():
        assert not dead.exists()
        assert live.exists()
        assert len(owned_by(temp_root, "together-emulator", os.getpid())) == 2
    assert owned_by(temp_root, "together-emulator", os.getpid()) == [live.name]


def test_another_users_process_counts_as_alive(
    temp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pid that os.kill may not signal (PermissionError) is alive: its directory stays."""

    def refuse(pid: int, signal: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    kept = leftover(temp_root, "together-12345-abcd1234")
    monkeypatch.setattr(os, "kill", refuse)
    assert remove_dead_temp_dirs(temp_root, "together") == []
    assert kept.exists()


async def test_a_killed_runs_temp_dirs_are_removed_by_the_next_run(
    client: AsyncTogether, temp_root: Path
) -> None:
    """A gather without state killed with SIGKILL mid-run leaves its gather and emulator
    directories; the next gather and Emulator in the same TMPDIR remove them."""
    environment = {**os.environ, "TMPDIR": str(temp_root)}
    async with await anyio.open_process(
        [sys.executable, "-c", KILLED_RUN], env=environment, stderr=subprocess.DEVNULL
    ) as process:
        assert process.stdout is not None
        seen = b""
        async for chunk in process.stdout:
            seen += chunk
            if b"first results\n" in seen:
                break
        assert b"first results\n" in seen, "the run ended before its first results"
        process.kill()
        assert await process.wait() == -9
    child = process.pid
    assert len(owned_by(temp_root, "together", child)) == 1
    assert len(owned_by(temp_root, "together-emulator", child)) == 1
    assert len(await gather_batches(client, bodies(2), model="m", **FAST)) == 2
    assert owned_by(temp_root, "together", child) == []
    async with Emulator():
        pass
    assert os.listdir(temp_root) == []


def test_a_locked_directory_is_kept_whatever_its_pid_says(tmp_path: Path) -> None:
    """A directory whose name has a dead pid but whose lock a live process holds (its owner
    in another PID namespace sharing /tmp) is kept; once the lock is let go it is removed."""
    leftover = tmp_path / f"together-{a_dead_pid()}-abc123"
    leftover.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(leftover / ".owner.lock"),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert remove_dead_temp_dirs(tmp_path, "together") == []
        assert leftover.is_dir()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()  # type: ignore[union-attr]
    assert remove_dead_temp_dirs(tmp_path, "together") == [leftover]


def test_an_owned_directory_is_locked_until_removed(tmp_path: Path, monkeypatch: Any) -> None:
    """make_owned_temp_dir holds the lock; remove_owned_temp_dir removes and lets go."""
    from together_async._tempdirs import (
        _locked_by_another,
        make_owned_temp_dir,
        remove_owned_temp_dir,
    )

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = make_owned_temp_dir("together")
    probe = subprocess.run(
        [
            sys.executable, "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError: print('held')\nelse: print('free')",
            str(made / ".owner.lock"),
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.stdout.strip() == "held"
    remove_owned_temp_dir(made)
    assert not made.exists() and not _locked_by_another(made)
