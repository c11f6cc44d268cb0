"""The emulator's job runner: VALIDATING -> IN_PROGRESS -> a terminal status, for real.

Validation uses the client's own rules (`_jsonl.check_batch_file`). Finished rows are appended
to partial result files and committed durably (fsync, then a SQLite record of which input lines
they were), so a job killed mid-way resumes with the rows it has not finished yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import orjson

from .._jsonl import BatchFileReport, LineSplitter, check_batch_file
from .engines import Engine, EngineReply
from .storage import IO_CHUNK, FileRecord, JobRecord, Storage, in_thread, new_file_id

__all__ = ["JobRunner", "RunnerSettings", "parse_completion_window"]

logger = logging.getLogger("together_async.emulator.jobs")

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Rows answered between two yields to the event loop on the instant path (about 10 ms of work).
_INSTANT_SLICE = 256


MAX_COMPLETION_WINDOW = 366 * 86400.0


def parse_completion_window(window: str) -> float:
    """Seconds in a completion window such as "24h", "90m" or "2d"; ValueError otherwise."""
    text = window.strip().lower()
    unit = _WINDOW_UNITS.get(text[-1:]) if text else None
    try:
        amount = float(text[:-1]) if unit else float("nan")
    except ValueError:
        amount = float("nan")
    if unit is None or not amount > 0:
        raise ValueError(f'completion_window must look like "24h", got {window!r}')
    seconds = amount * unit
    # Bounded so that every deadline is a real date (an "infh" or "1e10h" window would make
    # a job that no answer can show), and a year is far beyond any batch.
    if not seconds <= MAX_COMPLETION_WINDOW:
        raise ValueError(f"completion_window may be at most 366 days, got {window!r}")
    return seconds


@attrs.frozen(kw_only=True)
class RunnerSettings:
    """How the runner behaves.

    Args:
        concurrency: requests in flight at once per job (engines that are not instant).
        latency: seconds each request takes, simulated (0 keeps the instant fast path).
        time_factor: scales the completion window: 0.001 turns "24h" into 86.4 s.
        validation_delay: seconds each job spends in VALIDATING at least.
        max_lines: most request lines in an input file.
        max_bytes: most bytes in an input file.
        commit_interval: seconds between durable commits of finished rows.
        commit_rows: finished rows that trigger a commit before the interval is up.
        seed: seeds the order of the output lines.
    """

    concurrency: int = 32
    latency: float = 0.0
    time_factor: float = 1.0
    validation_delay: float = 0.0
    max_lines: int = 50_000
    max_bytes: int = 100 * 1024 * 1024
    commit_interval: float = 0.25
    commit_rows: int = 5000
    seed: int = 0


class _JobStopped(Exception):
    """Internal: the job was cancelled or ran out of time."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class _ResultWriter:
    """Appends finished rows to a job's partial output and error files and commits them.

    Rows gather in memory; a commit writes them (in a shuffled order, like the real service's
    output), fsyncs both files, then records the committed sizes and the rows' input line
    numbers in SQLite. At most one commit is in flight while the next rows gather.
    """

    def __init__(
        self,
        storage: Storage,
        job: JobRecord,
        settings: RunnerSettings,
        output_handle: BinaryIO,
        error_handle: BinaryIO,
    ) -> None:
        self._storage = storage
        self._job_id = job.id
        self._total = job.total_rows
        self._settings = settings
        self._output = output_handle
        self._errors = error_handle
        self.output_rows = job.output_rows
        self.error_rows = job.error_rows
        self.output_bytes = job.output_bytes
        self.error_bytes = job.error_bytes
        self._pending_output: list[bytes] = []
        self._pending_errors: list[bytes] = []
        self._pending_lines = array("I")
        self._last_commit = time.monotonic()
        self._inflight: asyncio.Future[None] | None = None
        self._rng = random.Random(f"{settings.seed}:{job.id}:{job.done_rows}")
        self._row_prefix = "batch_req_" + job.id.replace("-", "")[:12]

    @property
    def pending(self) -> int:
        """Finished rows not committed yet."""
        return len(self._pending_lines)

    def add(self, line: int, custom_id: str, reply: EngineReply) -> None:
        """Take one finished row (cheap: encoding only, no I/O)."""
        if reply.ok:
            row: dict[str, Any] = {
                "id": f"{self._row_prefix}{line:08x}",
                "custom_id": custom_id,
                "response": {"status_code": reply.status_code, "body": reply.body},
                "error": None,
            }
            self._pending_output.append(orjson.dumps(row))
        else:
            row = {
                "id": f"{self._row_prefix}{line:08x}",
                "custom_id": custom_id,
                "error": {
                    "message": reply.error_message or f"HTTP {reply.status_code}",
                    "code": reply.error_code,
                },
            }
            if reply.status_code is not None:
                row["response"] = {"status_code": reply.status_code, "body": reply.body}
            self._pending_errors.append(orjson.dumps(row))
        self._pending_lines.append(line)

    async def maybe_commit(self) -> None:
        """Start a commit when enough rows gathered or the interval passed."""
        settings = self._settings
        while self._pending_lines:
            due = (
                len(self._pending_lines) >= settings.commit_rows
                or time.monotonic() - self._last_commit >= settings.commit_interval
            )
            if not due:
                return
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                # Let the commit in flight finish while rows gather, up to a bound on memory.
                if len(self._pending_lines) < 4 * settings.commit_rows:
                    return
                await asyncio.shield(inflight)
                continue
            if inflight is not None:
                inflight.result()
            self._inflight = asyncio.ensure_future(self._commit(*self._take()))
            return

    async def drain(self) -> None:
        """Commit every row taken so far and wait until it is durable."""
        while True:
            inflight = self._inflight
            if inflight is not None:
                # Shielded and kept in self._inflight: if this wait is cancelled, the next
                # drain() waits for the same commit instead of starting a concurrent one.
                await asyncio.shield(inflight)
                if self._inflight is inflight:
                    self._inflight = None
                inflight.result()
            if not self._pending_lines:
                return
            self._inflight = asyncio.ensure_future(self._commit(*self._take()))

    def _take(self) -> tuple[list[bytes], list[bytes], array[int]]:
        taken = (self._pending_output, self._pending_errors, self._pending_lines)
        self._pending_output, self._pending_errors = [], []
        self._pending_lines = array("I")
        self._last_commit = time.monotonic()
        return taken

    async def _commit(self, output: list[bytes], errors: list[bytes], lines: array[int]) -> None:
        output_count, error_count = len(output), len(errors)
        output_size, error_size = await in_thread(self._write_blocking, output, errors)
        self.output_bytes += output_size
        self.error_bytes += error_size
        self.output_rows += output_count
        self.error_rows += error_count
        done = self.output_rows + self.error_rows
        await self._storage.record_commit(
            self._job_id,
            lines=lines.tobytes(),
            output_rows=self.output_rows,
            error_rows=self.error_rows,
            output_bytes=self.output_bytes,
            error_bytes=self.error_bytes,
            progress=round(100.0 * done / self._total, 2) if self._total else 0.0,
        )

    def _write_blocking(self, output: list[bytes], errors: list[bytes]) -> tuple[int, int]:
        sizes = []
        for handle, rows in ((self._output, output), (self._errors, errors)):
            if not rows:
                sizes.append(0)
                continue
            # The real service does not keep input order either; callers must match custom_ids.
            self._rng.shuffle(rows)
            rows.append(b"")  # for the final newline (the counts were taken before)
            data = b"\n".join(rows)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            sizes.append(len(data))
        return sizes[0], sizes[1]


class _InputReader:
    """Reads an input file's request lines in worker threads, about 1 MiB per hop."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle: BinaryIO | None = None
        self._splitter = LineSplitter()
        self._next_line = 0
        self._eof = False

    async def next_lines(self) -> list[tuple[int, bytes]]:
        """The next batch of (0-based line number, line); empty at the end."""
        if self._eof:
            return []
        return await in_thread(self._read_blocking)

    def _read_blocking(self) -> list[tuple[int, bytes]]:
        if self._handle is None:
            self._handle = self._path.open("rb")
        while True:
            chunk = self._handle.read(IO_CHUNK)
            lines = self._splitter.feed(chunk) if chunk else []
            if not chunk:
                self._eof = True
                last = self._splitter.flush()
                if last is not None:
                    lines.append(last)
            if lines or self._eof:
                start = self._next_line
                self._next_line += len(lines)
                return list(enumerate(lines, start))

    def close(self) -> None:
        """Close the file (blocking, but a close of a read-only file is instant)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class JobRunner:
    """Runs every unfinished job as a background task, and resumes them after a restart."""

    def __init__(
        self,
        storage: Storage,
        engine: Engine,
        settings: RunnerSettings,
        *,
        on_finished: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self._storage = storage
        self._engine = engine
        self._settings = settings
        self._on_finished = on_finished
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_events: dict[str, asyncio.Event] = {}
        self._closed = False

    @property
    def settings(self) -> RunnerSettings:
        """The runner's settings."""
        return self._settings

    def deadline_for(self, created_at: float, completion_window: str) -> float:
        """When a job created at `created_at` expires (unix seconds), after the time factor."""
        return created_at + parse_completion_window(completion_window) * self._settings.time_factor

    async def start(self) -> None:
        """Resume the jobs a previous run left unfinished."""
        for job in await self._storage.unfinished_jobs():
            logger.info("resuming batch job %s (%s)", job.id, job.status)
            self.launch(job.id)

    def launch(self, job_id: str) -> None:
        """Start running a stored job in the background."""
        if self._closed:
            raise RuntimeError("the job runner is closed")
        self._cancel_events[job_id] = asyncio.Event()
        task = asyncio.create_task(self._run(job_id), name=f"batch-job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._cancel_events.pop(job_id, None)

    async def cancel(self, job_id: str, *, wait: float = 0.0) -> JobRecord | None:
        """Ask a running job to stop; it turns CANCELLED keeping its finished rows.

        With `wait` > 0, wait up to that many seconds for the job to get there, and return
        the job as it is then.
        """
        job = await self._storage.request_cancel(job_id)
        event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()
        task = self._tasks.get(job_id)
        if wait > 0 and task is not None:
            await asyncio.wait({task}, timeout=wait)
            job = await self._storage.get_job(job_id)
        return job

    async def wait_idle(self) -> None:
        """Wait until no job is running (for tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        """Stop every job where it is; committed rows stay, and a restart resumes them."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one job -----------------------------------------------------------------------------

    async def _run(self, job_id: str) -> None:
        try:
            job = await self._storage.get_job(job_id)
            if job is None:
                return
            if job.status == "VALIDATING":
                job = await self._validate(job)
            if job.status == "IN_PROGRESS":
                await self._execute(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in the emulator must not leave a job hanging in IN_PROGRESS forever.
            logger.exception("batch job %s crashed", job_id)
            with contextlib.suppress(Exception):
                await self._finish(job_id, "FAILED", error="internal emulator error")

    async def _until_stopped(self, job: JobRecord, work: asyncio.Future[Any]) -> str | None:
        """Wait for `work`; on cancel or deadline, cancel it and return the terminal status."""
        event = self._cancel_events.get(job.id) or asyncio.Event()
        if job.cancel_requested:
            event.set()
        cancel_wait = asyncio.ensure_future(event.wait())
        try:
            remaining = max(0.0, job.job_deadline - time.time())
            done, _ = await asyncio.wait(
                {work, cancel_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cancel_wait.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, cancel_wait, return_exceptions=True)
        if work in done and not work.cancelled():
            work.result()
            return None
        return "CANCELLED" if cancel_wait in done else "EXPIRED"

    async def _validate(self, job: JobRecord) -> JobRecord:
        path = self._storage.body_path(job.input_file_id)
        settings = self._settings

        async def validate() -> tuple[BatchFileReport, str | None]:
            if settings.validation_delay > 0:
                await asyncio.sleep(settings.validation_delay)
            return await asyncio.to_thread(self._validate_blocking, path, job.endpoint)

        work = asyncio.ensure_future(validate())
        try:
            stopped = await self._until_stopped(job, work)
        except FileNotFoundError:
            return await self._finish(job.id, "FAILED", error="the input file no longer exists")
        if stopped is not None:
            return await self._finish(job.id, stopped)
        report, first_model = work.result()
        if not report.ok:
            shown = "; ".join(str(problem) for problem in report.problems[:5])
            more = report.problem_count - min(5, len(report.problems))
            suffix = f" (and {more} more problems)" if more > 0 else ""
            return await self._finish(
                job.id, "FAILED", error=f"Input file validation failed: {shown}{suffix}"
            )
        return await self._storage.update_job(
            job.id,
            status="IN_PROGRESS",
            total_rows=report.lines,
            model_id=job.model_id or first_model,
            progress=0.0,
        )

    def _validate_blocking(self, path: Path, endpoint: str) -> tuple[BatchFileReport, str | None]:
        settings = self._settings
        report = check_batch_file(
            path, endpoint=endpoint, max_lines=settings.max_lines, max_bytes=settings.max_bytes
        )
        first_model: str | None = None
        if report.ok:
            with path.open("rb") as handle:
                first = orjson.loads(handle.readline())
            model = first.get("body", {}).get("model")
            first_model = model if isinstance(model, str) and model else None
        return report, first_model

    async def _execute(self, job: JobRecord) -> None:
        if job.cancel_requested:
            await self._finish(job.id, "CANCELLED")
            return
        job_dir = self._storage.job_dir(job.id)
        done = bytearray(job.total_rows)
        for blob in await self._storage.committed_lines(job.id):
            for line in array("I", blob):
                done[line] = 1
        output_handle, error_handle = await in_thread(
            self._open_partials, job, job_dir, on_abandon=_close_pair
        )
        writer = _ResultWriter(self._storage, job, self._settings, output_handle, error_handle)
        reader = _InputReader(self._storage.body_path(job.input_file_id))
        try:
            work = asyncio.ensure_future(self._answer_rows(job, reader, done, writer))
            stopped = await self._until_stopped(job, work)
            await writer.drain()
        finally:
            # Also on shutdown: rows already answered are committed before the runner stops.
            with contextlib.suppress(Exception):
                await writer.drain()
            await in_thread(_close_all, reader, output_handle, error_handle)
        await self._finish(job.id, stopped or "COMPLETED", writer=writer)

    @staticmethod
    def _open_partials(job: JobRecord, job_dir: Path) -> tuple[BinaryIO, BinaryIO]:
        job_dir.mkdir(parents=True, exist_ok=True)
        handles = []
        for name, committed in (
            ("output.jsonl", job.output_bytes),
            ("errors.jsonl", job.error_bytes),
        ):
            path = job_dir / name
            # Bytes past the committed size were written by a run that died before recording
            # them: those rows are not marked done and will be answered again.
            with path.open("ab") as handle:
                handle.truncate(committed)
            handles.append(path.open("ab"))
        return handles[0], handles[1]

    async def _answer_rows(
        self, job: JobRecord, reader: _InputReader, done: bytearray, writer: _ResultWriter
    ) -> None:
        engine = self._engine
        if engine.instant and self._settings.latency <= 0:
            await self._answer_instantly(job, reader, done, writer)
        else:
            await self._answer_concurrently(job, reader, done, writer)

    async def _answer_instantly(
        self, job: JobRecord, reader: _InputReader, done: bytearray, writer: _ResultWriter
    ) -> None:
        respond = self._engine.respond_now
        endpoint = job.endpoint
        created = int(job.created_at)
        loads = orjson.loads
        while batch := await reader.next_lines():
            todo = [(index, line) for index, line in batch if not done[index]]
            for start in range(0, len(todo), _INSTANT_SLICE):
                for index, line in todo[start : start + _INSTANT_SLICE]:
                    request = loads(line)
                    custom_id = request["custom_id"]
                    try:
                        reply = respond(
                            endpoint, request.get("body"), custom_id=custom_id, created=created
                        )
                    except Exception as exc:
                        reply = _engine_failure(exc)
                    writer.add(index, custom_id, reply)
                await writer.maybe_commit()
                # Lets API calls (status polls, cancel) in between slices of rows.
                await asyncio.sleep(0)

    async def _answer_concurrently(
        self, job: JobRecord, reader: _InputReader, done: bytearray, writer: _ResultWriter
    ) -> None:
        concurrency = max(1, self._settings.concurrency)
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=4 * concurrency)
        latency = self._settings.latency
        engine = self._engine
        created = int(job.created_at)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                index, line = item
                request = orjson.loads(line)
                custom_id = request["custom_id"]
                if latency > 0:
                    await asyncio.sleep(latency)
                try:
                    reply = await engine.respond(
                        job.endpoint, request.get("body"), custom_id=custom_id, created=created
                    )
                except Exception as exc:
                    reply = _engine_failure(exc)
                writer.add(index, custom_id, reply)
                await writer.maybe_commit()

        workers = [asyncio.ensure_future(work()) for _ in range(concurrency)]
        try:
            while batch := await reader.next_lines():
                for index, line in batch:
                    if not done[index]:
                        await queue.put((index, line))
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _finish(
        self,
        job_id: str,
        status: str,
        *,
        error: str | None = None,
        writer: _ResultWriter | None = None,
    ) -> JobRecord:
        job = await self._storage.get_job(job_id)
        assert job is not None
        new_files: list[FileRecord] = []
        fields: dict[str, Any] = {"status": status, "completed_at": time.time(), "error": error}
        if writer is not None:
            job_dir = self._storage.job_dir(job_id)
            for name, rows, size, field in (
                ("output.jsonl", writer.output_rows, writer.output_bytes, "output_file_id"),
                ("errors.jsonl", writer.error_rows, writer.error_bytes, "error_file_id"),
            ):
                if rows == 0:
                    continue
                file_id = new_file_id()
                # A hard link, not a move: if we die before the commit below, the partial file
                # is still where a resumed run expects it (the link is an orphan, swept later).
                await in_thread(_link_durably, job_dir / name, self._storage.body_path(file_id))
                kind = "output" if field == "output_file_id" else "errors"
                new_files.append(
                    FileRecord(
                        id=file_id,
                        filename=f"batch_{job_id}_{kind}.jsonl",
                        purpose="batch-generated",
                        file_type="jsonl",
                        bytes=size,
                        created_at=int(time.time()),
                        checksum=None,
                        state="processed",
                    )
                )
                fields[field] = file_id
            total = job.total_rows
            done = writer.output_rows + writer.error_rows
            fields["progress"] = (
                100.0
                if status == "COMPLETED"
                else (round(100.0 * done / total, 2) if total else 0.0)
            )
        finished = await self._storage.finish_job(job_id, new_files=new_files, **fields)
        await asyncio.to_thread(shutil.rmtree, self._storage.jobs_dir / job_id, True)
        await self._storage.purge_if_deleted(job.input_file_id)
        logger.info("batch job %s finished: %s", job_id, status)
        if self._on_finished is not None:
            self._on_finished(finished)
        return finished


def _engine_failure(exc: Exception) -> EngineReply:
    logger.exception("the engine failed on a request", exc_info=exc)
    return EngineReply(
        status_code=500,
        body={"error": {"message": "internal engine error", "type": "server_error"}},
        error_message=f"engine error: {type(exc).__name__}",
        error_code="internal_error",
    )


def _close_pair(handles: tuple[BinaryIO, BinaryIO]) -> None:
    for handle in handles:
        handle.close()


def _close_all(reader: _InputReader, *handles: BinaryIO) -> None:
    reader.close()
    for handle in handles:
        handle.close()


def _link_durably(source: Path, target: Path) -> None:
    os.link(source, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
