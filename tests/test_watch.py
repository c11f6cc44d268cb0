"""The status stream, wait and the many-jobs watcher against the emulator over loopback HTTP."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest
from emulator_helpers import chat_file, chat_line, jsonl

from together_async import (
    AsyncTogether,
    BatchJob,
    BatchWatcher,
    InternalServerError,
    NotFoundError,
    StatusPollError,
    WaitTimeoutError,
)
from together_async.emulator import Emulator
from together_async.emulator.faults import Fault

CHAT = "/v1/chat/completions"
FAST = {"poll_interval": 0.01, "max_interval": 0.02}
GET_JOB = ("GET", "/batches/{id}")
LIST_JOBS = ("GET", "/batches")
MakeEmulator = Callable[..., Awaitable[Emulator]]


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Emulator], AsyncTogether]]:
    """`connect(emulator)`: an AsyncTogether for that emulator, closed at teardown."""
    clients: list[AsyncTogether] = []

    def make(emulator: Emulator) -> AsyncTogether:
        client = AsyncTogether(base_url=emulator.base_url, api_key=emulator.api_key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def submit(client: AsyncTogether, data: bytes) -> BatchJob:
    """Upload `data` (unchecked, so invalid files reach the server) and start a job on it."""
    uploaded = await client.files.upload(data, check=False)
    return await client.batches.create_batch(uploaded.id, CHAT)


def statuses(jobs: Sequence[BatchJob]) -> list[str]:
    """The statuses seen, with repeats (progress-only updates) folded."""
    folded: list[str] = []
    for job in jobs:
        if not folded or folded[-1] != str(job.status):
            folded.append(str(job.status))
    return folded


# Where a task left behind by the client side would be running.
CLIENT_CODE = (
    "together_async/watch.py",
    "together_async/batches.py",
    "together_async/_client.py",
    "together_async/_transport.py",
    "aiohttp/client",
    "aiohttp/connector",
)


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """The source files of every coroutine in the chain a task is suspended in."""
    files: list[str] = []
    awaitable: Any = task.get_coro()
    while awaitable is not None:
        code = getattr(awaitable, "cr_code", None) or getattr(awaitable, "gi_code", None)
        if code is None:
            break
        files.append(code.co_filename)
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    return files


def client_side_tasks() -> set[asyncio.Task[Any]]:
    """Tasks (other than the test's own) running client code; the emulator's work is ignored."""
    current = asyncio.current_task()
    return {
        task
        for task in asyncio.all_tasks()
        if task is not current
        and any(part in file for file in _await_chain(task) for part in CLIENT_CODE)
    }


async def wait_until(condition: Callable[[], bool], *, limit: float = 10.0) -> None:
    """Check `condition` every few milliseconds until it holds; fail after `limit` seconds."""
    with anyio.fail_after(limit):
        # A plain counter in the emulator: there is no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --- one job ----------------------------------------------------------------------------------


async def test_statuses_are_observed_in_order_with_progress(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """VALIDATING -> IN_PROGRESS (progress rising) -> COMPLETED, and the stream then ends."""
    emulator = await make_emulator(validation_delay=0.3, latency=0.01, concurrency=1)
    client = connect(emulator)
    job = await submit(client, chat_file(40))
    seen = [j async for j in client.batches.stream_status(job.id, **FAST)]
    assert statuses(seen) == ["VALIDATING", "IN_PROGRESS", "COMPLETED"]
    running = [j.progress for j in seen if j.status == "IN_PROGRESS"]
    assert any(p is not None and 0 < p < 100 for p in running)
    assert running == sorted(running)
    assert seen[-1].progress == 100
    polls = emulator.stats[GET_JOB]
    assert polls >= len(seen)
    assert emulator.stats[LIST_JOBS] == 0


async def test_completed_ends_the_stream(emulator: Emulator, client: AsyncTogether) -> None:
    """A job that completes ends the stream on COMPLETED."""
    job = await submit(client, chat_file(3))
    seen = [j async for j in client.batches.stream_status(job.id, **FAST)]
    assert seen[-1].status == "COMPLETED" and seen[-1].output_file_id


async def test_failed_ends_the_stream(client: AsyncTogether) -> None:
    """A job that fails validation ends the stream on FAILED, with the server's error."""
    bad = jsonl([chat_line("a"), {**chat_line("b"), "url": "/v1/embeddings"}])
    job = await submit(client, bad)
    seen = [j async for j in client.batches.stream_status(job.id, **FAST)]
    assert seen[-1].status == "FAILED" and seen[-1].error


async def test_cancelled_ends_the_stream(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """A job cancelled while we watch ends the stream on CANCELLED."""
    client = connect(await make_emulator(validation_delay=30))
    job = await submit(client, chat_file(3))
    seen: list[BatchJob] = []
    async for update in client.batches.stream_status(job.id, **FAST):
        seen.append(update)
        if update.status == "VALIDATING":
            await client.batches.cancel_batch(job.id)
    assert statuses(seen) == ["VALIDATING", "CANCELLED"]


async def test_expired_ends_the_stream(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """A job that runs past its (time-scaled) window ends the stream on EXPIRED."""
    # "24h" * 1e-5 = 0.86 s, while 400 rows at 4 x 10 ms take about a second.
    emulator = await make_emulator(latency=0.01, concurrency=4, time_factor=1e-5)
    client = connect(emulator)
    job = await submit(client, chat_file(400))
    seen = [j async for j in client.batches.stream_status(job.id, **FAST)]
    assert seen[-1].status == "EXPIRED"
    assert seen[-1].progress is not None and 0 < seen[-1].progress < 100


async def test_stream_rides_through_injected_5xx_429_and_resets(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """Polls failing with 500/503, 429 and dropped connections neither end nor break the stream."""
    emulator = await make_emulator(validation_delay=0.2, latency=0.01, concurrency=1, seed=7)
    client = connect(emulator)
    job = await submit(client, chat_file(30))
    route = ("GET /batches/{id}",)
    emulator.faults.add(Fault(kind="error", rate=0.25, routes=route))
    emulator.faults.add(Fault(kind="rate_limit", rate=0.2, routes=route, retry_after=0.02))
    emulator.faults.add(Fault(kind="reset", rate=0.2, routes=route))
    seen = [j async for j in client.batches.stream_status(job.id, **FAST)]
    assert statuses(seen) == ["VALIDATING", "IN_PROGRESS", "COMPLETED"]
    kinds = {kind for (_, _, kind), n in emulator.stats.faults_injected.items() if n}
    assert kinds == {"error", "rate_limit", "reset"}


async def test_a_long_run_of_failed_polls_raises(emulator: Emulator, client: AsyncTogether) -> None:
    """Every poll failing: StatusPollError after max_consecutive_failures, the 5xx chained."""
    job = await submit(client, chat_file(1))
    emulator.faults.add(Fault(kind="error", routes=("GET /batches/{id}",)))
    emulator.stats.reset()
    stream = client.batches.stream_status(job.id, max_consecutive_failures=4, **FAST)
    with pytest.raises(StatusPollError) as caught:
        async for _ in stream:
            pass
    assert isinstance(caught.value.__cause__, InternalServerError)
    assert emulator.stats[GET_JOB] == 4


async def test_unknown_job_raises_not_found_at_once(
    emulator: Emulator, client: AsyncTogether
) -> None:
    """A 404 is raised by the first poll, not retried."""
    with pytest.raises(NotFoundError):
        async for _ in client.batches.stream_status("batch-does-not-exist", **FAST):
            pass
    assert emulator.stats[GET_JOB] == 1


# --- leaving early ----------------------------------------------------------------------------


async def test_breaking_out_leaves_nothing_behind(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """Breaking out of the async for leaves no task, no polling and no warning."""
    emulator = await make_emulator(validation_delay=30)
    client = connect(emulator)
    job = await submit(client, chat_file(2))
    async for update in client.batches.stream_status(job.id, **FAST):
        assert update.status == "VALIDATING"
        break
    polls = emulator.stats[GET_JOB]
    gc.collect()
    assert client_side_tasks() == set()
    # The client is still healthy: one more call goes through on the same session.
    assert (await client.batches.get_batch(job.id)).status == "VALIDATING"
    assert emulator.stats[GET_JOB] == polls + 1


async def test_cancelling_the_consumer_mid_request_leaves_nothing_behind(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """Cancelling a task blocked inside a poll ends it cleanly: no stray task, client usable."""
    emulator = await make_emulator(validation_delay=30, shutdown_timeout=0.1)
    client = connect(emulator)
    job = await submit(client, chat_file(2))
    first_state = asyncio.Event()

    async def consume() -> None:
        async for _ in client.batches.stream_status(job.id, **FAST):
            first_state.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_state.wait(), 10)
    # The next poll hangs on the server for a second; cancel the consumer while it does.
    emulator.faults.add(Fault(kind="slow", delay=1.0, times=1, routes=("GET /batches/{id}",)))
    polls = emulator.stats[GET_JOB]
    await wait_until(lambda: emulator.stats[GET_JOB] > polls)
    assert client_side_tasks() == {task}  # the consumer, stuck in the poll
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gc.collect()
    assert client_side_tasks() == set()
    assert (await client.batches.get_batch(job.id)).status == "VALIDATING"


# --- wait -------------------------------------------------------------------------------------


async def test_wait_returns_the_finished_job(client: AsyncTogether) -> None:
    """client.batches.wait returns the terminal job."""
    job = await submit(client, chat_file(5))
    finished = await client.batches.wait(job.id, timeout=30, **FAST)
    assert finished.status == "COMPLETED" and finished.id == job.id


async def test_wait_timeout_leaves_the_job_running(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """Past its timeout wait raises WaitTimeoutError; the job is not cancelled and runs on."""
    emulator = await make_emulator(validation_delay=30)
    client = connect(emulator)
    job = await submit(client, chat_file(2))
    with pytest.raises(WaitTimeoutError) as caught:
        await client.batches.wait(job.id, timeout=0.2, **FAST)
    assert caught.value.batch_id == job.id
    assert caught.value.last_job is not None and caught.value.last_job.status == "VALIDATING"
    assert emulator.stats["POST", "/batches/{id}/cancel"] == 0
    assert (await client.batches.get_batch(job.id)).status == "VALIDATING"


# --- many jobs --------------------------------------------------------------------------------


class CallLog:
    """Wraps `client.batches`, noting which tick of `watcher` each poll belongs to."""

    def __init__(self, batches: Any) -> None:
        self._batches = batches
        self.watcher: BatchWatcher | None = None
        self.ticks: Counter[int] = Counter()

    def _note(self) -> None:
        assert self.watcher is not None
        self.ticks[self.watcher.ticks] += 1

    async def get_batch(self, batch_id: str, /, *, max_retries: int | None = None) -> BatchJob:
        self._note()
        job: BatchJob = await self._batches.get_batch(batch_id, max_retries=max_retries)
        return job

    async def list_batches(self, *, max_retries: int | None = None) -> Sequence[BatchJob]:
        self._note()
        jobs: list[BatchJob] = await self._batches.list_batches(max_retries=max_retries)
        return jobs


async def test_two_hundred_jobs_cost_at_most_two_requests_per_tick(
    make_emulator: MakeEmulator, connect: Callable[[Emulator], AsyncTogether]
) -> None:
    """200 jobs watched together: every status change seen, at most 2 requests per tick."""
    # Each state lasts about a second, far longer than a tick, so every state can be seen.
    emulator = await make_emulator(validation_delay=1.0, latency=0.5, concurrency=1)
    client = connect(emulator)
    uploaded = await client.files.upload(chat_file(2), check=False)
    calls = CallLog(client.batches)
    watcher = BatchWatcher(calls, open_ended=True, poll_interval=0.02, max_interval=0.05)
    calls.watcher = watcher
    seen: dict[str, list[BatchJob]] = {}

    async def create_all() -> None:
        limiter = anyio.CapacityLimiter(16)

        async def create_one() -> None:
            async with limiter:
                job = await client.batches.create_batch(uploaded.id, CHAT)
            watcher.add(job.id)

        async with anyio.create_task_group() as group:
            for _ in range(200):
                group.start_soon(create_one)
        watcher.seal()

    emulator.stats.reset()
    async with anyio.create_task_group() as group:
        group.start_soon(create_all)
        async for update in watcher:
            seen.setdefault(update.id, []).append(update)

    assert len(seen) == 200
    assert all(
        statuses(jobs) == ["VALIDATING", "IN_PROGRESS", "COMPLETED"] for jobs in seen.values()
    )
    assert max(calls.ticks.values()) <= 2
    assert len(calls.ticks) == watcher.ticks
    # The emulator saw exactly the polls logged (creates aside): nothing went around the log.
    assert emulator.stats[LIST_JOBS] + emulator.stats[GET_JOB] == sum(calls.ticks.values())


async def test_stream_statuses_rides_through_list_failures(
    emulator: Emulator, client: AsyncTogether
) -> None:
    """client.batches.stream_statuses survives failed list calls and ends when all finish."""
    jobs = [await submit(client, chat_file(2, prefix=f"job{i}")) for i in range(5)]
    route = ("GET /batches",)
    emulator.faults.add(Fault(kind="reset", rate=0.3, routes=route))
    emulator.faults.add(Fault(kind="error", rate=0.3, routes=route))
    ids = [job.id for job in jobs]
    finished = {
        update.id: update
        async for update in client.batches.stream_statuses(ids, **FAST)
        if update.is_terminal
    }
    assert sorted(finished) == sorted(ids)
    assert all(job.status == "COMPLETED" for job in finished.values())
