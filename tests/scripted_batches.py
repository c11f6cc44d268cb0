"""A scripted in-memory stand-in for `client.batches`, and a virtual clock, for the watch tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from together_async import (
    BatchJob,
    BatchJobStatus,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)

FAST = {"poll_interval": 0.001, "max_interval": 0.004}


def job(batch_id: str, status: str, progress: float | None = None) -> BatchJob:
    """A job as polled; a COMPLETED one has an output file, as the API gives it."""
    output = f"file-out-{batch_id}" if status == "COMPLETED" else None
    return BatchJob(
        id=batch_id, status=BatchJobStatus(status), progress=progress, output_file_id=output
    )


def server_error(status: int = 503, retry_after: float | None = None) -> Exception:
    cls = RateLimitError if status == 429 else InternalServerError
    return cls("injected", status_code=status, retry_after=retry_after)


class ScriptedBatches:
    """Each poll of a job returns the next entry of its script (the last one repeats).

    An exception in a script is raised by that poll. `list_failures` are raised by the next
    list calls, and ids in `unlisted` never appear in the list.
    """

    def __init__(self, scripts: dict[str, list[BatchJob | Exception]]) -> None:
        self.scripts = {batch_id: list(steps) for batch_id, steps in scripts.items()}
        self.calls: list[tuple[str, str | None, int | None]] = []
        self.list_failures: list[Exception] = []
        self.unlisted: set[str] = set()
        self.in_flight = 0
        self.most_in_flight = 0

    def _step(self, batch_id: str) -> BatchJob | Exception:
        steps = self.scripts[batch_id]
        return steps.pop(0) if len(steps) > 1 else steps[0]

    async def get_batch(self, batch_id: str, /, *, max_retries: int | None = None) -> BatchJob:
        self.calls.append(("get", batch_id, max_retries))
        if batch_id not in self.scripts:
            raise NotFoundError("no such batch", status_code=404)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
        finally:
            self.in_flight -= 1
        step = self._step(batch_id)
        if isinstance(step, Exception):
            raise step
        return step

    async def list_batches(self, *, max_retries: int | None = None) -> Sequence[BatchJob]:
        self.calls.append(("list", None, max_retries))
        await anyio.lowlevel.checkpoint()
        if self.list_failures:
            raise self.list_failures.pop(0)
        listed = []
        for batch_id in self.scripts:
            if batch_id in self.unlisted:
                continue
            step = self._step(batch_id)
            if isinstance(step, Exception):
                raise step
            listed.append(step)
        return listed

    def count(self, kind: str) -> int:
        return sum(1 for call in self.calls if call[0] == kind)


class VirtualClock:
    """Replaces anyio.sleep/current_time so waits are recorded exactly and cost nothing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def current_time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(round(delay, 6))
        self.now += delay
        await anyio.lowlevel.checkpoint()


def install_virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """Swap anyio.sleep/current_time for a VirtualClock for the rest of the test."""
    virtual = VirtualClock()
    monkeypatch.setattr(anyio, "sleep", virtual.sleep)
    monkeypatch.setattr(anyio, "current_time", virtual.current_time)
    return virtual


async def collect(stream: Any) -> list[BatchJob]:
    return [item async for item in stream]
