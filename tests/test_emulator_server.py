"""The emulator as a process (`python -m together_async.emulator`): its command line, and a
SIGKILL in the middle of a job followed by a restart on the same data dir, losing nothing."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_file

from together_async.emulator import FaultKind, add_arguments
from together_async.emulator.server import faults_from_args

pytestmark = pytest.mark.timeout(120)

_READY = re.compile(rb"base_url=(\S+)")


class EmulatorProcess:
    """`python -m together_async.emulator` in a child process, on free ports."""

    def __init__(self, process: asyncio.subprocess.Process, base_url: str, log: BinaryIO) -> None:
        self.process = process
        self.base_url = base_url
        self._log = log

    @classmethod
    async def start(cls, data_dir: Path, *options: str) -> EmulatorProcess:
        """Start it and wait for its ready line."""
        log = await asyncio.to_thread(open, data_dir.parent / f"{data_dir.name}.log", "ab")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "together_async.emulator",
            "--port", "0",
            "--data-dir", str(data_dir),
            "--api-key", EMULATOR_KEY,
            *options,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )  # fmt: skip
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        match = _READY.search(line)
        assert match is not None, line
        return cls(process, match.group(1).decode(), log)

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the child."""
        self.process.send_signal(signal.SIGKILL)
        await self._reap()

    async def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self._reap()

    async def _reap(self) -> int:
        await asyncio.wait_for(self.process.communicate(), timeout=30)
        await asyncio.to_thread(self._log.close)
        assert self.process.returncode is not None
        return self.process.returncode


@pytest.fixture
async def processes() -> AsyncIterator[list[EmulatorProcess]]:
    """Emulator processes the test starts; any still running are stopped at teardown."""
    started: list[EmulatorProcess] = []
    yield started
    for process in started:
        if process.process.returncode is None:
            await process.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare session carrying the emulator test key."""
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as client_session:
        yield client_session


async def test_process_serves_and_stops_on_sigterm(
    tmp_path: Path, processes: list[EmulatorProcess], session: aiohttp.ClientSession
) -> None:
    """The module runs the server, prints its base_url, and exits 0 on SIGTERM."""
    process = await EmulatorProcess.start(tmp_path / "data")
    processes.append(process)
    api = RawAPI(session, process.base_url)
    done = await api.wait_for((await api.submit(chat_file(5)))["id"])
    assert done["status"] == "COMPLETED"
    assert await process.stop() == 0


async def test_sigkill_mid_job_loses_nothing_and_the_job_carries_on(
    tmp_path: Path, processes: list[EmulatorProcess], session: aiohttp.ClientSession
) -> None:
    """Kill -9 mid-job, restart on the same data dir: every uploaded file is intact, progress
    never goes back (finished rows were kept), and the job completes with each row exactly once."""
    data_dir = tmp_path / "data"
    options = ("--latency", "0.004", "--concurrency", "4")
    first = await EmulatorProcess.start(data_dir, *options)
    processes.append(first)
    api = RawAPI(session, first.base_url)
    other = chat_file(100, prefix="other")
    other_id = (await api.upload(other))["id"]
    rows = 1500
    job = await api.submit(chat_file(rows))
    while (seen := await api.json("GET", f"/batches/{job['id']}"))["progress"] < 20:
        assert seen["status"] in ("VALIDATING", "IN_PROGRESS")
    progress_before_kill = seen["progress"]
    await first.kill()

    second = await EmulatorProcess.start(data_dir, *options)
    processes.append(second)
    api = RawAPI(session, second.base_url)
    resumed = await api.json("GET", f"/batches/{job['id']}")
    assert resumed["status"] in ("IN_PROGRESS", "COMPLETED")
    assert resumed["progress"] >= progress_before_kill
    files = {item["id"] for item in (await api.json("GET", "/files"))["data"]}
    assert {other_id, job["input_file_id"]} <= files
    assert hashlib.sha256(await api.content(other_id)).digest() == hashlib.sha256(other).digest()
    assert await api.content(job["input_file_id"]) == chat_file(rows)

    done = await api.wait_for(job["id"], timeout=60)
    assert done["status"] == "COMPLETED"
    custom_ids = [row["custom_id"] for row in await api.rows(done["output_file_id"])]
    assert len(custom_ids) == rows
    assert set(custom_ids) == {f"request-{i}" for i in range(rows)}
    assert "error_file_id" not in done


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_listen_on_loopback() -> None:
    """With no options: 127.0.0.1:8788, echo engine, no faults."""
    args = _parse()
    assert (args.host, args.port, args.engine) == ("127.0.0.1", 8788, "echo")
    assert faults_from_args(args) == []


def test_fault_flags_become_faults() -> None:
    """--fault-* options build the matching Fault objects, limited to the given routes."""
    args = _parse(
        "--fault-error-rate", "0.1",
        "--fault-rate-limit-rate", "0.2",
        "--fault-retry-after", "3",
        "--fault-reset-rate", "0.05",
        "--fault-after-effect",
        "--fault-route", "POST /batches",
    )  # fmt: skip
    faults: dict[FaultKind, Any] = {fault.kind: fault for fault in faults_from_args(args)}
    assert set(faults) == {FaultKind.ERROR, FaultKind.RATE_LIMIT, FaultKind.RESET}
    assert faults[FaultKind.RATE_LIMIT].retry_after == 3
    assert faults[FaultKind.ERROR].after_effect is True
    assert all(fault.routes == ("POST /batches",) for fault in faults.values())
