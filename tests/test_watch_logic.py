"""watch.py against a scripted in-memory `batches`: the schedule, merging and failure handling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from scripted_batches import (
    FAST,
    ScriptedBatches,
    VirtualClock,
    collect,
    install_virtual_clock,
    job,
    server_error,
)

from together_async import (
    APIConnectionError,
    APITimeoutError,
    BatchJob,
    InternalServerError,
    InvalidArgumentError,
    NotFoundError,
    StatusPollError,
    WaitTimeoutError,
)
from together_async.watch import (
    BatchWatcher,
    PollSchedule,
    is_transient,
    stream_status,
    stream_statuses,
    wait,
)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    return install_virtual_clock(monkeypatch)


# --- PollSchedule (pure) -------------------------------------------------------------------


def test_schedule_grows_to_max_interval() -> None:
    """Quiet polls grow the interval by `backoff` until it reaches `max_interval`."""
    schedule = PollSchedule(poll_interval=2, max_interval=30, backoff=1.5)
    delays, delay = [], None
    for _ in range(9):
        delay = schedule.after_success(delay, status_changed=False)
        delays.append(delay)
    assert delays == [2, 3, 4.5, 6.75, 10.125, 15.1875, 22.78125, 30, 30]


def test_schedule_status_change_resets_to_poll_interval() -> None:
    """A status change brings the interval back to `poll_interval`."""
    schedule = PollSchedule(poll_interval=2, max_interval=30, backoff=2)
    assert schedule.after_success(30, status_changed=True) == 2
    assert schedule.after_success(30, status_changed=False) == 30


def test_schedule_failure_honours_retry_after() -> None:
    """A failed poll waits at least the server's Retry-After, capped at ten minutes."""
    schedule = PollSchedule(poll_interval=1, max_interval=10, backoff=2)
    assert schedule.after_failure(1, retry_after=None) == 2
    assert schedule.after_failure(1, retry_after=7) == 7
    assert schedule.after_failure(8, retry_after=3) == 10
    assert schedule.after_failure(8, retry_after=86_400) == 600


def test_default_schedule_settles_at_thirty_seconds() -> None:
    """The defaults start at 2 s and settle at 30 s, Together's advice for long jobs."""
    schedule = PollSchedule()
    delay = None
    for _ in range(20):
        delay = schedule.after_success(delay, status_changed=False)
    assert schedule.poll_interval == 2 and delay == 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poll_interval": 0},
        {"poll_interval": -1},
        {"poll_interval": float("nan")},
        {"max_interval": 1, "poll_interval": 2},
        {"backoff": 0.5},
        {"max_consecutive_failures": 0},
        {"max_consecutive_failures": 2.5},
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    """Nonsense schedules are refused with InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError):
        PollSchedule(**kwargs)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (server_error(500), True),
        (server_error(503), True),
        (server_error(429), True),
        (APIConnectionError("reset"), True),
        (APITimeoutError("slow"), True),
        (NotFoundError("gone", status_code=404), False),
        (InternalServerError("x", status_code=401), False),
        (ValueError("bug"), False),
    ],
)
def test_is_transient(error: Exception, transient: bool) -> None:
    """5xx, 429, resets and timeouts are retried; 4xx and programming errors are not."""
    assert is_transient(error) is transient


# --- one job ----------------------------------------------------------------------------------


async def test_stream_yields_changes_in_order_and_ends_after_terminal() -> None:
    """The first state, then only changes of status or progress, ending with the terminal one."""
    batches = ScriptedBatches(
        {
            "b1": [
                job("b1", "VALIDATING"),
                job("b1", "VALIDATING"),
                job("b1", "IN_PROGRESS", 0),
                job("b1", "IN_PROGRESS", 40),
                job("b1", "IN_PROGRESS", 40),
                job("b1", "IN_PROGRESS", 90),
                job("b1", "COMPLETED", 100),
            ]
        }
    )
    seen = await collect(stream_status(batches, "b1", **FAST))
    assert [(j.status, j.progress) for j in seen] == [
        ("VALIDATING", None),
        ("IN_PROGRESS", 0),
        ("IN_PROGRESS", 40),
        ("IN_PROGRESS", 90),
        ("COMPLETED", 100),
    ]
    assert batches.count("get") == 7


@pytest.mark.parametrize("terminal", ["COMPLETED", "FAILED", "CANCELLED", "EXPIRED"])
async def test_every_terminal_status_ends_the_stream(terminal: str) -> None:
    """COMPLETED, FAILED, CANCELLED and EXPIRED each end the stream, and no poll follows."""
    batches = ScriptedBatches({"b1": [job("b1", "IN_PROGRESS", 5), job("b1", terminal)]})
    seen = await collect(stream_status(batches, "b1", **FAST))
    assert [str(j.status) for j in seen] == ["IN_PROGRESS", terminal]
    assert batches.count("get") == 2


async def test_unknown_and_canceling_statuses_do_not_end_the_stream() -> None:
    """A status the library has never heard of, or CANCELING, is followed like any other."""
    batches = ScriptedBatches(
        {"b1": [job("b1", "QUEUED_SOMEWHERE"), job("b1", "CANCELING"), job("b1", "CANCELLED")]}
    )
    seen = await collect(stream_status(batches, "b1", **FAST))
    assert [str(j.status) for j in seen] == ["QUEUED_SOMEWHERE", "CANCELING", "CANCELLED"]


async def test_polls_go_out_without_client_retries() -> None:
    """Every poll passes max_retries=0: the watcher does its own scheduling."""
    batches = ScriptedBatches({"b1": [job("b1", "IN_PROGRESS"), job("b1", "COMPLETED")]})
    await collect(stream_status(batches, "b1", **FAST))
    assert {call[2] for call in batches.calls} == {0}


async def test_stream_sleeps_on_the_schedule(clock: VirtualClock) -> None:
    """Quiet polls back off, a status change resets the interval, and progress alone does not."""
    batches = ScriptedBatches(
        {
            "b1": [
                job("b1", "VALIDATING"),
                job("b1", "VALIDATING"),
                job("b1", "VALIDATING"),
                job("b1", "IN_PROGRESS", 10),
                job("b1", "IN_PROGRESS", 20),
                job("b1", "IN_PROGRESS", 30),
                job("b1", "COMPLETED", 100),
            ]
        }
    )
    stream = stream_status(batches, "b1", poll_interval=1, max_interval=4, backoff=2)
    await collect(stream)
    assert clock.sleeps == [1, 2, 4, 1, 2, 4]


async def test_transient_failures_are_ridden_through(clock: VirtualClock) -> None:
    """5xx, 429, resets and timeouts on polls are retried and never end or break the stream."""
    batches = ScriptedBatches(
        {
            "b1": [
                job("b1", "IN_PROGRESS", 10),
                server_error(500),
                APIConnectionError("connection reset"),
                server_error(429, retry_after=5),
                APITimeoutError("timed out"),
                job("b1", "IN_PROGRESS", 60),
                job("b1", "COMPLETED", 100),
            ]
        }
    )
    stream = stream_status(batches, "b1", poll_interval=1, max_interval=4, backoff=2)
    seen = await collect(stream)
    assert [j.progress for j in seen] == [10, 60, 100]
    # 1 after the first state, 2 and 4 backing off, 5 from Retry-After, then capped at 4.
    assert clock.sleeps == [1, 2, 4, 5, 4, 4]


async def test_long_run_of_failures_raises_with_last_error_chained(clock: VirtualClock) -> None:
    """`max_consecutive_failures` failed polls in a row raise StatusPollError from the last one."""
    last = server_error(502)
    batches = ScriptedBatches(
        {"b1": [job("b1", "IN_PROGRESS"), server_error(500), APIConnectionError("reset"), last]}
    )
    stream = stream_status(batches, "b1", max_consecutive_failures=3, **FAST)
    assert (await stream.__anext__()).status == "IN_PROGRESS"
    with pytest.raises(StatusPollError) as caught:
        await stream.__anext__()
    assert caught.value.__cause__ is last
    assert caught.value.failures == 3
    assert caught.value.batch_ids == ("b1",)
    assert "b1" in str(caught.value)
    assert batches.count("get") == 4


async def test_a_success_resets_the_failure_count(clock: VirtualClock) -> None:
    """Failures separated by successful polls never add up to a give-up."""
    script: list[BatchJob | Exception] = []
    for step in range(6):
        script += [server_error(503), server_error(503), job("b1", "IN_PROGRESS", step)]
    script.append(job("b1", "COMPLETED"))
    batches = ScriptedBatches({"b1": script})
    seen = await collect(stream_status(batches, "b1", max_consecutive_failures=3, **FAST))
    assert seen[-1].status == "COMPLETED"


async def test_not_found_raises_at_once() -> None:
    """A 404 is not a transient failure: it raises on the first poll."""
    batches = ScriptedBatches({})
    with pytest.raises(NotFoundError):
        await collect(stream_status(batches, "nope", **FAST))
    assert batches.count("get") == 1


async def test_empty_id_is_rejected_before_any_request() -> None:
    """An empty or non-string id raises InvalidArgumentError and sends nothing."""
    batches = ScriptedBatches({})
    for bad in ["", "   ", None, 42]:
        with pytest.raises(InvalidArgumentError):
            stream_status(batches, bad, **FAST)  # type: ignore[arg-type]
    assert batches.calls == []


async def test_stream_ends_for_good_after_an_error() -> None:
    """After raising, the stream is over: the next step is StopAsyncIteration, not a new poll."""
    batches = ScriptedBatches({})
    stream = stream_status(batches, "nope", **FAST)
    with pytest.raises(NotFoundError):
        await stream.__anext__()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    assert batches.count("get") == 1


async def test_cancelled_consumer_leaves_no_task_behind() -> None:
    """Cancelling the task that iterates a stream leaves only the test's own task running."""
    batches = ScriptedBatches({"b1": [job("b1", "IN_PROGRESS")]})
    first_seen = asyncio.Event()

    async def consume() -> None:
        async for _ in stream_status(batches, "b1", poll_interval=5, max_interval=5):
            first_seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_seen.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- many jobs --------------------------------------------------------------------------------


def ladder(batch_id: str) -> list[BatchJob | Exception]:
    return [
        job(batch_id, "VALIDATING"),
        job(batch_id, "IN_PROGRESS", 50),
        job(batch_id, "COMPLETED", 100),
    ]


async def test_watcher_uses_one_list_call_per_tick() -> None:
    """Fifty jobs cost one list call per tick and no get_batch at all."""
    ids = [f"b{i}" for i in range(50)]
    batches = ScriptedBatches({batch_id: ladder(batch_id) for batch_id in ids})
    seen = await collect(stream_statuses(batches, ids, **FAST))
    assert batches.count("get") == 0
    assert batches.count("list") == 3
    assert len(seen) == 150
    for batch_id in ids:
        assert [str(j.status) for j in seen if j.id == batch_id] == [
            "VALIDATING",
            "IN_PROGRESS",
            "COMPLETED",
        ]


async def test_watcher_stops_polling_finished_jobs() -> None:
    """Once all but one job are done, the last one is polled with get_batch alone."""
    batches = ScriptedBatches(
        {
            "fast": [job("fast", "COMPLETED")],
            "slow": [
                job("slow", "IN_PROGRESS", 1),
                job("slow", "IN_PROGRESS", 2),
                job("slow", "COMPLETED"),
            ],
        }
    )
    seen = await collect(stream_statuses(batches, ["fast", "slow"], **FAST))
    assert [(j.id, str(j.status)) for j in seen][-1] == ("slow", "COMPLETED")
    assert [kind for kind, *_ in batches.calls] == ["list", "get", "get"]


async def test_ids_missing_from_the_list_fall_back_to_get_batch() -> None:
    """Ids the list does not return are fetched one by one, and only those."""
    ids = [f"b{i}" for i in range(6)]
    batches = ScriptedBatches({batch_id: ladder(batch_id) for batch_id in ids})
    batches.unlisted = {"b1", "b4"}
    seen = await collect(stream_statuses(batches, ids, **FAST))
    assert {c[1] for c in batches.calls if c[0] == "get"} == {"b1", "b4"}
    assert {j.id for j in seen if j.status == "COMPLETED"} == set(ids)


async def test_fallback_gets_have_bounded_concurrency() -> None:
    """At most `max_concurrent_gets` get_batch calls are in flight at once."""
    ids = [f"b{i}" for i in range(30)]
    batches = ScriptedBatches({batch_id: ladder(batch_id) for batch_id in ids})
    batches.unlisted = set(ids)
    await collect(stream_statuses(batches, ids, max_concurrent_gets=4, **FAST))
    assert batches.most_in_flight == 4


async def test_failed_list_call_is_retried_without_get_storm(clock: VirtualClock) -> None:
    """A failed list call backs off (Retry-After honoured) and is not replaced by N gets."""
    ids = [f"b{i}" for i in range(20)]
    batches = ScriptedBatches({batch_id: ladder(batch_id) for batch_id in ids})
    batches.list_failures = [server_error(503, retry_after=3), APIConnectionError("reset")]
    seen = await collect(stream_statuses(batches, ids, poll_interval=1, max_interval=8, backoff=2))
    assert batches.count("get") == 0
    assert batches.count("list") == 5
    assert clock.sleeps[:2] == [3, 6]
    assert len(seen) == 60


async def test_watcher_gives_up_after_a_long_run_of_failed_lists(clock: VirtualClock) -> None:
    """Failed list calls in a row raise StatusPollError naming the unfinished jobs."""
    batches = ScriptedBatches({"a": ladder("a"), "b": ladder("b")})
    batches.list_failures = [server_error(500)] * 5
    with pytest.raises(StatusPollError) as caught:
        await collect(stream_statuses(batches, ["a", "b"], max_consecutive_failures=5, **FAST))
    assert caught.value.batch_ids == ("a", "b")
    assert isinstance(caught.value.__cause__, InternalServerError)


async def test_fallback_404_raises_not_an_exception_group() -> None:
    """A job neither listed nor found raises NotFoundError itself."""
    batches = ScriptedBatches({"a": ladder("a"), "b": ladder("b")})
    with pytest.raises(NotFoundError):
        await collect(stream_statuses(batches, ["a", "b", "ghost", "ghost2"], **FAST))


async def test_open_ended_watcher_takes_ids_while_running() -> None:
    """Ids added during the watch are followed, and the watch ends only after seal()."""
    batches = ScriptedBatches({f"b{i}": ladder(f"b{i}") for i in range(3)})
    watcher = BatchWatcher(batches, ["b0"], open_ended=True, **FAST)
    finished: list[str] = []
    async for item in watcher:
        if item.is_terminal:
            finished.append(item.id)
            if item.id == "b0":
                watcher.add("b1")
                watcher.add("b2")
                watcher.add("b0")  # already watched: ignored
            elif len(finished) == 3:
                watcher.seal()
    assert finished == ["b0", "b1", "b2"]
    assert watcher.ids == ["b0", "b1", "b2"]
    assert watcher.unfinished == []


async def test_open_ended_watcher_waits_idle_for_ids() -> None:
    """An open-ended watcher with nothing to watch waits for add() without polling."""
    batches = ScriptedBatches({"late": [job("late", "COMPLETED")]})
    watcher = BatchWatcher(batches, open_ended=True, **FAST)

    async def producer() -> None:
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert batches.calls == []
        watcher.add("late")
        watcher.seal()

    async with anyio.create_task_group() as group:
        group.start_soon(producer)
        seen = await collect(watcher)
    assert [j.id for j in seen] == ["late"]


async def test_add_after_end_is_refused() -> None:
    """add() on a watcher that has ended raises instead of being silently ignored."""
    batches = ScriptedBatches({"a": [job("a", "COMPLETED")]})
    watcher = stream_statuses(batches, ["a"], **FAST)
    await collect(watcher)
    with pytest.raises(InvalidArgumentError):
        watcher.add("b")


async def test_a_single_string_is_not_taken_for_a_list_of_ids() -> None:
    """stream_statuses("abc") is an error, not a watch of "a", "b" and "c"."""
    with pytest.raises(InvalidArgumentError):
        stream_statuses(ScriptedBatches({}), "abc")


# --- wait -------------------------------------------------------------------------------------


async def test_wait_returns_the_terminal_job() -> None:
    """wait() returns the terminal state."""
    batches = ScriptedBatches({"b1": ladder("b1")})
    finished = await wait(batches, "b1", **FAST)
    assert finished.status == "COMPLETED"


async def test_wait_timeout_raises_with_last_job_and_cancels_nothing() -> None:
    """Past the timeout, WaitTimeoutError carries the last state; nothing but polls was sent."""
    batches = ScriptedBatches({"b1": [job("b1", "IN_PROGRESS", 30)]})
    with pytest.raises(WaitTimeoutError) as caught:
        await wait(batches, "b1", timeout=0.05, **FAST)
    assert caught.value.batch_id == "b1"
    assert caught.value.last_job is not None and caught.value.last_job.progress == 30
    assert isinstance(caught.value, TimeoutError)
    assert {kind for kind, *_ in batches.calls} == {"get"}
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_wait_rejects_a_bad_timeout() -> None:
    """A zero or negative timeout is refused before any request."""
    batches = ScriptedBatches({"b1": ladder("b1")})
    with pytest.raises(InvalidArgumentError):
        await wait(batches, "b1", timeout=0)
    assert batches.calls == []


# --- observers --------------------------------------------------------------------------------


class RecordingObserver:
    def __init__(self) -> None:
        self.jobs: list[BatchJob] = []
        self.closed = 0

    def update(self, job: BatchJob) -> None:
        self.jobs.append(job)

    def close(self) -> None:
        self.closed += 1


async def test_observer_sees_every_yield_and_is_closed_once() -> None:
    """A JobObserver gets each yielded state and one close() at the end."""
    observer = RecordingObserver()
    batches = ScriptedBatches({"b1": ladder("b1")})
    stream = stream_status(batches, "b1", progress=observer, **FAST)
    seen = await collect(stream)
    await stream.aclose()
    assert observer.jobs == seen
    assert observer.closed == 1


async def test_observer_is_closed_when_the_stream_fails() -> None:
    """A stream that raises closes its observer too."""
    observer = RecordingObserver()
    with pytest.raises(NotFoundError):
        await collect(stream_status(ScriptedBatches({}), "x", progress=observer, **FAST))
    assert observer.closed == 1


# --- logging ----------------------------------------------------------------------------------


async def test_failed_polls_are_logged_at_info_only(
    clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed poll is logged at INFO on together_async.watch with its error and next wait."""
    batches = ScriptedBatches(
        {"b1": [job("b1", "IN_PROGRESS"), server_error(503, retry_after=7), job("b1", "COMPLETED")]}
    )
    with caplog.at_level(logging.DEBUG, logger="together_async.watch"):
        await collect(stream_status(batches, "b1", **FAST))
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [(r.name, r.levelno) for r in failures] == [("together_async.watch", logging.INFO)]
    assert "InternalServerError" in failures[0].getMessage()
    assert "retrying in 7.0 s" in failures[0].getMessage()
    assert all(r.levelno < logging.WARNING for r in caplog.records)


async def test_watcher_matches_ids_the_list_spells_differently() -> None:
    """A list that spells an id in another case or with spaces still ends that job's watch,
    and the job comes out under the id it is watched by."""
    spelled = [job(" B1 ", "IN_PROGRESS", 50), job(" B1 ", "COMPLETED", 100)]
    batches = ScriptedBatches({"b1": spelled, "b2": ladder("b2")})
    seen = await collect(stream_statuses(batches, ["b1", "b2"], **FAST))
    assert {j.id for j in seen} == {"b1", "b2"}
    assert [str(j.status) for j in seen if j.id == "b1"][-1] == "COMPLETED"
    assert batches.count("get") <= 1  # b1 was matched in the list (only b2, alone, is got)


class ListWithoutFiles(ScriptedBatches):
    """A list whose entries leave out the result file ids, as a summary listing might."""

    async def list_batches(self, *, max_retries: int | None = None) -> Sequence[BatchJob]:
        listed = await super().list_batches(max_retries=max_retries)
        return [attrs.evolve(j, output_file_id=None, error_file_id=None) for j in listed]


async def test_a_completed_job_listed_without_files_is_read_again() -> None:
    """The terminal state yielded is the one get_batch gives, with its output file."""
    ids = ["b1", "b2"]
    batches = ListWithoutFiles({batch_id: ladder(batch_id) for batch_id in ids})
    seen = await collect(stream_statuses(batches, ids, **FAST))
    finals = [j for j in seen if j.is_terminal]
    assert sorted(j.id for j in finals) == ids
    assert all(j.output_file_id == f"file-out-{j.id}" for j in finals)
    assert batches.count("get") == 2
