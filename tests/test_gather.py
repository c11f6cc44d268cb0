"""gather_batches / stream_batches end to end against the emulator over loopback HTTP:
ordering, wrapping, sharding, resubmits, failed jobs, resume after a crash, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from emulator_helpers import EMULATOR_KEY

from together_async import (
    AsyncTogether,
    BatchFileError,
    BatchRequest,
    BatchResult,
    BatchRun,
    InvalidArgumentError,
    ManifestMismatchError,
    gather_batches,
    stream_batches,
)
from together_async.emulator import Emulator
from together_async.emulator.engines import EchoEngine, Engine, EngineReply
from together_async.manifest import Manifest, ShardRecord, ShardStep

MakeEmulator = Callable[..., Awaitable[Emulator]]
FAST = {"poll_interval": 0.02, "max_interval": 0.1}


def chat(text: str) -> dict[str, Any]:
    """A bare chat body with no model."""
    return {"messages": [{"role": "user", "content": text}]}


def bodies(count: int) -> list[dict[str, Any]]:
    return [chat(f"question {index}") for index in range(count)]


def outcome(results: list[BatchResult]) -> list[tuple[Any, ...]]:
    """What must be equal between two runs of the same input (ids of jobs and files differ)."""
    return [(r.custom_id, r.status_code, r.text, r.error_code, r.usage) for r in results]


@contextlib.asynccontextmanager
async def client_of(emulator: Emulator, **options: Any) -> AsyncIterator[AsyncTogether]:
    async with AsyncTogether(base_url=emulator.base_url, api_key=emulator.api_key, **options) as c:
        yield c


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[AsyncTogether]:
    """A client of the `emulator` fixture."""
    async with client_of(emulator) as together:
        yield together


async def recorded_shards(state_path: Path) -> list[ShardRecord]:
    manifest = await Manifest.open(state_path)
    try:
        return await manifest.shards()
    finally:
        await manifest.aclose()


async def wait_until(condition: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Poll a condition every 10 ms, failing the test after `seconds`."""
    with anyio.fail_after(seconds):
        # Polling: the conditions are counters of other components, which offer no event.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


class FlakyEngine(Engine):
    """Echoes, but answers the first `failures[custom_id]` attempts of some rows with a status."""

    instant = True

    def __init__(self, failures: dict[str, int], *, status: int = 503) -> None:
        self.failures = dict(failures)
        self.status = status
        self._echo = EchoEngine()

    def respond_now(self, endpoint: str, body: Any, *, custom_id: str, created: int) -> EngineReply:
        left = self.failures.get(custom_id, 0)
        if left:
            self.failures[custom_id] = left - 1
            return EngineReply(
                status_code=self.status,
                body={"error": {"message": "overloaded, try later", "type": "server_error"}},
                error_message="overloaded, try later",
                error_code="server_error",
            )
        return self._echo.respond_now(endpoint, body, custom_id=custom_id, created=created)


class StallingEngine(Engine):
    """Echoes the first `answer_first` rows it sees, then hangs on the next one, once."""

    def __init__(self, answer_first: int) -> None:
        self.answer_first = answer_first
        self.answered = 0
        self.stalled = False
        self._echo = EchoEngine()

    async def respond(
        self, endpoint: str, body: Any, *, custom_id: str, created: int
    ) -> EngineReply:
        if not self.stalled and self.answered >= self.answer_first:
            self.stalled = True
            await asyncio.sleep(60)  # cut short when the job is cancelled or expires
        self.answered += 1
        return self._echo.respond_now(endpoint, body, custom_id=custom_id, created=created)


# --- input handling ---------------------------------------------------------------------


async def test_results_come_back_in_input_order(client: AsyncTogether) -> None:
    """gather_batches returns one result per request, in input order, across shards."""
    results = await gather_batches(
        client, bodies(250), model="m", max_requests_per_batch=100, **FAST
    )
    assert [r.custom_id for r in results] == [f"request-{i}" for i in range(250)]
    assert [r.text for r in results] == [f"question {i}" for i in range(250)]
    assert all(r.ok for r in results)


async def test_bare_bodies_are_wrapped_and_model_fills_only_missing_ones(
    client: AsyncTogether,
) -> None:
    """`model=` goes into bodies without a model; a body's own model is kept."""
    requests = [chat("a"), {"model": "own-model", **chat("b")}]
    results = await gather_batches(client, requests, model="default-model", **FAST)
    assert [r.body["model"] for r in results] == ["default-model", "own-model"]


async def test_request_lines_keep_their_ids_and_missing_ones_are_generated(
    client: AsyncTogether,
) -> None:
    """Given custom_ids are kept; rows without one get `request-<position>`."""
    requests: list[Any] = [
        {"custom_id": "mine", "body": chat("a")},
        chat("b"),
        BatchRequest(custom_id="model-object", body=chat("c")),
        {"body": chat("d"), "method": "POST", "url": "/v1/chat/completions"},
    ]
    results = await gather_batches(client, requests, model="m", **FAST)
    assert [r.custom_id for r in results] == ["mine", "request-1", "model-object", "request-3"]
    assert [r.text for r in results] == ["a", "b", "c", "d"]


async def test_a_jsonl_file_and_an_async_iterable_give_the_same_results(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """A path to a JSONL file and an async iterable work like a list."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(orjson.dumps(body) + b"\n" for body in bodies(30)))

    async def generate() -> AsyncIterator[dict[str, Any]]:
        for body in bodies(30):
            yield body

    from_file = await gather_batches(client, path, model="m", **FAST)
    from_async = await gather_batches(client, generate(), model="m", **FAST)
    assert outcome(from_file) == outcome(from_async)
    assert [r.text for r in from_file] == [f"question {i}" for i in range(30)]


async def test_duplicate_ids_are_refused_before_any_upload(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """A custom_id used twice raises BatchFileError naming both positions; nothing is sent."""
    requests = [{"custom_id": f"id-{i}", "body": chat("x")} for i in range(50)]
    requests[42]["custom_id"] = "id-7"
    with pytest.raises(BatchFileError) as caught:
        await gather_batches(client, requests, model="m", max_requests_per_batch=10)
    assert "requests[42].custom_id: duplicates requests[7]" in str(caught.value)
    assert emulator.stats["POST", "/files"] == 0


async def test_duplicates_in_a_file_are_named_by_line(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """In a JSONL input, problems name 1-based line numbers."""
    path = tmp_path / "requests.jsonl"
    lines = [{"custom_id": "a", "body": chat("x")}, {"custom_id": "a", "body": chat("y")}]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    with pytest.raises(BatchFileError, match=r"line 2: custom_id: duplicates line 1"):
        await gather_batches(client, path, model="m")


async def test_every_bad_row_is_reported_before_any_upload(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """Rows that are not requests are all listed, with their positions, and nothing is sent."""
    requests: list[Any] = [chat("ok"), "not a dict", {"custom_id": 5, "body": {}}, {"body": []}]
    with pytest.raises(BatchFileError) as caught:
        await gather_batches(client, requests, model="m")
    message = str(caught.value)
    assert "3 problems" in message
    assert "requests[1]: must be a JSON object, got a string" in message
    assert "requests[2].custom_id: must be a string" in message
    assert "requests[3].body: must be a JSON object, got an array" in message
    assert emulator.stats["POST", "/files"] == 0


async def test_a_requests_path_with_a_nul_is_refused(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """A requests path holding a NUL byte is InvalidArgumentError naming it; nothing is sent."""
    with pytest.raises(InvalidArgumentError, match=r"requests file 'in\\x00\.jsonl'"):
        await gather_batches(client, "in\x00.jsonl", model="m")
    assert sum(emulator.stats.requests.values()) == 0


async def test_an_empty_input_gives_no_results_and_sends_nothing(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """No requests: an empty list back and no API call."""
    assert await gather_batches(client, []) == []
    assert sum(emulator.stats.requests.values()) == 0


# --- sharding ---------------------------------------------------------------------------


async def test_shards_respect_the_line_limit(client: AsyncTogether, emulator: Emulator) -> None:
    """2,500 requests at 1,000 per batch make 3 jobs."""
    run = BatchRun(client, bodies(2500), model="m", max_requests_per_batch=1000, **FAST)
    results = await run.gather()
    assert len(results) == 2500
    assert run.summary.jobs == 3
    assert len(emulator.stats.jobs_created) == 3


async def test_shards_respect_the_byte_limit(client: AsyncTogether, tmp_path: Path) -> None:
    """No shard file exceeds max_bytes_per_batch, and the rows are all there."""
    state = tmp_path / "state.sqlite"
    await gather_batches(
        client, bodies(200), model="m", max_bytes_per_batch=4000, state_path=state, **FAST
    )
    shards = await recorded_shards(state)
    assert len(shards) > 3
    assert all(shard.bytes <= 4000 for shard in shards)
    assert sum(shard.lines for shard in shards) == 200


# --- failures inside jobs -----------------------------------------------------------------


async def test_rows_that_failed_retryably_are_resubmitted(make_emulator: MakeEmulator) -> None:
    """Rows answered 503 once are sent again in a follow-up job and end up ok."""
    failing = {f"request-{i}": 1 for i in (3, 50, 149)}
    emulator = await make_emulator(engine=FlakyEngine(failing))
    async with client_of(emulator) as client:
        run = BatchRun(client, bodies(150), model="m", max_requests_per_batch=50, **FAST)
        results = await run.gather()
    assert all(r.ok for r in results)
    assert [r.text for r in results] == [f"question {i}" for i in range(150)]
    summary = run.summary
    assert (summary.jobs, summary.resubmitted_rows, summary.attempts) == (6, 3, 2)


async def test_rows_failing_every_attempt_end_with_their_last_error(
    make_emulator: MakeEmulator,
) -> None:
    """After max_attempts, a row keeps its last failure as its result."""
    emulator = await make_emulator(engine=FlakyEngine({"request-1": 10}))
    async with client_of(emulator) as client:
        run = BatchRun(client, bodies(3), model="m", max_attempts=3, **FAST)
        results = await run.gather()
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].status_code == 503
    assert (run.summary.jobs, run.summary.attempts, run.summary.rows_failed) == (3, 3, 1)


async def test_rows_that_failed_for_good_are_not_resubmitted(client: AsyncTogether) -> None:
    """A 400 answer (no model here) is final: no follow-up job."""
    run = BatchRun(client, [chat("no model"), {"model": "m", **chat("fine")}], **FAST)
    results = await run.gather()
    assert (results[0].status_code, results[1].ok) == (400, True)
    assert (run.summary.jobs, run.summary.resubmitted_rows) == (1, 0)


async def test_an_expired_job_keeps_its_output_and_resubmits_the_rest(
    make_emulator: MakeEmulator,
) -> None:
    """Rows answered before the job expired are kept; the others go into a follow-up job."""
    # "24h" scaled to 0.5 s; the engine stalls after 4 rows, so the first job expires.
    emulator = await make_emulator(
        engine=StallingEngine(answer_first=4), concurrency=1, time_factor=0.5 / 86400
    )
    async with client_of(emulator) as client:
        run = BatchRun(client, bodies(10), model="m", **FAST)
        results = await run.gather()
    assert all(r.ok for r in results)
    assert [r.text for r in results] == [f"question {i}" for i in range(10)]
    assert (run.summary.jobs, run.summary.resubmitted_rows) == (2, 6)
    assert len({r.batch_id for r in results[:4]}) == 1
    assert results[0].batch_id != results[9].batch_id


async def test_a_job_cancelled_by_someone_else_resubmits_its_missing_rows(
    make_emulator: MakeEmulator,
) -> None:
    """A job cancelled outside the run keeps its partial output; the rest is resubmitted."""
    engine = StallingEngine(answer_first=3)
    emulator = await make_emulator(engine=engine, concurrency=1)
    async with client_of(emulator) as client:
        run = BatchRun(client, bodies(8), model="m", **FAST)
        gathered: list[list[BatchResult]] = []

        async def gather() -> None:
            gathered.append(await run.gather())

        async with anyio.create_task_group() as group:
            group.start_soon(gather)
            await wait_until(lambda: engine.stalled)
            jobs = await client.batches.list_batches()
            await client.batches.cancel_batch(jobs[0].id)
        results = gathered[0]
    assert all(r.ok for r in results)
    assert (run.summary.jobs, run.summary.resubmitted_rows) == (2, 5)


async def test_a_failed_job_is_reported_on_every_row_and_not_retried(
    make_emulator: MakeEmulator,
) -> None:
    """A job failing validation gives each of its rows a final batch_failed error."""
    emulator = await make_emulator(max_lines=5)  # the server refuses files of over 5 lines
    async with client_of(emulator) as client:
        run = BatchRun(client, bodies(12), model="m", max_requests_per_batch=6, **FAST)
        results = await run.gather()
    assert all(r.error_code == "batch_failed" for r in results)
    assert "validation failed" in (results[0].error_message or "")
    assert (run.summary.jobs, run.summary.rows_failed, run.summary.resubmitted_rows) == (2, 12, 0)


# --- summary and streaming ----------------------------------------------------------------


async def test_the_summary_adds_up(client: AsyncTogether) -> None:
    """The summary's row counts and token usage match the results."""
    with_model = [{"model": "m", **body} for body in bodies(20)]
    run = BatchRun(client, [*with_model, chat("no model")], **FAST)
    results = await run.gather()
    summary = run.summary
    assert (summary.rows, summary.rows_ok, summary.rows_failed) == (21, 20, 1)
    assert summary.usage["total_tokens"] == sum(r.usage.get("total_tokens", 0) for r in results)
    assert summary.usage["total_tokens"] > 0
    assert (summary.jobs, summary.shards, summary.attempts, summary.resumed) == (1, 1, 1, False)
    assert summary.wall_time > 0


async def test_stream_yields_every_row_exactly_once(client: AsyncTogether) -> None:
    """stream_batches yields one result per request, whatever the order."""
    seen = [
        result.custom_id
        async for result in stream_batches(
            client, bodies(300), model="m", max_requests_per_batch=70, **FAST
        )
    ]
    assert sorted(seen) == sorted(f"request-{i}" for i in range(300))


async def test_a_finished_shard_is_read_while_an_upload_holds_its_slot(
    client: AsyncTogether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads do not queue behind uploads: with one upload at a time, the second shard's
    upload waits for a result of the first shard, which must come without that slot."""
    first_result = anyio.Event()
    real_upload = client.files.upload
    uploads = 0

    async def upload(*args: Any, **kwargs: Any) -> Any:
        nonlocal uploads
        uploads += 1
        if uploads == 2:
            await first_result.wait()
        return await real_upload(*args, **kwargs)

    monkeypatch.setattr(client.files, "upload", upload)
    run = BatchRun(
        client, bodies(4), model="m", max_requests_per_batch=2, max_concurrency=1, **FAST
    )
    seen: list[str] = []
    with anyio.fail_after(15):  # a slot shared with uploads would wait here forever
        async with contextlib.aclosing(run.stream()) as results:
            async for result in results:
                seen.append(result.custom_id)
                first_result.set()
    assert sorted(seen) == [f"request-{i}" for i in range(4)]
    assert uploads == 2


async def test_closing_the_stream_early_cancels_the_run(
    make_emulator: MakeEmulator,
) -> None:
    """Closing the iterator after the first result cancels the run and its unfinished jobs."""
    emulator = await make_emulator(engine=StallingEngine(answer_first=5), concurrency=1)
    async with client_of(emulator) as client:
        stream = stream_batches(client, bodies(20), model="m", max_requests_per_batch=10, **FAST)
        async with contextlib.aclosing(stream) as results:
            async for _ in results:
                break
        jobs = await client.batches.list_batches()
    assert sorted(str(job.status) for job in jobs) in (
        ["CANCELLED", "COMPLETED"],
        ["CANCELING", "COMPLETED"],
    )


# --- resume -------------------------------------------------------------------------------


async def complete_uploads(before: list[ShardRecord], state: Path) -> int:
    """How many shards had a complete upload when the crash came: those recorded uploaded,
    and those whose file id, recorded before its PUT, the rerun reused (a file the crash cut
    short was deleted and uploaded again)."""
    now = {shard.file_id for shard in await recorded_shards(state)}
    return sum(
        1
        for shard in before
        if shard.file_id is not None
        and (shard.step is not ShardStep.WRITTEN or shard.file_id in now)
    )


async def run_until_call(
    client: AsyncTogether, resource: str, method: str, calls: int, **options: Any
) -> None:
    """Run gather_batches and stop it dead (cancelled, jobs left alone) just after the
    `calls`-th call of client.<resource>.<method> returns, as a crash there would."""
    target = getattr(client, resource)
    original = getattr(target, method)
    count = 0
    with anyio.CancelScope() as scope:

        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            result = await original(*args, **kwargs)
            count += 1
            if count == calls:
                scope.cancel()
            return result

        setattr(target, method, wrapped)
        try:
            await gather_batches(client, **options)
        finally:
            delattr(target, method)
    assert scope.cancelled_caught, f"the run ended before call {calls} of {method}"


@pytest.mark.parametrize(
    ("resource", "method", "calls"),
    [
        ("files", "upload", 2),
        ("batches", "create_batch", 1),
        ("batches", "create_batch", 3),
        ("files", "retrieve_content", 1),
        ("files", "retrieve_content", 2),
    ],
)
async def test_resume_after_a_crash_repeats_no_step(
    make_emulator: MakeEmulator, tmp_path: Path, resource: str, method: str, calls: int
) -> None:
    """A rerun after a crash uploads no recorded shard, creates no job twice, downloads no
    finished shard twice, and returns what an uninterrupted run returns."""
    options: dict[str, Any] = {
        "requests": bodies(300),
        "model": "m",
        "max_requests_per_batch": 100,
        "max_concurrency": 1,
        **FAST,
    }
    # The uninterrupted run gets a server of its own: on a shared one its jobs would sit on
    # the same (checksum-deduplicated) file ids as the resumed run's.
    async with client_of(await make_emulator()) as client:
        expected = await gather_batches(client, state_path=tmp_path / "baseline.sqlite", **options)
    emulator = await make_emulator()
    async with client_of(emulator) as client:
        state = tmp_path / "state.sqlite"
        await run_until_call(client, resource, method, calls, state_path=state, **options)
        before = await recorded_shards(state)
        uploads_before = emulator.stats["POST", "/files"]
        downloads_before = emulator.stats["GET", "/files/{id}/content"]

        results = await gather_batches(client, state_path=state, **options)

    assert outcome(results) == outcome(expected)
    assert all(count == 1 for count in emulator.stats.jobs_created.values())
    assert len(emulator.stats.jobs_created) == 3
    recorded_uploads = await complete_uploads(before, state)
    assert emulator.stats["POST", "/files"] - uploads_before == 3 - recorded_uploads
    downloaded = sum(1 for s in before if s.step.rank >= ShardStep.DOWNLOADED.rank)
    assert emulator.stats["GET", "/files/{id}/content"] - downloads_before == 3 - downloaded


KILLED_RUN = """
import os, signal, sys, anyio
from together_async import AsyncTogether, gather_batches
from together_async.manifest import Manifest

base_url, key, state, where, calls = sys.argv[1:]
owner, method = where.split(".")
count = 0

def killing(original):
    async def wrapped(*args, **kwargs):
        global count
        result = await original(*args, **kwargs)
        count += 1
        if count == int(calls):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

async def main():
    async with AsyncTogether(key, base_url=base_url) as client:
        if owner == "Manifest":
            setattr(Manifest, method, killing(getattr(Manifest, method)))
        else:
            target = getattr(client, owner)
            setattr(target, method, killing(getattr(target, method)))
        requests = [{"messages": [{"role": "user", "content": f"question {i}"}]}
                    for i in range(300)]
        await gather_batches(client, requests, model="m", max_requests_per_batch=100,
                             max_concurrency=1, state_path=state, poll_interval=0.02,
                             max_interval=0.1)

anyio.run(main)
"""


@pytest.mark.parametrize(
    ("where", "calls"),
    [
        ("files.upload", 2),
        ("Manifest.record_create_intent", 2),
        ("batches.create_batch", 2),
        ("files.retrieve_content", 1),
        ("Manifest.record_done", 1),
    ],
)
async def test_resume_after_sigkill_repeats_no_step(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path, where: str, calls: int
) -> None:
    """A run killed with SIGKILL at a step resumes without a second job for any shard and
    with the results of an uninterrupted run."""
    state = tmp_path / "state.sqlite"
    killed = await anyio.run_process(
        [
            sys.executable,
            "-c",
            KILLED_RUN,
            emulator.base_url,
            emulator.api_key,
            str(state),
            where,
            str(calls),
        ],
        check=False,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    before = await recorded_shards(state)
    uploads_before = emulator.stats["POST", "/files"]
    downloads_before = emulator.stats["GET", "/files/{id}/content"]
    results = await gather_batches(
        client, bodies(300), model="m", max_requests_per_batch=100, state_path=state, **FAST
    )
    assert [r.text for r in results] == [f"question {i}" for i in range(300)]
    assert all(count == 1 for count in emulator.stats.jobs_created.values())
    assert len(emulator.stats.jobs_created) == 3
    recorded_uploads = await complete_uploads(before, state)
    assert emulator.stats["POST", "/files"] - uploads_before == 3 - recorded_uploads
    downloaded = sum(1 for s in before if s.step.rank >= ShardStep.DOWNLOADED.rank)
    assert emulator.stats["GET", "/files/{id}/content"] - downloads_before == 3 - downloaded


async def test_resume_does_not_mistake_the_parents_job_for_its_follow_ups(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    """A follow-up with its parent's exact bytes shares its file id; a crash while creating its
    job is reconciled to the follow-up's own job, not the parent's."""
    emulator = await make_emulator(engine=FlakyEngine({"request-0": 1}))
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"requests": bodies(1), "model": "m", **FAST}
    async with client_of(emulator) as client:
        await run_until_call(client, "batches", "create_batch", 2, state_path=state, **options)
        crashed = await recorded_shards(state)
        results = await gather_batches(client, state_path=state, **options)
    assert [shard.step for shard in crashed] == [ShardStep.DONE, ShardStep.CREATING]
    assert results[0].ok
    assert emulator.stats.jobs_created.total() == 2  # parent and follow-up, no third
    shards = await recorded_shards(state)
    assert len({shard.file_id for shard in shards}) == 1
    assert len({shard.batch_id for shard in shards}) == 2


async def crash_before_creating(client: AsyncTogether, **options: Any) -> None:
    """Run gather_batches and stop it dead as its first create_batch is about to be sent: the
    create intent is recorded and no job exists."""
    with anyio.CancelScope() as scope:

        async def cut_short(*args: Any, **kwargs: Any) -> Any:
            scope.cancel()
            await anyio.lowlevel.checkpoint()
            raise AssertionError("the cancelled scope raises at the checkpoint")

        setattr(client.batches, "create_batch", cut_short)  # noqa: B010
        try:
            await gather_batches(client, **options)
        finally:
            delattr(client.batches, "create_batch")
    assert scope.cancelled_caught, "the run ended before its first create_batch"


async def move_create_intent(state_path: Path, shard_id: int, at: float) -> None:
    """Rewrite when a shard's current step (its create intent) was recorded, as if at `at`."""

    def rewrite() -> None:
        db = sqlite3.connect(state_path)
        try:
            with db:  # commits
                db.execute("UPDATE shards SET updated_at = ? WHERE id = ?", (at, shard_id))
        finally:
            db.close()

    await anyio.to_thread.run_sync(rewrite)


async def test_resume_does_not_adopt_a_job_made_before_the_create_intent(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A job on the shard's file id made well before its create intent (another run over the
    same data) is left alone: the resume creates the shard's own job."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"requests": bodies(10), "model": "m", "state_path": state, **FAST}
    async with client_of(emulator) as client:
        await crash_before_creating(client, **options)
        [crashed] = await recorded_shards(state)
        assert crashed.step is ShardStep.CREATING and crashed.file_id is not None
        assert emulator.stats.jobs_created.total() == 0
        foreign = await client.batches.create_batch(
            crashed.file_id, "/v1/chat/completions", model_id="m"
        )
        assert foreign.created_at is not None
        skew = client.config.create_reconcile_skew
        await move_create_intent(state, crashed.id, foreign.created_at.timestamp() + skew + 3600)
        results = await gather_batches(client, **options)
    assert all(result.ok for result in results)
    [shard] = await recorded_shards(state)
    assert shard.batch_id not in (None, foreign.id)
    assert emulator.stats.jobs_created[crashed.file_id] == 2  # the foreign job and its own
    assert emulator.stats["POST", "/batches/{id}/cancel"] == 0


async def test_resume_does_not_adopt_a_job_for_another_endpoint(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A job on the shard's file id made after its create intent, but for another endpoint, is
    not the shard's: the resume creates the shard's own job."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"requests": bodies(10), "model": "m", "state_path": state, **FAST}
    async with client_of(emulator) as client:
        await crash_before_creating(client, **options)
        [crashed] = await recorded_shards(state)
        assert crashed.file_id is not None
        foreign = await client.batches.create_batch(
            crashed.file_id, "/v1/completions", model_id="m"
        )
        results = await gather_batches(client, **options)
    assert all(result.ok for result in results)
    [shard] = await recorded_shards(state)
    assert shard.batch_id not in (None, foreign.id)
    assert emulator.stats.jobs_created[crashed.file_id] == 2


async def test_resume_adopts_the_job_made_after_the_create_intent(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A crash just after create_batch returned: the resume follows that job and makes none."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"requests": bodies(10), "model": "m", "state_path": state, **FAST}
    async with client_of(emulator) as client:
        await run_until_call(client, "batches", "create_batch", 1, **options)
        [crashed] = await recorded_shards(state)
        [made] = await client.batches.list_batches()
        creates_before = emulator.stats["POST", "/batches"]
        results = await gather_batches(client, **options)
    assert crashed.step is ShardStep.CREATING
    assert all(result.ok for result in results)
    [shard] = await recorded_shards(state)
    assert shard.batch_id == made.id
    assert emulator.stats["POST", "/batches"] == creates_before


async def test_resume_allows_for_a_server_clock_behind_ours(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A job stamped before the create intent, but by less than create_reconcile_skew, is
    still adopted (the server's clock may be behind ours)."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"requests": bodies(10), "model": "m", "state_path": state, **FAST}
    async with client_of(emulator) as client:
        await run_until_call(client, "batches", "create_batch", 1, **options)
        [made] = await client.batches.list_batches()
        assert made.created_at is not None
        skew = client.config.create_reconcile_skew
        await move_create_intent(state, 0, made.created_at.timestamp() + skew - 60)
        creates_before = emulator.stats["POST", "/batches"]
        await gather_batches(client, **options)
    [shard] = await recorded_shards(state)
    assert shard.batch_id == made.id
    assert emulator.stats["POST", "/batches"] == creates_before


async def test_a_finished_run_replays_from_its_state_without_calls(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """Rerunning a finished run returns the same results from disk, with no API call."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"model": "m", "max_requests_per_batch": 40, **FAST}
    first = await gather_batches(client, bodies(100), state_path=state, **options)
    emulator.stats.reset()
    run = BatchRun(client, bodies(100), state_path=state, **options)
    again = await run.gather()
    assert again == first
    assert sum(emulator.stats.requests.values()) == 0
    assert run.summary.resumed and run.summary.jobs == 3


async def test_results_deleted_from_the_state_directory_are_downloaded_again(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """A rerun whose downloaded files were removed fetches them again and gives equal results."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {"model": "m", "max_requests_per_batch": 40, **FAST}
    first = await gather_batches(client, bodies(100), state_path=state, **options)
    removed = await anyio.to_thread.run_sync(
        lambda: [path.unlink() for path in Path(f"{state}.files", "results").glob("00001.*")]
    )
    emulator.stats.reset()
    again = await gather_batches(client, bodies(100), state_path=state, **options)
    assert again == first
    assert emulator.stats["GET", "/files/{id}/content"] == len(removed) == 1
    assert emulator.stats["POST", "/batches"] == 0


async def test_resume_after_a_stream_consumer_stopped(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """A stream closed midway and rerun with its state_path finishes without new jobs."""
    state = tmp_path / "state.sqlite"
    options: dict[str, Any] = {
        "model": "m",
        "max_requests_per_batch": 50,
        "state_path": state,
        **FAST,
    }
    async with contextlib.aclosing(stream_batches(client, bodies(200), **options)) as stream:
        async for _ in stream:
            break
    jobs_after_first = emulator.stats.jobs_created.total()
    results = await gather_batches(client, bodies(200), **options)
    assert [r.text for r in results] == [f"question {i}" for i in range(200)]
    assert all(count == 1 for count in emulator.stats.jobs_created.values())
    assert emulator.stats.jobs_created.total() >= jobs_after_first


async def test_another_dataset_on_the_same_state_path_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """A state file written for other requests raises ManifestMismatchError, sending nothing."""
    state = tmp_path / "state.sqlite"
    await gather_batches(client, bodies(10), model="m", state_path=state, **FAST)
    emulator.stats.reset()
    with pytest.raises(ManifestMismatchError, match="belongs to another run"):
        await gather_batches(client, bodies(11), model="m", state_path=state, **FAST)
    assert sum(emulator.stats.requests.values()) == 0


async def test_the_state_never_holds_the_api_key(client: AsyncTogether, tmp_path: Path) -> None:
    """Neither the state file nor its directory contains the API key."""
    state = tmp_path / "state.sqlite"
    await gather_batches(client, bodies(10), model="m", state_path=state, **FAST)
    key = EMULATOR_KEY.encode()

    def files_holding_the_key() -> list[Path]:
        files = [state, *Path(f"{state}.files").rglob("*")]
        return [path for path in files if path.is_file() and key in path.read_bytes()]

    assert await anyio.to_thread.run_sync(files_holding_the_key) == []


# --- cancellation -------------------------------------------------------------------------


async def start_and_cancel(client: AsyncTogether, emulator: Emulator, **options: Any) -> None:
    """Start a gather, cancel it once its job exists on the server."""
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: gather_batches(client, bodies(10), model="m", **FAST, **options))
        await wait_until(lambda: emulator.stats.jobs_created.total() == 1)
        group.cancel_scope.cancel()


async def test_cancelling_cancels_the_remote_jobs(make_emulator: MakeEmulator) -> None:
    """With cancel_on_exit=True, cancelling the gather cancels its job on the server."""
    emulator = await make_emulator(engine=StallingEngine(answer_first=0), concurrency=1)
    async with client_of(emulator) as client:
        await start_and_cancel(client, emulator, cancel_on_exit=True)
        jobs = await client.batches.list_batches()
    assert [str(job.status) for job in jobs] in (["CANCELLED"], ["CANCELING"])


async def test_cancelling_with_a_state_path_leaves_jobs_running_to_resume(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    """With a state_path (cancel_on_exit off by default) the job keeps running and a rerun
    picks it up instead of creating another."""
    engine = StallingEngine(answer_first=0)
    emulator = await make_emulator(engine=engine, concurrency=1)
    state = tmp_path / "state.sqlite"
    async with client_of(emulator) as client:
        await start_and_cancel(client, emulator, state_path=state)
        jobs = await client.batches.list_batches()
        assert [str(job.status) for job in jobs] in (["VALIDATING"], ["IN_PROGRESS"])
        # Let the job finish this time: an external cancel makes the rerun resubmit.
        await client.batches.cancel_batch(jobs[0].id)
        results = await gather_batches(client, bodies(10), model="m", state_path=state, **FAST)
    assert all(r.ok for r in results)
    # The original job and one follow-up (on the same file: its bytes are the same).
    assert emulator.stats.jobs_created.total() == 2
    assert len({shard.batch_id for shard in await recorded_shards(state)}) == 2


async def test_delete_files_removes_the_remote_files(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """With delete_files=True, no input, output or error file is left on the server."""
    await gather_batches(
        client, bodies(30), model="m", max_requests_per_batch=10, delete_files=True, **FAST
    )
    assert len(await client.files.list()) == 0


async def test_api_errors_reach_the_caller_unwrapped(emulator: Emulator) -> None:
    """A wrong key raises AuthenticationError itself, not an exception group."""
    from together_async import AuthenticationError

    async with AsyncTogether(base_url=emulator.base_url, api_key="wrong") as client:
        with pytest.raises(AuthenticationError):
            await gather_batches(client, bodies(3), model="m", **FAST)
