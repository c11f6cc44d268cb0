"""Which job a lost create may have made (_reconcile), and who owns it: the rule and the claim
registry on their own, then create_batch, cancel_batch and gather against the emulator over
loopback HTTP, with connections cut after the server acted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from emulator_helpers import CHAT, chat_file
from test_cli import RUN_TIMEOUT, ServedEmulator, _clean_env, connection, write_requests

from together_async import (
    AsyncTogether,
    BadRequestError,
    BatchJob,
    BatchJobStatus,
    ClientConfig,
    InvalidArgumentError,
    TogetherError,
    gather_batches,
)
from together_async._reconcile import ClaimRegistry, CreateRequest, may_have_made, pick
from together_async.emulator import Emulator, Fault
from together_async.emulator.engines import Engine, EngineReply

pytestmark = pytest.mark.timeout(120)

MakeEmulator = Callable[..., Awaitable[Emulator]]
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
REQUEST = CreateRequest(
    input_file_id="file-1",
    endpoint=CHAT,
    completion_window="24h",
    model_id="m",
    priority=1,
)
CANCELLED = (BatchJobStatus.CANCELING, BatchJobStatus.CANCELLED)
FAST = {"poll_interval": 0.02, "max_interval": 0.1}


def made(**fields: Any) -> BatchJob:
    """A job on file-1 for CHAT, made at NOW, with `fields` on top."""
    values: dict[str, Any] = {
        "id": "b",
        "input_file_id": "file-1",
        "endpoint": CHAT,
        "created_at": NOW,
    }
    values.update(fields)
    return BatchJob(**values)


def fast_client(emulator: Emulator, **overrides: Any) -> AsyncTogether:
    """A client with many retries and waits of a few milliseconds."""
    settings: dict[str, Any] = {
        "api_key": emulator.api_key,
        "base_url": emulator.base_url,
        "max_retries": 12,
        "retry_wait_initial": 0.002,
        "retry_wait_max": 0.02,
        "retry_wait_jitter": 0.002,
    }
    settings.update(overrides)
    return AsyncTogether.from_config(ClientConfig(**settings))


class HangingEngine(Engine):
    """Never answers a row: a job stays in progress until it is cancelled."""

    async def respond(
        self, endpoint: str, body: Any, *, custom_id: str, created: int
    ) -> EngineReply:
        await asyncio.sleep(3600)  # cut short when the job is cancelled
        raise AssertionError("unreachable")


# --- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "ignored", "matches"),
    [
        (made(), frozenset(), True),
        (made(model_id="m", completion_window="24h", priority=1), frozenset(), True),
        (BatchJob(id="b", input_file_id="file-1"), frozenset(), True),  # says nothing: counts
        (made(input_file_id="file-2"), frozenset(), False),
        (made(), frozenset({"b"}), False),
        (made(endpoint="/v1/completions"), frozenset(), False),
        (made(model_id="other"), frozenset(), False),
        (made(completion_window="12h"), frozenset(), False),
        (made(priority=2), frozenset(), False),
        (made(created_at=NOW - timedelta(seconds=1)), frozenset(), False),
    ],
)
def test_job_a_lost_create_may_have_made(
    job: BatchJob, ignored: frozenset[str], matches: bool
) -> None:
    """Same file, endpoint, model, window and priority, made at or after the create, not
    ignored: a field the job leaves out counts as a match."""
    assert may_have_made(job, REQUEST, not_before=NOW, ignored=ignored) is matches


def test_settings_the_create_left_to_the_server_match_any_value() -> None:
    """A create that named no model or priority matches the job the server filled them in on."""
    request = CreateRequest(input_file_id="file-1", endpoint=CHAT)
    job = made(model_id="chosen", priority=7, completion_window="24h")
    assert may_have_made(job, request, not_before=NOW, ignored=frozenset())


def test_completion_windows_are_compared_as_the_server_may_spell_them() -> None:
    """ "24H" on the job is the "24h" the create asked for."""
    assert may_have_made(
        made(completion_window="24H"), REQUEST, not_before=NOW, ignored=frozenset()
    )


def test_the_oldest_candidate_is_picked() -> None:
    """Of several candidates the oldest wins; one without a date counts as oldest."""
    newer = made(id="new", created_at=NOW + timedelta(seconds=5))
    older = made(id="old")
    assert pick([newer, older], REQUEST) is older
    undated = made(id="undated", created_at=None)
    assert pick([older, undated], REQUEST) is undated
    assert pick([], REQUEST) is None


def test_an_exact_match_beats_an_older_guess() -> None:
    """A job saying exactly what was asked wins over an older one that left a field unsaid,
    and a request that left a field unsaid prefers the job that left it unsaid too."""
    exact = made(id="exact", model_id="m", completion_window="24h", priority=1)
    guess = made(id="guess", model_id="m", completion_window="24h", created_at=NOW - timedelta(1))
    assert pick([guess, exact], REQUEST) is exact
    unsaid = CreateRequest(input_file_id="file-1", endpoint=CHAT, model_id="m")
    plain = made(id="plain", model_id="m", created_at=NOW + timedelta(seconds=5))
    assert pick([exact, plain], unsaid) is plain


async def test_concurrent_lost_creates_with_different_settings_keep_their_own_jobs(
    make_emulator: MakeEmulator,
) -> None:
    """Concurrent creates on one file with priorities None, 0, 1, 2 and 20% resets after the
    job was made: each call ends with a job of its own settings, one job per call."""
    for seed in range(4):
        emulator = await make_emulator(
            seed=seed,
            faults=[Fault(kind="reset", rate=0.2, routes=("POST /batches",), after_effect=True)],
        )
        async with AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url) as client:
            uploaded = await client.files.upload(chat_file(1))
            asked = [i % 3 if i % 5 else None for i in range(40)]
            results = await asyncio.gather(
                *(
                    client.batches.create_batch(uploaded.id, CHAT, model_id="m", priority=priority)
                    for priority in asked
                ),
                return_exceptions=True,
            )
        jobs = [job for job in results if isinstance(job, BatchJob)]
        assert all(isinstance(r, (BatchJob, TogetherError)) for r in results)
        assert len({job.id for job in jobs}) == len(jobs)
        assert emulator.stats.jobs_created[uploaded.id] == len(jobs)
        pairs = zip(asked, results, strict=True)
        got = [(p, job.priority) for p, job in pairs if isinstance(job, BatchJob)]
        assert all(wanted == priority for wanted, priority in got), (seed, got)


# --- the claim registry -----------------------------------------------------------------


def test_a_claimed_job_is_never_adopted_again() -> None:
    """Two adoptions from the same listing get two different jobs, then none is left."""
    registry = ClaimRegistry(skew=300)
    now = datetime.now(timezone.utc)
    jobs = [made(id="one", created_at=now), made(id="two", created_at=now)]
    since = now - timedelta(seconds=1)
    first = registry.adopt(jobs, REQUEST, not_before=since, ignored=frozenset())
    second = registry.adopt(jobs, REQUEST, not_before=since, ignored=frozenset())
    assert first is not None and second is not None and first.id != second.id
    assert registry.adopt(jobs, REQUEST, not_before=since, ignored=frozenset()) is None


def test_claims_older_than_the_reconcile_window_are_dropped() -> None:
    """A claim on a job made before any call could still adopt it is forgotten."""
    registry = ClaimRegistry(skew=300)
    now = datetime.now(timezone.utc)
    registry.claim(made(id="old", created_at=now - timedelta(seconds=400)))
    registry.claim(made(id="new", created_at=now))
    assert not registry.is_claimed("old") and registry.is_claimed("new")


def test_claims_a_call_in_progress_may_need_are_kept() -> None:
    """While a call that may adopt older jobs runs, their claims stay."""
    registry = ClaimRegistry(skew=300)
    now = datetime.now(timezone.utc)
    with registry.active(now - timedelta(seconds=1000)):
        registry.claim(made(id="old", created_at=now - timedelta(seconds=400)))
        registry.claim(made(id="new", created_at=now))
        assert registry.is_claimed("old")


def test_claims_are_bounded_in_number() -> None:
    """Claims no date can rule out are capped, the oldest dropped first."""
    registry = ClaimRegistry(skew=300, limit=3)
    for index in range(5):
        registry.claim(made(id=f"undated-{index}", created_at=None))
    assert len(registry) == 3
    assert not registry.is_claimed("undated-1") and registry.is_claimed("undated-4")


async def test_a_reconcile_waits_for_the_creates_in_flight_on_its_file() -> None:
    """A reconcile lists only once the creates already sent on that file have answered."""
    registry = ClaimRegistry(skew=300)
    order: list[str] = []
    answer = anyio.Event()

    async def send() -> None:
        async with registry.sending("file-1"):
            order.append("sent")
            await answer.wait()
            order.append("answered")

    async def reconcile() -> None:
        async with registry.reconciling("file-1"):
            order.append("reconciling")

    async with anyio.create_task_group() as group:
        group.start_soon(send)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(reconcile)
        await anyio.wait_all_tasks_blocked()
        assert order == ["sent"]
        answer.set()
    assert order == ["sent", "answered", "reconciling"]


async def test_creates_wait_while_a_reconcile_lists_their_file() -> None:
    """No create is sent on a file while a reconcile on it lists jobs; other files go on."""
    registry = ClaimRegistry(skew=300)
    order: list[str] = []
    listed = anyio.Event()

    async def reconcile() -> None:
        async with registry.reconciling("file-1"):
            order.append("reconciling")
            await listed.wait()
            order.append("reconciled")

    async def send(file_id: str) -> None:
        async with registry.sending(file_id):
            order.append(f"sent {file_id}")

    async with anyio.create_task_group() as group:
        group.start_soon(reconcile)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(send, "file-1")
        group.start_soon(send, "file-2")
        await anyio.wait_all_tasks_blocked()
        assert order == ["reconciling", "sent file-2"]
        listed.set()
    assert order == ["reconciling", "sent file-2", "reconciled", "sent file-1"]


# --- create_batch against the emulator --------------------------------------------------


async def test_200_concurrent_creates_with_lost_answers_each_end_with_their_own_job(
    make_emulator: MakeEmulator,
) -> None:
    """200 creates at once on one file, a fifth of whose answers are cut after the job was
    made: every call returns a job no other call got (or raises a TogetherError), and the
    server made exactly as many jobs as there are distinct jobs returned."""
    emulator = await make_emulator(seed=12)
    async with fast_client(emulator) as client:
        file_id = (await client.files.upload(chat_file(1))).id
        emulator.faults.add(
            Fault(kind="reset", after_effect=True, rate=0.2, routes=("POST /batches",))
        )
        outcomes: list[BatchJob | TogetherError] = []

        async def create() -> None:
            try:
                outcomes.append(await client.batches.create_batch(file_id, CHAT))
            except TogetherError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as group:
            for _ in range(200):
                group.start_soon(create)
    ids = [outcome.id for outcome in outcomes if isinstance(outcome, BatchJob)]
    assert len(outcomes) == 200
    assert len(ids) == len(set(ids))
    assert emulator.stats.jobs_created[file_id] == len(set(ids))
    assert sum(emulator.stats.faults_injected.values()) >= 20  # the resets did strike


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ({"model_id": "other-model"}, {"model_id": "test-model"}),
        ({"completion_window": "12h"}, {"completion_window": "24h"}),
        ({"priority": 1}, {"priority": 2}),
    ],
)
async def test_a_lost_create_does_not_adopt_a_job_made_for_other_settings(
    make_emulator: MakeEmulator, theirs: dict[str, Any], ours: dict[str, Any]
) -> None:
    """A fresh job on the same file but for another model, window or priority is not taken
    for the one a create lost before the server acted: a job of its own is made."""
    emulator = await make_emulator()
    async with fast_client(emulator) as client:
        file_id = (await client.files.upload(chat_file(1))).id
        other = await client.batches.create_batch(file_id, CHAT, **theirs)
        emulator.faults.add(Fault(kind="reset", times=1, routes=("POST /batches",)))
        job = await client.batches.create_batch(file_id, CHAT, **ours)
    assert job.id != other.id
    assert emulator.stats.jobs_created[file_id] == 2
    assert emulator.stats["GET", "/batches"] == 1  # it did look, and found nothing of its own


async def test_a_lost_create_adopts_the_job_made_for_all_its_settings(
    make_emulator: MakeEmulator,
) -> None:
    """A create naming model, window and priority whose answer is cut after the job was made
    gets that job back, and no second one is made."""
    emulator = await make_emulator()
    async with fast_client(emulator) as client:
        file_id = (await client.files.upload(chat_file(1))).id
        emulator.faults.add(
            Fault(kind="reset", after_effect=True, times=1, routes=("POST /batches",))
        )
        job = await client.batches.create_batch(
            file_id, CHAT, model_id="test-model", completion_window="24h", priority=3
        )
    assert (job.model_id, job.completion_window, job.priority) == ("test-model", "24h", 3)
    assert emulator.stats.jobs_created[file_id] == 1


async def test_ignore_jobs_none_means_no_jobs(client: AsyncTogether) -> None:
    """ignore_jobs=None is accepted as an empty collection."""
    file_id = (await client.files.upload(chat_file(1))).id
    job = await client.batches.create_batch(file_id, CHAT, ignore_jobs=None)
    assert job.input_file_id == file_id


@pytest.mark.parametrize("ignore_jobs", [5, [["batch-1"]], [1, 2]])
async def test_ignore_jobs_that_are_not_job_ids_are_refused(
    client: AsyncTogether, emulator: Emulator, ignore_jobs: Any
) -> None:
    """A number, unhashable or non-string ids in ignore_jobs: InvalidArgumentError, not sent."""
    with pytest.raises(InvalidArgumentError, match="ignore_jobs"):
        await client.batches.create_batch("file-in", CHAT, ignore_jobs=ignore_jobs)
    assert emulator.stats["POST", "/batches"] == 0


@pytest.mark.parametrize("priority", [2**64, 2**63, -(2**63) - 1])
async def test_a_priority_beyond_64_bits_is_refused_before_sending(
    client: AsyncTogether, emulator: Emulator, priority: int
) -> None:
    """A priority outside the int64 range is an InvalidArgumentError; nothing is sent."""
    with pytest.raises(InvalidArgumentError, match="64-bit"):
        await client.batches.create_batch("file-in", CHAT, priority=priority)
    assert emulator.stats["POST", "/batches"] == 0


# --- cancel_batch -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "error"])
async def test_a_cancel_whose_answer_was_lost_returns_the_cancelled_job(
    make_emulator: MakeEmulator, kind: str
) -> None:
    """The first cancel takes effect but its answer is lost; the retry is refused as the job
    is cancelled already: cancel_batch returns the job, not the refusal."""
    emulator = await make_emulator(engine=HangingEngine(), shutdown_timeout=0.2)
    async with fast_client(emulator) as client:
        file_id = (await client.files.upload(chat_file(1))).id
        job = await client.batches.create_batch(file_id, CHAT)
        emulator.faults.add(
            Fault(kind=kind, after_effect=True, times=1, routes=("POST /batches/{id}/cancel",))
        )
        cancelled = await client.batches.cancel_batch(job.id)
    assert cancelled.id == job.id and cancelled.status in CANCELLED
    assert emulator.stats["POST", "/batches/{id}/cancel"] == 2


async def test_a_refused_cancel_with_no_lost_answer_still_raises(client: AsyncTogether) -> None:
    """Cancelling a job that already completed, first time asked, is the server's 400."""
    file_id = (await client.files.upload(chat_file(1))).id
    job = await client.batches.create_batch(file_id, CHAT)
    await client.batches.wait(job.id, poll_interval=0.01, max_interval=0.05)
    with pytest.raises(BadRequestError):
        await client.batches.cancel_batch(job.id)


# --- gather: cancel only what is yours --------------------------------------------------


@contextlib.asynccontextmanager
async def running_gather(
    client: AsyncTogether, requests: list[Any], **options: Any
) -> AsyncIterator[tuple[anyio.CancelScope, anyio.Event]]:
    """gather_batches in the background: yields its cancel scope and an event set once its
    create_batch has returned; leaving the block waits for the run to end."""
    scope = anyio.CancelScope()
    created = anyio.Event()
    original = client.batches.create_batch

    async def create_batch(*args: Any, **kwargs: Any) -> BatchJob:
        job = await original(*args, **kwargs)
        created.set()
        return job

    client.batches.create_batch = create_batch  # type: ignore[method-assign]

    async def run() -> None:
        with scope:
            await gather_batches(client, requests, model="test-model", **FAST, **options)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            yield scope, created
    finally:
        del client.batches.create_batch


def chats(count: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(count)]


async def test_a_run_cancelled_while_creating_leaves_another_runs_job_alone(
    make_emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Two runs over identical data share the (deduplicated) input file: the one cancelled
    while its create is in flight cancels nothing, and the other run's job runs on."""
    emulator = await make_emulator(engine=HangingEngine(), shutdown_timeout=0.2)
    async with fast_client(emulator) as theirs, fast_client(emulator) as ours:
        async with running_gather(theirs, chats(3)) as (their_scope, their_job_made):
            await their_job_made.wait()
            (their_job,) = await theirs.batches.list_batches()
            # Our create then hangs at the server, as a slow answer would.
            emulator.faults.add(Fault(kind="slow", delay=60, routes=("POST /batches",)))
            creating = anyio.Event()
            original = ours.batches.create_batch

            async def create_batch(*args: Any, **kwargs: Any) -> BatchJob:
                creating.set()
                return await original(*args, **kwargs)

            ours.batches.create_batch = create_batch  # type: ignore[method-assign]
            with anyio.CancelScope() as our_scope, caplog.at_level(logging.WARNING):

                async def cancel_once_creating() -> None:
                    await creating.wait()
                    our_scope.cancel()

                async with anyio.create_task_group() as group:
                    group.start_soon(cancel_once_creating)
                    await gather_batches(ours, chats(3), model="test-model", **FAST)
            assert our_scope.cancelled_caught
            assert emulator.stats["POST", "/batches/{id}/cancel"] == 0
            job = await theirs.batches.get_batch(their_job.id)
            assert job.status not in CANCELLED
            their_scope.cancel()
    assert "left running" in caplog.text  # names the job a cut-short create may have made


async def test_a_cancelled_run_cancels_its_own_job_and_no_other(
    make_emulator: MakeEmulator,
) -> None:
    """Of two runs with jobs on the same file, the one cancelled cancels exactly its job."""
    emulator = await make_emulator(engine=HangingEngine(), shutdown_timeout=0.2)
    async with fast_client(emulator) as theirs, fast_client(emulator) as ours:
        async with running_gather(theirs, chats(3)) as (their_scope, their_job_made):
            await their_job_made.wait()
            async with running_gather(ours, chats(3)) as (our_scope, our_job_made):
                await our_job_made.wait()
                our_scope.cancel()
            jobs = {job.id: job for job in await theirs.batches.list_batches()}
            assert len(jobs) == 2
            assert emulator.stats["POST", "/batches/{id}/cancel"] == 1
            cancelled = [job for job in jobs.values() if job.status in CANCELLED]
            assert len(cancelled) == 1
            their_scope.cancel()
        assert emulator.stats["POST", "/batches/{id}/cancel"] == 2
        assert all(job.status in CANCELLED for job in await theirs.batches.list_batches())


def test_ctrl_c_in_run_while_creating_leaves_another_runs_job_alone(tmp_path: Path) -> None:
    """Ctrl-C in `together-async run` while its create is in flight cancels nothing of another
    `run` over the same input (same deduplicated file), whose job runs on."""
    server = ServedEmulator(
        tmp_path, "--latency", "0.2", "--concurrency", "1", "--fault-slow-rate", "1",
        "--fault-slow-seconds", "2", "--fault-route", "POST /batches",
    )  # fmt: skip
    write_requests(tmp_path / "in.jsonl", 80)
    command = [
        sys.executable, "-m", "together_async", "--debug", "run", "in.jsonl",
        "--poll-interval", "0.05", *connection(server),
    ]  # fmt: skip
    options: dict[str, Any] = {"cwd": tmp_path, "env": _clean_env(), "text": True}
    try:
        with subprocess.Popen(
            [*command, "-o", "theirs.jsonl"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, **options,
        ) as theirs:  # fmt: skip
            try:
                (their_job,) = server.wait_for_jobs(1)
                with subprocess.Popen(
                    [*command, "-o", "ours.jsonl"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, **options,
                ) as ours:  # fmt: skip
                    assert ours.stderr is not None
                    for line in ours.stderr:  # ends with the process, so the wait is bounded
                        if "uploaded as" in line:  # its create now waits 2 s at the server
                            ours.send_signal(signal.SIGINT)
                            break
                    rest = ours.stderr.read()
                    ours.wait(timeout=RUN_TIMEOUT)
                assert ours.returncode == 130, rest
                jobs = {job["id"]: job for job in server.jobs()}
                assert jobs[their_job["id"]]["status"] not in {"CANCELLED", "CANCELING"}
            finally:
                theirs.send_signal(signal.SIGINT)
                theirs.wait(timeout=RUN_TIMEOUT)
    finally:
        server.stop()
