"""Crash and resume: a separate process running gather_batches with a state file is killed with
SIGKILL at a chosen stage (mid-upload, right after an upload, right after a create, mid-watch,
mid-download, right after a download); rerunning it finishes with no job or upload made twice
and results equal to an uninterrupted run's. Then the emulator itself is SIGKILLed mid-job and
restarted on the same data dir and port: the client's status stream and gather ride through.

How each stage is reached without sleeps: the driver script (written into tmp_path) patches
the library at that stage to print `REACHED <stage>` and block; the test waits for that line
(bounded), checks on the emulator that the stage really is where the process stands, and kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest
from emulator_helpers import CHAT, chat_file

from together_async import AsyncTogether, BatchJob, BatchResult, ClientConfig, gather_batches
from together_async.emulator import Emulator
from together_async.emulator.engines import EchoEngine, Engine, EngineReply
from together_async.manifest import Manifest, ShardRecord, ShardStep

pytestmark = pytest.mark.timeout(240)

MakeEmulator = Callable[..., Awaitable[Emulator]]
ROWS = 300
PER_BATCH = 100
SHARDS = ROWS // PER_BATCH
MARKER_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0

DRIVER = r'''
"""Test driver: gather_batches with a state file; CRASH_STAGE stops it dead at one stage."""
import asyncio
import os
import sys

import orjson

from together_async import AsyncTogether, ClientConfig, gather_batches
from together_async.batches import Batches
from together_async.files import Files, _UploadSource
from together_async.manifest import Manifest

base_url, api_key, requests_path, state_path, out_path = sys.argv[1:6]
STAGE = os.environ.get("CRASH_STAGE", "")
AT = int(os.environ.get("CRASH_AT", "1"))
JOBS = int(os.environ.get("CRASH_JOBS", "0"))
calls = 0


def due(stage):
    """True on the AT-th time the patched step of `stage` runs."""
    global calls
    if stage != STAGE:
        return False
    calls += 1
    return calls == AT


async def stop_here():
    print(f"REACHED {STAGE}", flush=True)
    await asyncio.Event().wait()  # until SIGKILL


def patch():
    chunks, upload = _UploadSource.chunks, Files.upload
    content_chunks, retrieve_content = Files._content_chunks, Files.retrieve_content
    create_batch, list_batches = Batches.create_batch, Batches.list_batches
    record_done = Manifest.record_done

    async def chunks_then_stop(self):
        if not due("mid-upload"):
            async for chunk in chunks(self):
                yield chunk
            return
        async for chunk in chunks(self):
            yield chunk[: len(chunk) // 2]  # half the body is on the wire
            await stop_here()

    async def upload_then_stop(self, *args, **kwargs):
        uploaded = await upload(self, *args, **kwargs)
        if due("after-upload"):
            await stop_here()
        return uploaded

    async def create_then_stop(self, *args, **kwargs):
        job = await create_batch(self, *args, **kwargs)
        if due("after-create"):
            await stop_here()
        return job

    async def list_then_stop(self, *args, **kwargs):
        jobs = await list_batches(self, *args, **kwargs)
        running = [job for job in jobs if str(job.status) == "IN_PROGRESS"]
        if len(jobs) >= JOBS and running and due("mid-watch"):
            await stop_here()
        return jobs

    async def content_then_stop(self, file_id, **kwargs):
        if not due("mid-download"):
            async for chunk in content_chunks(self, file_id, **kwargs):
                yield chunk
            return
        async for chunk in content_chunks(self, file_id, **kwargs):
            yield chunk[: len(chunk) // 2]
            await stop_here()

    async def retrieve_then_stop(self, *args, **kwargs):
        downloaded = await retrieve_content(self, *args, **kwargs)
        if due("after-download"):
            await stop_here()
        return downloaded

    async def stop_then_record_done(self, *args, **kwargs):
        if due("before-done"):
            await stop_here()
        follow_up = await record_done(self, *args, **kwargs)
        if follow_up is not None and due("after-resubmit"):
            await stop_here()
        return follow_up

    Manifest.record_done = stop_then_record_done
    _UploadSource.chunks = chunks_then_stop
    Files.upload = upload_then_stop
    Batches.create_batch = create_then_stop
    Batches.list_batches = list_then_stop
    Files._content_chunks = content_then_stop
    Files.retrieve_content = retrieve_then_stop


async def main():
    patch()
    config = ClientConfig(
        api_key=api_key,
        base_url=base_url,
        max_retries=8,
        retry_wait_initial=0.01,
        retry_wait_max=0.1,
        retry_wait_jitter=0.01,
    )
    async with AsyncTogether.from_config(config) as client:
        results = await gather_batches(
            client,
            requests_path,
            max_requests_per_batch=int(os.environ["PER_BATCH"]),
            max_concurrency=1,
            state_path=state_path,
            poll_interval=0.02,
            max_interval=0.1,
        )
    rows = [[r.custom_id, r.status_code, r.text, r.error_code] for r in results]
    await asyncio.to_thread(lambda: open(out_path, "wb").write(orjson.dumps(rows)))
    print("DONE", flush=True)


asyncio.run(main())
'''


# Rows answered 503 the first time: their shards (the first two) get a follow-up shard each.
FLAKY_ROWS = ("request-7", "request-150")


class GatedFlakyEcho(Engine):
    """Echoes each request once its gate is open (closed: jobs stay IN_PROGRESS), except the
    first attempt of FLAKY_ROWS, answered 503 (so gather resubmits them)."""

    def __init__(self, *, open_gate: bool = True) -> None:
        self.gate = asyncio.Event()
        if open_gate:
            self.gate.set()
        self.failures_left = set(FLAKY_ROWS)
        self._echo = EchoEngine()

    async def respond(
        self, endpoint: str, body: Any, *, custom_id: str, created: int
    ) -> EngineReply:
        await self.gate.wait()
        if custom_id in self.failures_left:
            self.failures_left.discard(custom_id)
            return EngineReply(
                status_code=503,
                body={"error": {"message": "overloaded, try later", "type": "server_error"}},
                error_message="overloaded, try later",
                error_code="server_error",
            )
        return self._echo.respond_now(endpoint, body, custom_id=custom_id, created=created)


def outcome(results: list[BatchResult]) -> list[list[Any]]:
    return [[r.custom_id, r.status_code, r.text, r.error_code] for r in results]


async def recorded_shards(state_path: Path) -> list[ShardRecord]:
    manifest = await Manifest.open(state_path)
    try:
        return await manifest.shards()
    finally:
        await manifest.aclose()


async def wait_until(condition: Callable[[], bool], what: str, *, seconds: float = 30.0) -> None:
    """Poll a condition of the in-process emulator (it offers no event), bounded."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


class Driver:
    """The driver script as a subprocess of this test."""

    def __init__(self, tmp_path: Path, emulator: Emulator, requests_path: Path) -> None:
        self.script = tmp_path / "driver.py"
        self.emulator = emulator
        self.requests_path = requests_path
        self.state_path = tmp_path / "state.sqlite"
        self.out_path = tmp_path / "results.json"
        self.log_path = tmp_path / "driver.log"

    async def start(self, **env: str) -> asyncio.subprocess.Process:
        await anyio.Path(self.script).write_text(DRIVER)
        environment = {**os.environ, "PER_BATCH": str(PER_BATCH), **env}
        log = await anyio.to_thread.run_sync(lambda: self.log_path.open("ab"))
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                str(self.script),
                self.emulator.base_url,
                self.emulator.api_key,
                str(self.requests_path),
                str(self.state_path),
                str(self.out_path),
                env=environment,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        finally:
            log.close()

    async def run_until(self, stage: str, at: int, **env: str) -> asyncio.subprocess.Process:
        """Start with CRASH_STAGE set; return once the process says it reached the stage."""
        process = await self.start(CRASH_STAGE=stage, CRASH_AT=str(at), **env)
        assert process.stdout is not None
        with anyio.fail_after(MARKER_TIMEOUT):
            line = await process.stdout.readline()
        if line.strip() != f"REACHED {stage}".encode():
            process.kill()
            await process.wait()
            log = await anyio.Path(self.log_path).read_text()
            raise AssertionError(f"the driver never reached {stage}: {line!r}\n{log[-3000:]}")
        return process

    async def run_to_the_end(self) -> list[list[Any]]:
        process = await self.start()
        with anyio.fail_after(RUN_TIMEOUT):
            await process.communicate()
        if process.returncode != 0:
            log = await anyio.Path(self.log_path).read_text()
            raise AssertionError(f"the rerun failed ({process.returncode}):\n{log[-3000:]}")
        rows: list[list[Any]] = orjson.loads(await anyio.Path(self.out_path).read_bytes())
        return rows


async def sigkill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    with anyio.fail_after(30):
        await process.wait()
    assert process.returncode == -signal.SIGKILL


@pytest.fixture
async def requests_path(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    await anyio.Path(path).write_bytes(chat_file(ROWS))
    return path


@pytest.fixture
async def uninterrupted(make_emulator: MakeEmulator, requests_path: Path) -> list[list[Any]]:
    """What an uninterrupted run of the same input gives (on an emulator of its own)."""
    emulator = await make_emulator(engine=GatedFlakyEcho())
    async with AsyncTogether(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        results = await gather_batches(
            client, requests_path, max_requests_per_batch=PER_BATCH, poll_interval=0.02
        )
    return outcome(results)


async def stored_inputs(emulator: Emulator) -> list[Any]:
    """The batch input files the emulator stores as uploaded and processed.

    Left out: a PUT that completed in the killed process whose preprocess call never came
    (the client never got a file back, so uploading again is right).
    """
    files = await emulator.storage.list_files()
    return [f for f in files if f.purpose == "batch-api" and f.state == "processed"]


def check_recorded_steps(stage: str, steps: list[ShardStep]) -> None:
    """What the state file says after a kill at `stage` (shards are uploaded in order)."""
    downloaded = sum(1 for step in steps if step.rank >= ShardStep.DOWNLOADED.rank)
    if stage == "mid-upload":  # the second upload was cut
        assert steps[0].rank >= ShardStep.UPLOADED.rank and steps[1] is ShardStep.WRITTEN
    elif stage == "after-upload":  # uploaded, not yet recorded
        assert steps[0] is ShardStep.WRITTEN
    elif stage == "after-create":  # the second job exists; the intent is all that is recorded
        assert steps[1] is ShardStep.CREATING
    elif stage == "mid-watch":
        assert steps == [ShardStep.SUBMITTED] * SHARDS
    elif stage == "mid-download":  # the third file download was cut: one shard has both
        assert downloaded == 1 and ShardStep.FINISHED in steps
    elif stage == "after-download":  # downloaded, not yet recorded
        assert downloaded == 0 and ShardStep.FINISHED in steps
    elif stage == "before-done":  # results on disk, rows not yet accounted for
        assert ShardStep.DOWNLOADED in steps
    elif stage == "after-resubmit":  # a follow-up shard recorded, not yet uploaded
        assert len(steps) > SHARDS and steps[-1] is ShardStep.WRITTEN


STAGES = [
    pytest.param("mid-upload", 2, id="mid-upload"),
    pytest.param("after-upload", 1, id="after-upload"),
    pytest.param("after-create", 2, id="after-create"),
    pytest.param("mid-watch", 1, id="mid-watch"),
    pytest.param("mid-download", 3, id="mid-download"),
    pytest.param("after-download", 1, id="after-download"),
    pytest.param("before-done", 1, id="before-done"),
    pytest.param("after-resubmit", 1, id="after-resubmit"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "at"), STAGES)
async def test_sigkill_then_rerun_repeats_nothing(
    stage: str,
    at: int,
    make_emulator: MakeEmulator,
    tmp_path: Path,
    requests_path: Path,
    uninterrupted: list[list[Any]],
) -> None:
    """A gather process killed at `stage` and run again makes no second job and stores no input
    twice (follow-up shards of resubmitted rows included), and its results equal an
    uninterrupted run's."""
    engine = GatedFlakyEcho(open_gate=stage != "mid-watch")
    emulator = await make_emulator(engine=engine)
    stats = emulator.stats
    driver = Driver(tmp_path, emulator, requests_path)

    process = await driver.run_until(stage, at, CRASH_JOBS=str(SHARDS))
    try:
        if stage == "mid-upload":
            # The storage host has the request of upload `at`, whose body is half sent.
            await wait_until(lambda: stats["PUT", "/upload/{token}"] == at, "the PUT")
            assert len(await stored_inputs(emulator)) == at - 1
        elif stage == "after-upload":
            assert len(await stored_inputs(emulator)) == at
            assert stats.jobs_created.total() == 0
        elif stage == "after-create":
            assert stats.jobs_created.total() == at
        elif stage == "mid-watch":
            jobs = await emulator.storage.list_jobs()
            # The driver stops once a job runs; the others may still be validating.
            statuses = {str(job.status) for job in jobs}
            assert len(jobs) == SHARDS and "IN_PROGRESS" in statuses
            assert statuses <= {"VALIDATING", "IN_PROGRESS"}
        elif stage == "mid-download":
            await wait_until(lambda: stats["GET", "/files/{id}/content"] == at, "the download")
        elif stage == "after-download":
            assert stats["GET", "/files/{id}/content"] == at
    finally:
        await sigkill(process)
    engine.gate.set()
    before = await recorded_shards(driver.state_path)
    check_recorded_steps(stage, [shard.step for shard in before])
    uploads_before = stats["POST", "/files"]
    downloads_before = stats["GET", "/files/{id}/content"]

    results = await driver.run_to_the_end()

    assert results == uninterrupted
    assert sum(1 for row in results if row[1] == 200) == ROWS
    after = await recorded_shards(driver.state_path)
    # The three shards and one follow-up for each of the two with a flaky row.
    assert [shard.parent_id for shard in after] == [None, None, None, 0, 1]
    assert {shard.step for shard in after} == {ShardStep.DONE}
    # One job per input file, and they are the recorded ones.
    assert stats.jobs_created.total() == len(after) and set(stats.jobs_created.values()) == {1}
    assert set(stats.jobs_created) == {shard.file_id for shard in after}
    # Each shard's bytes were stored once (the killed PUT never completed a file).
    stored = await stored_inputs(emulator)
    assert sorted(f.id for f in stored) == sorted(str(shard.file_id) for shard in after)
    assert stats["POST", "/files/{id}/preprocess"] == len(after)
    # No recorded file is left behind: a file whose id was recorded before its PUT is either
    # the shard's input now or deleted by the rerun, never left pending on the server. (A
    # file whose POST answer came in the last moments before the kill has no record.)
    held = {f.id for f in await emulator.storage.list_files(include_pending=True)}
    inputs = {shard.file_id for shard in after}
    recorded_pending = {s.file_id for s in before if s.step is ShardStep.WRITTEN and s.file_id}
    assert not (recorded_pending - inputs) & held
    if stage == "mid-upload":  # the cut PUT's file was recorded, then deleted and redone
        assert before[1].file_id in recorded_pending - inputs
    # The rerun uploaded only shards with no complete file, and downloaded only the files of
    # shards not recorded as downloaded. A killed PUT's file is uploaded again.
    recorded_uploads = sum(1 for shard in before if shard.file_id is not None)
    recorded_uploads -= len(recorded_pending - inputs)
    assert stats["POST", "/files"] - uploads_before == len(after) - recorded_uploads
    downloaded_before = {s.id for s in before if s.step.rank >= ShardStep.DOWNLOADED.rank}
    files_to_fetch = sum(
        (shard.output_file_id is not None) + (shard.error_file_id is not None)
        for shard in after
        if shard.id not in downloaded_before
    )
    assert stats["GET", "/files/{id}/content"] - downloads_before == files_to_fetch


@pytest.mark.slow
async def test_a_second_process_on_a_held_state_file_is_refused_and_sends_nothing(
    make_emulator: MakeEmulator, tmp_path: Path, requests_path: Path
) -> None:
    """While one gather process holds the state file, a second one on it fails at once with a
    clear error and sends no request; once the first is SIGKILLed, the lock is gone."""
    engine = GatedFlakyEcho(open_gate=False)
    emulator = await make_emulator(engine=engine)
    driver = Driver(tmp_path, emulator, requests_path)
    first = await driver.run_until("mid-watch", 1, CRASH_JOBS=str(SHARDS))
    try:
        second = await driver.start()
        with anyio.fail_after(RUN_TIMEOUT):
            await second.communicate()
        assert second.returncode == 1
        log = await anyio.Path(driver.log_path).read_text()
        assert "InvalidArgumentError" in log and "state.sqlite" in log
        # The first process may poll meanwhile; the second made no upload and no job.
        assert emulator.stats["POST", "/files"] == SHARDS
        assert emulator.stats.jobs_created.total() == SHARDS
    finally:
        await sigkill(first)
    engine.gate.set()
    results = await driver.run_to_the_end()
    assert len(results) == ROWS


# --- the emulator killed mid-job ------------------------------------------------------------


class EmulatorProcess:
    """`python -m together_async.emulator` as a subprocess, restartable on the same port."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "emulator-data"
        self.log_path = tmp_path / "emulator.log"
        self.port = 0
        self.storage_port = 0
        self.base_url = ""
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, *options: str) -> None:
        log = await anyio.to_thread.run_sync(lambda: self.log_path.open("ab"))
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "together_async.emulator",
                "--port",
                str(self.port),
                "--storage-port",
                str(self.storage_port),
                "--data-dir",
                str(self.data_dir),
                "--api-key",
                "emulator-crash-key",
                "--latency",
                "0.004",
                "--concurrency",
                "2",
                *options,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        finally:
            log.close()
        assert self.process.stdout is not None
        with anyio.fail_after(MARKER_TIMEOUT):
            line = (await self.process.stdout.readline()).decode()
        assert "ready" in line, line
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        self.base_url = fields["base_url"]
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/")[0])
        self.storage_port = int(fields["storage_url"].rsplit(":", 1)[1])
        self.starts += 1

    async def kill(self) -> None:
        assert self.process is not None
        await sigkill(self.process)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            try:
                with anyio.fail_after(15):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def emulator_process(tmp_path: Path) -> AsyncIterator[EmulatorProcess]:
    served = EmulatorProcess(tmp_path)
    await served.start()
    yield served
    await served.stop()


@contextlib.asynccontextmanager
async def client_for(served: EmulatorProcess) -> AsyncIterator[AsyncTogether]:
    config = ClientConfig(
        api_key="emulator-crash-key",
        base_url=served.base_url,
        max_retries=8,
        retry_wait_initial=0.01,
        retry_wait_max=0.2,
        retry_wait_jitter=0.01,
    )
    async with AsyncTogether.from_config(config) as client:
        yield client


def failed_polls(caplog: pytest.LogCaptureFixture) -> int:
    """Status polls the watcher logged as failed for want of a connection."""
    return sum(
        1
        for record in caplog.records
        if record.name == "together_async.watch" and "APIConnectionError" in record.getMessage()
    )


async def until(poll: Callable[[], Awaitable[bool]], *, seconds: float = 30.0) -> None:
    """Poll a remote condition, bounded (a remote server offers no event to wait on)."""
    with anyio.fail_after(seconds):
        while not await poll():  # noqa: ASYNC110
            await anyio.sleep(0.02)


@pytest.mark.slow
async def test_stream_status_rides_through_an_emulator_crash(
    emulator_process: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the emulator mid-job and restart it on the same data dir and port: the status
    stream keeps going to COMPLETED, progress never goes back, and every row is answered once."""
    caplog.set_level(logging.INFO, logger="together_async.watch")
    served = emulator_process
    rows = 1_000
    async with client_for(served) as client:
        uploaded = await client.files.upload(chat_file(rows))
        job = await client.batches.create_batch(uploaded.id, CHAT)
        states: list[BatchJob] = []
        crashed = anyio.Event()

        async def follow() -> None:
            stream = client.batches.stream_status(
                job.id, poll_interval=0.02, max_interval=0.2, max_consecutive_failures=100
            )
            async for state in stream:
                states.append(state)

        async def crash_mid_job() -> None:
            async def partly_done() -> bool:
                current = await client.batches.get_batch(job.id)
                return 10.0 <= (current.progress or 0.0) < 80.0

            await until(partly_done)
            await served.kill()
            crashed.set()
            await served.start()

        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            group.start_soon(crash_mid_job)

        assert crashed.is_set() and served.starts == 2
        assert failed_polls(caplog) >= 1
        final = states[-1]
        assert final.status == "COMPLETED"
        assert [str(s.status) for s in states].count("COMPLETED") == 1
        progress = [s.progress or 0.0 for s in states]
        assert progress == sorted(progress)
        assert final.output_file_id is not None
        ids = [result.custom_id async for result in client.batches.results(final)]
    assert sorted(ids) == sorted(f"request-{i}" for i in range(rows))


@pytest.mark.slow
async def test_gather_rides_through_an_emulator_crash(
    emulator_process: EmulatorProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the emulator while gather's jobs run, restart it: gather completes with every row
    once, in order, and one job per shard."""
    caplog.set_level(logging.INFO, logger="together_async.watch")
    served = emulator_process
    rows = [
        {"custom_id": f"row-{i}", "body": {"messages": [{"role": "user", "content": f"q{i}"}]}}
        for i in range(1_200)
    ]
    async with client_for(served) as client:
        results: list[BatchResult] = []

        async def run() -> None:
            results.extend(
                await gather_batches(
                    client,
                    rows,
                    model="m",
                    max_requests_per_batch=400,
                    state_path=tmp_path / "state.sqlite",
                    poll_interval=0.02,
                    max_interval=0.2,
                )
            )

        async def crash_while_jobs_run() -> None:
            # Killed while every job runs, so only status polls meet the dead server.
            async def all_created_and_running() -> bool:
                jobs = await client.batches.list_batches()
                return (
                    len(jobs) == 3
                    and not any(job.is_terminal for job in jobs)
                    and any((job.progress or 0) > 0 for job in jobs)
                )

            await until(all_created_and_running)
            await served.kill()
            await served.start()

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            group.start_soon(crash_while_jobs_run)

        assert served.starts == 2 and failed_polls(caplog) >= 1
        assert [r.custom_id for r in results] == [row["custom_id"] for row in rows]
        assert [r.text for r in results] == [f"q{i}" for i in range(1_200)]
        jobs = await client.batches.list_batches()
    assert len(jobs) == 3 and len({job.input_file_id for job in jobs}) == 3
    assert {str(job.status) for job in jobs} == {"COMPLETED"}


@pytest.mark.slow
async def test_gather_survives_an_emulator_killed_again_and_again(
    emulator_process: EmulatorProcess, tmp_path: Path
) -> None:
    """The emulator SIGKILLed three times during one gather, whatever it is doing (uploads,
    creates, polls, downloads), restarted each time on the same data dir: the gather completes,
    every row once and in order, one job per input file and one stored copy of each shard."""
    served = emulator_process
    rows = [
        {"custom_id": f"row-{i}", "body": {"messages": [{"role": "user", "content": f"q{i}"}]}}
        for i in range(1_500)
    ]
    config = ClientConfig(
        api_key="emulator-crash-key",
        base_url=served.base_url,
        max_retries=30,
        retry_wait_initial=0.05,
        retry_wait_max=0.3,
        retry_wait_jitter=0.02,
    )
    finished = anyio.Event()
    results: list[BatchResult] = []
    async with AsyncTogether.from_config(config) as client:

        async def run() -> None:
            try:
                results.extend(
                    await gather_batches(
                        client,
                        rows,
                        model="m",
                        max_requests_per_batch=100,
                        max_concurrency=2,
                        state_path=tmp_path / "state.sqlite",
                        poll_interval=0.02,
                        max_interval=0.2,
                    )
                )
            finally:
                finished.set()

        async def kill_now_and_then() -> None:
            # Chaos, not synchronisation: the kills land wherever the run happens to be.
            for pause in (0.15, 0.25, 0.2):
                with anyio.move_on_after(pause):
                    await finished.wait()
                if finished.is_set():
                    return
                await served.kill()
                await served.start()

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            group.start_soon(kill_now_and_then)

        assert served.starts >= 2
        assert [r.custom_id for r in results] == [row["custom_id"] for row in rows]
        assert [r.text for r in results] == [f"q{i}" for i in range(1_500)]
        jobs = await client.batches.list_batches()
        files = await client.files.list()
    shards = await recorded_shards(tmp_path / "state.sqlite")
    assert len(shards) == 15
    per_file = Counter(job.input_file_id for job in jobs)
    assert per_file == Counter({shard.file_id: 1 for shard in shards})
    inputs = [f.id for f in files.data if f.purpose == "batch-api"]
    assert sorted(inputs) == sorted(str(shard.file_id) for shard in shards)
