"""gather_batches / stream_batches: any number of requests as batch jobs, every row accounted for.

`BatchRun` is the engine (`await run.gather()`, `async for r in run.stream()`, `run.summary`);
`gather_batches` and `stream_batches` are thin functions over it.

How a run goes, and why:
1. One streaming pass over the input normalises every row, names missing custom_ids after their
   position, checks everything (duplicates included) and writes the rows straight into shard
   files within both limits (lines and bytes), hashing them into a fingerprint. Problems are
   reported for the whole input before anything is uploaded; memory holds one chunk of rows and
   a set of 64-bit id hashes, never the dataset (see `_sharding.InputSharder`).
2. Every shard then lives its own life in a task: upload (at most `max_concurrency` at once),
   record a create intent, create the job, wait for it on the ONE shared `BatchWatcher` (one
   `list_batches` call per tick however many jobs), download its output and error files to
   disk (at most `max_concurrency` shards at once, never waiting behind uploads), and account
   for each of its rows (at most `max_concurrency` shards at once, reading one chunk at a
   time). Rows that failed retryably (408, 429, 5xx, timeouts) or got no result from an
   EXPIRED or CANCELLED job go into one follow-up shard, up to `max_attempts`; rows of a FAILED
   job get its error as their final result (a job that fails validation would fail again).
   One follow-up per finished shard keeps every shard's lineage simple to resume.
3. Every step is recorded in a `Manifest` (SQLite) before the next starts, so the same call
   after a crash picks up where the last one stopped: no shard uploaded twice, no job created
   twice (the intent is recorded before create_batch and reconciled with list_batches after a
   crash), no finished shard downloaded twice, and results equal to an uninterrupted run's
   (finished shards are replayed from their downloaded files). Without `state_path` the same
   machinery runs in a temporary directory that is removed at the end.
4. Results files are downloaded to disk (atomic rename, Range resume) and then read a chunk at a
   time, rather than decoded straight off the socket: a crash never costs a second download,
   and replaying a finished shard on resume is the same code as reading it the first time.
   stream_batches runs the pipeline in a background task feeding a bounded memory stream, so its
   async generator never yields inside a task group or cancel scope; closing the generator
   cancels that task (and, with cancel_on_exit, the remote jobs).

Every input row ends with exactly one BatchResult; a bitmap of positions checks it as results
are delivered and before the run returns (a break of that promise raises, never passes quietly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union, cast

import anyio
import anyio.abc
import anyio.to_thread
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from ._errors import APIStatusError, InvalidArgumentError, ManifestMismatchError, NotFoundError
from ._jsonl import LineSplitter
from ._models import BatchEndpoint, BatchJob, BatchResult, Endpoint, EndpointPath, FileObject
from ._protocol import require_endpoint, require_text
from ._reconcile import CreateRequest, claim_hook, may_have_made
from ._sharding import InputSharder, ShardAccounting, WrittenShard, ids_path
from ._tempdirs import make_owned_temp_dir, remove_owned_temp_dir
from .batches import create_request
from .manifest import Manifest, ShardRecord, ShardStep
from .progress import observer_for_run
from .watch import BatchWatcher, JobObserver, PollSchedule, check_progress

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup
else:  # the backport anyio itself depends on
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

if TYPE_CHECKING:
    from ._client import AsyncTogether

__all__ = [
    "BatchRun",
    "BatchRunSummary",
    "RequestsInput",
    "gather_batches",
    "stream_batches",
]

logger = logging.getLogger("together_async.gather")

RequestsInput = Union[str, "os.PathLike[str]", Iterable[Any], AsyncIterable[Any]]
"""A path to a JSONL file, or an iterable or async iterable of request lines or bodies."""

MAX_REQUESTS_PER_BATCH = 50_000
MAX_BYTES_PER_BATCH = 100 * 1024 * 1024
_FAILED_FILE = frozenset({"FAILED", "INVALID_FORMAT"})
CLEANUP_TIMEOUT = 30.0
"""Seconds that cancelling remote jobs may take when a run is cancelled or fails."""

_ROWS_PER_HOP = 4096  # rows of an iterable handed to the worker thread at a time
_SETTLE_READ = 256 * 1024  # bytes of a results file settled between two turns of the loop
_STREAM_BUFFER_CHUNKS = 4  # chunks of results stream_batches may hold ahead of its consumer


@attrs.frozen(kw_only=True)
class BatchRunSummary:
    """What a run did, as of when it was taken (`BatchRun.summary` works during a run too).

    Attributes:
        rows: input rows.
        rows_ok: rows with a 2xx result so far.
        rows_failed: rows with a final error so far.
        jobs: batch jobs used (created by this call or found in the state file).
        shards: input files (the original shards plus their follow-ups).
        resubmitted_rows: rows sent again in follow-up jobs.
        attempts: the most times any row was submitted (1 when nothing was resubmitted).
        usage: token usage summed over the responses (`prompt_tokens`, `completion_tokens`,
            `total_tokens`, ...), as read from each response body's `usage`.
        wall_time: seconds from start to end (to now while running).
        resumed: True when the run picked up a state file of an earlier call.
    """

    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    jobs: int = 0
    shards: int = 0
    resubmitted_rows: int = 0
    attempts: int = 0
    usage: Mapping[str, int] = attrs.field(factory=dict)
    wall_time: float = 0.0
    resumed: bool = False


class _Sink(Protocol):
    def start(self, rows: int) -> None: ...

    async def deliver(self, chunk: list[tuple[int, BatchResult]]) -> None: ...


class _ListSink:
    """Collects results by input position (gather)."""

    def __init__(self) -> None:
        self.results: list[BatchResult | None] = []

    def start(self, rows: int) -> None:
        self.results = [None] * rows

    async def deliver(self, chunk: list[tuple[int, BatchResult]]) -> None:
        results = self.results
        for position, result in chunk:
            results[position] = result


class _StreamSink:
    """Hands results to the stream's consumer a chunk at a time, waiting when it lags."""

    def __init__(self, send: MemoryObjectSendStream[list[tuple[int, BatchResult]]]) -> None:
        self._send = send

    def start(self, rows: int) -> None:
        pass

    async def deliver(self, chunk: list[tuple[int, BatchResult]]) -> None:
        await self._send.send(chunk)


class BatchRun:
    """One run of many requests as batch jobs: shard, upload, create, watch, download, resubmit.

    Run it once, with `await run.gather()` (results in input order) or `async for result in
    run.stream()` (results as shards finish, memory bounded by shard size times
    max_concurrency); read `run.summary` during or after. To resume after a crash, make a new
    BatchRun with the same requests and state_path.

    Args:
        client: an open AsyncTogether.
        requests: a path to a JSONL file, or an iterable or async iterable. Items are request
            lines (`{"custom_id"?, "body", "method"?, "url"?}` or BatchRequest) or bare request
            bodies (`{"model", "messages", ...}`), which get wrapped. A missing custom_id
            becomes `request-<position>` (0-based); duplicates raise BatchFileError naming both
            positions before anything is uploaded.
        endpoint: the batch endpoint of every request.
        model: fills `body["model"]` where a body has none (and is sent as the job's model_id).
        max_requests_per_batch: most lines per job (the API allows 50,000).
        max_bytes_per_batch: most bytes per job input file (the API allows 100 MB).
        max_concurrency: most uploads at once, most downloads at once (a separate limit, so a
            finished job's results never wait behind uploads), and most finished shards being
            read at once. Uploads are staggered on purpose: jobs submitted a few at a time
            finish a few at a time, and their results are read while later jobs still run.
        state_path: a SQLite file recording the run, to resume it after a crash (its files go in
            `<state_path>.files/`, kept until you delete them). None: nothing survives the call.
        max_attempts: most times a row is submitted (1 means never resubmit).
        cancel_on_exit: cancel the remote jobs when the run is cancelled or fails. Default: True
            without a state_path (nothing could resume them), False with one (resume instead).
        delete_files: delete the remote input, output and error files of each shard once its
            results are on local disk.
        progress: True for a progress bar of the jobs (needs the `progress` extra), or any
            JobObserver to feed.
        poll_interval, max_interval: how often the jobs are polled; see PollSchedule.
        completion_window: passed to create_batch.

    Example:
        run = BatchRun(client, "requests.jsonl", model="meta-llama/Llama-3-8b-chat-hf")
        results = await run.gather()
        print(run.summary.rows_ok, run.summary.usage)
    """

    def __init__(
        self,
        client: AsyncTogether,
        requests: RequestsInput,
        *,
        endpoint: Endpoint = BatchEndpoint.CHAT_COMPLETIONS,
        model: str | None = None,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
        max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
        max_concurrency: int = 4,
        state_path: str | os.PathLike[str] | None = None,
        max_attempts: int = 3,
        cancel_on_exit: bool | None = None,
        delete_files: bool = False,
        progress: bool | JobObserver = False,
        poll_interval: float = 2.0,
        max_interval: float = 30.0,
        completion_window: str = "24h",
    ) -> None:
        """See the class docstring."""
        self._client = client
        self._requests = _check_requests(requests)
        self._endpoint = _check_endpoint(endpoint)
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise InvalidArgumentError(f"model must be a non-empty string or None, got {model!r}")
        self._model = None if model is None else require_text(model, "model")
        self._max_lines = _check_count(
            "max_requests_per_batch", max_requests_per_batch, limit=MAX_REQUESTS_PER_BATCH
        )
        self._max_bytes = _check_count(
            "max_bytes_per_batch", max_bytes_per_batch, limit=MAX_BYTES_PER_BATCH
        )
        self._max_concurrency = _check_count("max_concurrency", max_concurrency)
        self._max_attempts = _check_count("max_attempts", max_attempts)
        self._state_path = _check_state_path(state_path)
        self._cancel_on_exit = (state_path is None) if cancel_on_exit is None else cancel_on_exit
        self._delete_files = bool(delete_files)
        check_progress(progress)
        self._progress = progress
        PollSchedule(poll_interval=poll_interval, max_interval=max_interval)  # checks them
        self._poll_interval = poll_interval
        self._max_interval = max_interval
        if not isinstance(completion_window, str) or not completion_window.strip():
            raise InvalidArgumentError(
                f"completion_window must be a non-empty string, got {completion_window!r}"
            )
        self._completion_window = require_text(completion_window, "completion_window")
        self._started = False
        self._stats = _Stats()

    @property
    def summary(self) -> BatchRunSummary:
        """The figures of the run so far (final once gather/stream has ended)."""
        return self._stats.snapshot()

    async def gather(self) -> list[BatchResult]:
        """Run every request; their results in input order, one per row."""
        self._claim()
        sink = _ListSink()
        await self._execute(sink)
        results = sink.results
        # _execute checked that every position got exactly one result.
        return [result for result in results if result is not None]

    def stream(self) -> AsyncGenerator[BatchResult, None]:
        """Run every request; their results as shards finish (not in input order).

        The run goes on in a background task owned by the returned iterator: it is cancelled
        (its jobs too, with cancel_on_exit) when the iterator is closed early. Close it
        explicitly if you may stop before the end: `async with contextlib.aclosing(...)`.
        """
        self._claim()
        return self._stream(with_positions=False)

    def stream_with_positions(self) -> AsyncGenerator[tuple[int, BatchResult], None]:
        """Like stream(), each result with its 0-based input position: `(position, result)`.

        For consumers that put results back in input order without holding them all (the
        command line spools them to disk and indexes them by position).
        """
        self._claim()
        return self._stream(with_positions=True)

    # --- running ----------------------------------------------------------------------

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError(
                "a BatchRun runs once; make a new one (with the same state_path to resume)"
            )
        self._started = True

    async def _stream(self, *, with_positions: bool) -> AsyncGenerator[Any, None]:
        send, receive = anyio.create_memory_object_stream[list[tuple[int, BatchResult]]](
            max_buffer_size=_STREAM_BUFFER_CHUNKS
        )
        # A plain task rather than a task group: an async generator must not yield inside a
        # task group or cancel scope. The task never outlives this generator (see finally).
        runner = asyncio.get_running_loop().create_task(self._execute_into(send))
        try:
            with receive:
                async for chunk in receive:
                    if with_positions:
                        for item in chunk:
                            yield item
                    else:
                        for _, result in chunk:
                            yield result
        finally:
            if not runner.done():
                runner.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([runner])
            error = None if runner.cancelled() else runner.exception()
        if error is not None:
            raise error

    async def _execute_into(
        self, send: MemoryObjectSendStream[list[tuple[int, BatchResult]]]
    ) -> None:
        with send:
            await self._execute(_StreamSink(send))

    async def _execute(self, sink: _Sink) -> None:
        self._stats.start()
        workspace = await _Workspace.open(self._state_path)
        try:
            rows, fingerprint, written = await self._shard_input(workspace.scratch)
            self._stats.rows = rows
            sink.start(rows)
            if rows == 0:
                await workspace.check_nothing_recorded()
                return
            settings = {
                "endpoint": self._endpoint,
                "model": self._model,
                "max_requests_per_batch": self._max_lines,
                "max_bytes_per_batch": self._max_bytes,
            }
            resumed = await workspace.adopt(fingerprint, rows, settings, written)
            self._stats.resumed = resumed
            pipeline = _Pipeline(self, workspace, sink, rows)
            await pipeline.run()
        finally:
            with anyio.CancelScope(shield=True):
                await workspace.aclose()
            self._stats.stop()

    async def _shard_input(self, directory: Path) -> tuple[int, str, list[WrittenShard]]:
        requests = self._requests
        source = os.fspath(requests) if isinstance(requests, (str, os.PathLike)) else None
        sharder = InputSharder(
            directory,
            endpoint=self._endpoint,
            model=self._model,
            max_lines=self._max_lines,
            max_bytes=self._max_bytes,
            source=source,
            fingerprint_settings={
                "endpoint": self._endpoint,
                "max_requests_per_batch": self._max_lines,
                "max_bytes_per_batch": self._max_bytes,
            },
        )
        try:
            if source is not None:
                await _feed_file(sharder, source)
            elif isinstance(requests, AsyncIterable):
                chunk: list[Any] = []
                async for item in requests:
                    chunk.append(item)
                    if len(chunk) >= _ROWS_PER_HOP:
                        await anyio.to_thread.run_sync(sharder.add_items, chunk)
                        chunk = []
                await anyio.to_thread.run_sync(sharder.add_items, chunk)
            else:
                # Iterated in the worker thread too: a generator may do blocking work.
                iterator = iter(cast(Iterable[Any], requests))
                while await anyio.to_thread.run_sync(
                    sharder.add_items, islice(iterator, _ROWS_PER_HOP)
                ):
                    pass
            fingerprint = await anyio.to_thread.run_sync(sharder.finish)
        finally:
            await anyio.to_thread.run_sync(sharder.close)
        logger.info("%d requests in %d shard(s)", sharder.rows, len(sharder.shards))
        return sharder.rows, fingerprint, sharder.shards


async def _feed_file(sharder: InputSharder, path: str) -> None:
    try:
        file = await anyio.to_thread.run_sync(open, path, "rb")
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the requests file {path}: {exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise InvalidArgumentError(f"cannot read the requests file {path!r}: {exc}") from None
    try:
        while await anyio.to_thread.run_sync(sharder.add_from_file, file):
            pass
    finally:
        await anyio.to_thread.run_sync(file.close)


class _Stats:
    """The live counters behind BatchRunSummary."""

    def __init__(self) -> None:
        self.rows = 0
        self.rows_ok = 0
        self.rows_failed = 0
        self.jobs = 0
        self.shards = 0
        self.resubmitted_rows = 0
        self.attempts = 0
        self.usage: dict[str, int] = {}
        self.resumed = False
        self._started: float | None = None
        self._stopped: float | None = None

    def start(self) -> None:
        self._started = anyio.current_time()

    def stop(self) -> None:
        self._stopped = anyio.current_time()

    def count(self, chunk: list[tuple[int, BatchResult]]) -> None:
        for _, result in chunk:
            if result.ok:
                self.rows_ok += 1
            else:
                self.rows_failed += 1

    def add_usage(self, usage: Mapping[str, int]) -> None:
        # Summed by ShardAccounting while it decodes, so no result's body is decoded again.
        for key, value in usage.items():
            self.usage[key] = self.usage.get(key, 0) + value

    def snapshot(self) -> BatchRunSummary:
        if self._started is None:
            wall_time = 0.0
        else:
            end = self._stopped if self._stopped is not None else anyio.current_time()
            wall_time = end - self._started
        return BatchRunSummary(
            rows=self.rows,
            rows_ok=self.rows_ok,
            rows_failed=self.rows_failed,
            jobs=self.jobs,
            shards=self.shards,
            resubmitted_rows=self.resubmitted_rows,
            attempts=self.attempts,
            usage=dict(self.usage),
            wall_time=wall_time,
            resumed=self.resumed,
        )


class _Workspace:
    """The run's manifest and directories: beside state_path, or in a temporary directory.

    inputs/   the shard input files (originals and follow-ups)
    results/  each shard's downloaded output and error files
    incoming-*/  the input pass writes here; adopt() moves the files into inputs/
    """

    def __init__(self, manifest: Manifest, temporary: Path | None, created: bool) -> None:
        self.manifest = manifest
        self.temporary = temporary
        self.created = created
        self.inputs = manifest.directory / "inputs"
        self.results = manifest.directory / "results"
        self.scratch = manifest.directory / f"incoming-{os.getpid()}-{id(self):x}"

    @classmethod
    async def open(cls, state_path: Path | None) -> _Workspace:
        temporary: Path | None = None
        if state_path is None:
            # Named for this process: the next run removes it if this one is killed.
            temporary = await anyio.to_thread.run_sync(make_owned_temp_dir, "together")
            state_path = temporary / "state.sqlite"
        try:
            created = not await anyio.Path(state_path).exists()
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot use the state file {state_path}: {exc}") from None
        try:
            manifest = await Manifest.open(state_path)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if temporary is not None:
                    await anyio.to_thread.run_sync(remove_owned_temp_dir, temporary)
                elif created:
                    # SQLite may have made the file before failing (e.g. on its journal's name).
                    with contextlib.suppress(OSError):
                        await anyio.Path(state_path).unlink(missing_ok=True)
            raise
        workspace = cls(manifest, temporary, created)
        try:
            if temporary is None and await manifest.run() is None:
                await anyio.to_thread.run_sync(workspace._check_no_orphan_files)
            try:
                await anyio.to_thread.run_sync(workspace._make_directories)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot make the state's files directory {manifest.directory}: {exc}"
                ) from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await manifest.aclose()
                if created:
                    # Only the empty file this call made: a refused start leaves nothing.
                    await anyio.Path(state_path).unlink(missing_ok=True)
            raise
        return workspace

    @property
    def resumable(self) -> bool:
        return self.temporary is None

    def _check_no_orphan_files(self) -> None:
        # A state file that records no run beside the files of one was lost, emptied or
        # replaced: a fresh run would upload and bill the whole input again, and the files
        # are the only trace of the jobs that were made.
        for directory in (self.inputs, self.results):
            try:
                orphan = next((p for p in directory.iterdir() if p.is_file()), None)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise InvalidArgumentError(f"cannot read {directory}: {exc}") from exc
            if orphan is not None:
                raise ManifestMismatchError(
                    f"{self.manifest.path} records no run, but {self.manifest.directory} holds "
                    f"the files of one (e.g. {orphan.name}): the state file was lost, emptied or "
                    "replaced. Restore it to resume that run, or delete "
                    f"{self.manifest.directory} to start over (that run's jobs are not reused)"
                )

    async def check_nothing_recorded(self) -> None:
        """Raise when an empty input meets a recorded run: that is no resume, but a mistake."""
        if not self.resumable:
            return
        recorded = await self.manifest.run()
        if recorded is not None:
            raise ManifestMismatchError(
                f"{self.manifest.path} records a run of {recorded.rows:,} rows, but no requests "
                "were given now (an exhausted iterator or an empty list?); pass the same "
                "requests again to resume it, or use another state_path"
            )

    def _make_directories(self) -> None:
        for directory in (self.inputs, self.results, self.scratch):
            directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of a run that was killed: its input pass and its half-done downloads.
        # Safe to remove, as the manifest's lock says no other run is using this directory.
        for stale in self.manifest.directory.glob("incoming-*"):
            if stale != self.scratch:
                shutil.rmtree(stale, ignore_errors=True)
        for partial in self.results.glob(".*.part"):
            partial.unlink(missing_ok=True)

    async def adopt(
        self, fingerprint: str, rows: int, settings: dict[str, Any], written: list[WrittenShard]
    ) -> bool:
        """Record the run (or check it is the recorded one) and move the new shards in place."""
        manifest = self.manifest
        resumed = await manifest.begin(
            fingerprint=fingerprint,
            rows=rows,
            settings=settings,
            shards=[shard.as_new_shard() for shard in written],
        )
        if resumed:
            recorded = [shard for shard in await manifest.shards() if shard.parent_id is None]
            if [(s.input_name, s.input_sha256) for s in recorded] != [
                (s.name, s.sha256) for s in written
            ]:
                raise ManifestMismatchError(
                    f"{manifest.path} records other shard files for this input; it was "
                    "written by another version of together_async: use another state_path"
                )
        # Same fingerprint, same bytes: replacing a recorded file changes nothing.
        await anyio.to_thread.run_sync(self._move_in, written)
        return resumed

    def _move_in(self, written: list[WrittenShard]) -> None:
        for shard in written:
            os.replace(self.scratch / shard.name, self.inputs / shard.name)
            os.replace(ids_path(self.scratch / shard.name), ids_path(self.inputs / shard.name))

    async def aclose(self) -> None:
        try:
            recorded = await self.manifest.run() is not None
        except Exception:
            recorded = True  # unreadable: certainly not ours to delete
        try:
            await self.manifest.aclose()
        finally:
            await anyio.to_thread.run_sync(self._clean_up, not recorded)

    def _clean_up(self, nothing_recorded: bool) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.temporary is not None:
            remove_owned_temp_dir(self.temporary)
        elif nothing_recorded and self.created:
            # The input was refused before the run began: leave no empty state behind.
            self.manifest.path.unlink(missing_ok=True)
            shutil.rmtree(self.manifest.directory, ignore_errors=True)


class _Pipeline:
    """Drives every shard of a run to DONE; one per BatchRun._execute."""

    def __init__(self, run: BatchRun, workspace: _Workspace, sink: _Sink, rows: int) -> None:
        self._run = run
        self._client = run._client
        self._workspace = workspace
        self._manifest = workspace.manifest
        self._sink = sink
        self._stats = run._stats
        # Uploads and downloads wait in separate lines: a finished job's results must not
        # queue behind the uploads of shards that will run later.
        self._uploads = anyio.CapacityLimiter(run._max_concurrency)
        self._downloads = anyio.CapacityLimiter(run._max_concurrency)
        self._readers = anyio.CapacityLimiter(run._max_concurrency)
        # The rest of a shard's pure-Python work (its custom_ids, the rows with no result, the
        # follow-up file) runs in worker threads, one at a time: several such threads are no
        # faster (one GIL) and the event loop would wait in line for the GIL behind them all.
        self._python_work = anyio.CapacityLimiter(1)
        self._watcher = BatchWatcher(
            self._client.batches,
            open_ended=True,
            poll_interval=run._poll_interval,
            max_interval=run._max_interval,
            # progress=True: a bar of rows done of the run's rows, not only of jobs seen.
            progress=observer_for_run(run._progress, lambda: run.summary),
        )
        self._finished_jobs: dict[str, BatchJob] = {}
        self._waiting: dict[str, anyio.Event] = {}
        self._outstanding = 0
        self._live: dict[int, str] = {}  # shard id -> batch id, job not seen finished
        self._creating: dict[int, ShardRecord] = {}  # create_batch in flight (CREATING)
        # shard id -> the job its create_batch made or adopted, from the moment it is claimed
        # (set inside create_batch, so a cancellation right after still knows it is ours).
        self._claimed: dict[int, str] = {}
        self._listing: dict[str, list[BatchJob]] | None = None
        self._listing_sends = 0  # the client's creates sent before that listing
        self._known_batch_ids: set[str] = set()
        self._listing_lock = anyio.Lock()
        self._delivered = bytearray(rows)
        self._delivered_count = 0
        self._rows = rows
        self._group: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        shards = await self._manifest.shards()
        stats = self._stats
        stats.shards = len(shards)
        stats.jobs = sum(1 for shard in shards if shard.batch_id is not None)
        for shard in shards:
            self._note_shard(shard)
        self._outstanding = len(shards)
        self._known_batch_ids = {shard.batch_id for shard in shards if shard.batch_id}
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._watch)
                for shard in shards:
                    group.start_soon(self._drive, shard)
        except BaseException as exc:
            await self._on_exit()
            if not isinstance(exc, BaseExceptionGroup):
                raise
            error = _single_error(exc)
            if error is exc:
                raise
        finally:
            self._release_unrecorded_claims()
            await self._watcher.aclose()
        if error is not None:
            raise error
        self._check_every_row_once()

    def _note_shard(self, shard: ShardRecord) -> None:
        if shard.parent_id is not None:
            self._stats.resubmitted_rows += shard.lines
        self._stats.attempts = max(self._stats.attempts, shard.attempt)

    # --- one shard, step by step ------------------------------------------------------

    async def _drive(self, shard: ShardRecord) -> None:
        replay = shard.step is ShardStep.DONE
        if shard.step is ShardStep.WRITTEN:
            shard = await self._upload(shard)
        if shard.step in (ShardStep.UPLOADED, ShardStep.CREATING):
            shard = await self._create(shard)
        if shard.step is ShardStep.SUBMITTED:
            shard = await self._await_job(shard)
        if shard.step is ShardStep.FINISHED:
            shard = await self._download(shard)
        elif await anyio.to_thread.run_sync(self._results_missing, shard):
            logger.warning("shard %d: its downloaded results are gone; downloading again", shard.id)
            await self._fetch_results(shard)
        follow_up = await self._settle(shard, replay=replay)
        if follow_up is not None:
            self._outstanding += 1
            self._stats.shards += 1
            self._note_shard(follow_up)
            assert self._group is not None
            self._group.start_soon(self._drive, follow_up)
        self._outstanding -= 1
        if self._outstanding == 0:
            self._watcher.seal()

    async def _upload(self, shard: ShardRecord) -> ShardRecord:
        path = self._workspace.inputs / shard.input_name
        manifest = self._manifest

        async def remember(file_id: str) -> None:
            await manifest.record_upload_started(shard.id, file_id)

        async with self._uploads:
            if shard.file_id is not None:
                reused = await self._finish_interrupted_upload(shard, shard.file_id)
                if reused is not None:
                    return await manifest.record_uploaded(shard.id, reused)
            uploaded = await self._client.files.upload(
                path, purpose="batch-api", check=False, on_file_id=remember
            )
        logger.debug("shard %d uploaded as %s", shard.id, uploaded.id)
        return await manifest.record_uploaded(shard.id, uploaded.id)

    async def _finish_interrupted_upload(self, shard: ShardRecord, file_id: str) -> str | None:
        """A crashed run got `file_id` for this shard and may not have sent its bytes: the
        id to reuse when the server holds the file complete, else None once it is deleted."""
        files = self._client.files
        try:
            held = await files.retrieve(file_id)
        except NotFoundError:
            held = None  # not visible: never completed (or gone); delete what may be left
        status = (held.processing_status or "").upper() if held is not None else ""
        if held is not None and held.bytes == shard.bytes and status not in _FAILED_FILE:
            finished: FileObject | None = held
            if not (held.processed or status == "COMPLETED"):
                try:
                    finished = await files._preprocess(file_id, None)
                except APIStatusError as exc:
                    logger.info("shard %d: file %s cannot be finished: %s", shard.id, file_id, exc)
                    finished = None
            if finished is not None and finished.bytes in (None, shard.bytes):
                logger.info("shard %d: reusing file %s of a crashed run", shard.id, file_id)
                return file_id
        try:
            await files.delete(file_id)
            logger.info(
                "shard %d: deleted the incomplete file %s of a crashed run", shard.id, file_id
            )
        except NotFoundError:
            pass
        return None

    def _request(self, file_id: str) -> CreateRequest:
        run = self._run
        return create_request(
            file_id,
            run._endpoint,
            completion_window=run._completion_window,
            model_id=run._model,
        )

    async def _create(self, shard: ShardRecord) -> ShardRecord:
        file_id = shard.file_id
        assert file_id is not None
        job = await self._existing_job(shard) if shard.step is ShardStep.CREATING else None
        if job is None:
            request = self._request(file_id)
            shard = await self._manifest.record_create_intent(shard.id)
            self._creating[shard.id] = shard
            shard_id = shard.id
            with claim_hook(lambda claimed: self._claimed.__setitem__(shard_id, claimed.id)):
                job = await self._client.batches.create_batch(
                    file_id,
                    request.endpoint,
                    completion_window=self._run._completion_window,
                    model_id=request.model_id,
                    # A follow-up shard can share its parent's file id (identical bytes).
                    ignore_jobs=frozenset(self._known_batch_ids),
                )
            self._stats.jobs += 1
            logger.info("shard %d: created batch %s", shard.id, job.id)
        else:
            self._stats.jobs += 1
            logger.info("shard %d: found batch %s from before the crash", shard.id, job.id)
        self._live[shard.id] = job.id
        self._known_batch_ids.add(job.id)
        shard = await self._manifest.record_submitted(shard.id, job.id)
        self._creating.pop(shard.id, None)
        self._claimed.pop(shard.id, None)
        return shard

    async def _existing_job(self, shard: ShardRecord) -> BatchJob | None:
        """The job a crashed run may have created for a CREATING shard (one list call per run,
        unless this client has sent creates since)."""
        file_id = shard.file_id
        assert file_id is not None
        claims = self._client._claims
        # Uploads are deduplicated by checksum, so the file id can carry other jobs: those of a
        # follow-up's parent (identical bytes) and of other shards (known, or claimed by this
        # client), and those of other runs over the same data, made before this shard's create
        # intent or for other settings. The skew allows for the server's clock being behind
        # ours, as create_batch's reconcile does.
        async with claims.reconciling(file_id):
            # Creates of this client in flight on the file have answered and claimed their
            # jobs; one sent after the listing may have a job in it that is not claimed yet.
            async with self._listing_lock:
                if self._listing is None or self._listing_sends != claims.sends_started:
                    sends = claims.sends_started
                    listing: dict[str, list[BatchJob]] = {}
                    for job in await self._client.batches.list_batches():
                        if job.input_file_id is not None:
                            listing.setdefault(job.input_file_id, []).append(job)
                    self._listing, self._listing_sends = listing, sends
                jobs = self._listing.get(file_id, [])
            found = claims.adopt(
                jobs,
                self._request(file_id),
                not_before=self._create_time(shard),
                ignored=frozenset(self._known_batch_ids),
            )
        if found is not None:
            self._claimed[shard.id] = found.id
        return found

    def _create_time(self, shard: ShardRecord) -> datetime:
        """The earliest a job of this shard's create may say it was made (intent less skew)."""
        skew = timedelta(seconds=self._client.config.create_reconcile_skew)
        return datetime.fromtimestamp(shard.step_recorded_at, tz=timezone.utc) - skew

    async def _await_job(self, shard: ShardRecord) -> ShardRecord:
        batch_id = shard.batch_id
        assert batch_id is not None
        self._live[shard.id] = batch_id
        finished = anyio.Event()
        self._waiting[batch_id] = finished
        self._watcher.add(batch_id)
        await finished.wait()
        job = self._finished_jobs.pop(batch_id)
        self._live.pop(shard.id, None)
        logger.info("shard %d: batch %s ended %s", shard.id, batch_id, job.status)
        return await self._manifest.record_finished(
            shard.id,
            status=str(job.status),
            error=job.error,
            output_file_id=job.output_file_id,
            error_file_id=job.error_file_id,
        )

    async def _watch(self) -> None:
        async for job in self._watcher:
            if job.is_terminal:
                finished = self._waiting.pop(job.id, None)
                if finished is not None:
                    self._finished_jobs[job.id] = job
                    finished.set()

    async def _download(self, shard: ShardRecord) -> ShardRecord:
        names = await self._fetch_results(shard)
        return await self._manifest.record_downloaded(
            shard.id,
            output_name=names["output"][0],
            output_bytes=names["output"][1],
            error_name=names["error"][0],
            error_bytes=names["error"][1],
        )

    def _results_missing(self, shard: ShardRecord) -> bool:
        files = ((shard.output_name, shard.output_bytes), (shard.error_name, shard.error_bytes))
        for name, size in files:
            if name is None:
                continue
            path = self._workspace.results / name
            if not path.is_file() or path.stat().st_size != size:
                return True
        return False

    async def _fetch_results(self, shard: ShardRecord) -> dict[str, tuple[str | None, int | None]]:
        """Download the job's output and error files (to names fixed by the shard id)."""
        names: dict[str, tuple[str | None, int | None]] = {}
        async with self._downloads:
            for kind, file_id in (("output", shard.output_file_id), ("error", shard.error_file_id)):
                if not file_id:
                    names[kind] = (None, None)
                    continue
                name = f"{shard.id:05d}.{kind}.jsonl"
                downloaded = await self._client.files.retrieve_content(
                    file_id, output=self._workspace.results / name
                )
                names[kind] = (name, downloaded.bytes)
        return names

    async def _settle(self, shard: ShardRecord, *, replay: bool) -> ShardRecord | None:
        """Deliver the shard's final rows; record it DONE with its follow-up (unless replaying)."""
        run = self._run
        workspace = self._workspace
        if replay:
            assert shard.retry_allowed is not None
            retry_allowed = shard.retry_allowed
        else:
            # Rows of a job we cancelled ourselves are not charged an attempt.
            retry_allowed = shard.cancel_requested or shard.attempt < run._max_attempts
        next_attempt = shard.attempt if shard.cancel_requested else shard.attempt + 1
        follow_up: ShardRecord | None = None
        async with self._readers:
            accounting = await anyio.to_thread.run_sync(
                lambda: ShardAccounting(
                    workspace.inputs / shard.input_name,
                    shard.input_positions(),
                    input_sha256=shard.input_sha256,
                    batch_id=shard.batch_id,
                    job_status=shard.job_status,
                    job_error=shard.job_error,
                    retry_allowed=retry_allowed,
                ),
                limiter=self._python_work,
            )
            for name in (shard.output_name, shard.error_name):
                if name is not None:
                    await self._deliver_file(accounting, workspace.results / name)
            final = await anyio.to_thread.run_sync(accounting.finish, limiter=self._python_work)
            await self._deliver(final)
            self._stats.add_usage(accounting.usage)
            if not replay:
                new_shard = await anyio.to_thread.run_sync(
                    lambda: accounting.write_follow_up(
                        workspace.inputs / f"retry-of-{shard.id:05d}.jsonl", attempt=next_attempt
                    ),
                    limiter=self._python_work,
                )
                follow_up = await self._manifest.record_done(
                    shard.id, retry_allowed=retry_allowed, follow_up=new_shard
                )
                if follow_up is not None:
                    logger.info(
                        "shard %d: %d row(s) resubmitted as shard %d (attempt %d)",
                        shard.id,
                        follow_up.lines,
                        follow_up.id,
                        follow_up.attempt,
                    )
        if run._delete_files and not shard.remote_files_deleted:
            await self._delete_remote_files(shard)
        if not replay and not workspace.resumable:
            await anyio.to_thread.run_sync(self._remove_local_files, shard)
        return follow_up

    async def _deliver_file(self, accounting: ShardAccounting, path: Path) -> None:
        """Settle a downloaded output or error file on the event loop, one read at a time.

        Not in a worker thread: a thread doing pure-Python work holds the GIL for 5 ms at a
        time, so the loop thread waited up to 5 ms after every socket read and file write of
        the downloads in flight (they crawled at ~25 MB/s) and every result handed on. On the
        loop, a read of _SETTLE_READ bytes settles in about 3 ms and I/O goes on in between.
        """
        splitter = LineSplitter()
        async with await anyio.open_file(path, "rb") as file:
            while True:
                chunk = await file.read(_SETTLE_READ)
                lines = splitter.feed(chunk) if chunk else []
                if not chunk:
                    last = splitter.flush()
                    if last is not None:
                        lines.append(last)
                await self._deliver(accounting.settle(lines, source=path.name))
                if not chunk:
                    return

    async def _deliver(self, chunk: list[tuple[int, BatchResult]]) -> None:
        if not chunk:
            return
        delivered = self._delivered
        for position, result in chunk:
            if delivered[position]:
                raise RuntimeError(
                    f"internal error: the request at position {position} "
                    f"({result.custom_id!r}) got a second result; please report this"
                )
            delivered[position] = 1
        self._delivered_count += len(chunk)
        self._stats.count(chunk)
        await self._sink.deliver(chunk)

    def _check_every_row_once(self) -> None:
        if self._delivered_count == self._rows:
            return
        missing = [position for position, seen in enumerate(self._delivered) if not seen]
        raise RuntimeError(
            f"internal error: {len(missing)} of {self._rows} requests got no result "
            f"(positions {missing[:10]}...); please report this"
        )

    async def _delete_remote_files(self, shard: ShardRecord) -> None:
        ids = [i for i in (shard.file_id, shard.output_file_id, shard.error_file_id) if i]
        deleted = True
        async with self._downloads:
            for file_id in ids:
                try:
                    await self._client.files.delete(file_id)
                except NotFoundError:
                    pass
                except Exception as exc:  # a leftover file is not worth failing the run
                    deleted = False
                    logger.warning("could not delete file %s: %s", file_id, exc)
        if deleted:
            await self._manifest.record_remote_files_deleted(shard.id)

    def _remove_local_files(self, shard: ShardRecord) -> None:
        workspace = self._workspace
        (workspace.inputs / shard.input_name).unlink(missing_ok=True)
        ids_path(workspace.inputs / shard.input_name).unlink(missing_ok=True)
        for name in (shard.output_name, shard.error_name):
            if name is not None:
                (workspace.results / name).unlink(missing_ok=True)

    # --- leaving early ----------------------------------------------------------------

    async def _on_exit(self) -> None:
        """Cancel this run's unfinished jobs (when asked to), shielded and bounded in time.

        Only jobs this run created or adopted: those it follows, and those a create_batch
        still in flight had claimed. A create cut short before its answer may have made a job
        too, but on a deduplicated file id that job cannot be told from another run's, so it
        is named in a warning and left running, never cancelled.
        """
        if not self._run._cancel_on_exit or not (self._live or self._creating):
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + CLEANUP_TIMEOUT
            to_cancel = dict(self._live)
            unclaimed: dict[int, ShardRecord] = {}
            for shard_id, shard in self._creating.items():
                if shard_id in self._claimed:
                    to_cancel[shard_id] = self._claimed[shard_id]
                elif shard_id not in to_cancel:
                    unclaimed[shard_id] = shard
            for shard_id in to_cancel:
                # Kept claimed: a cancelled job is no one's to adopt, a resume's neither.
                self._claimed.pop(shard_id, None)
            async with anyio.create_task_group() as group:
                for batch_id in set(to_cancel.values()):
                    group.start_soon(self._cancel_job, batch_id)
                if unclaimed:
                    group.start_soon(self._warn_of_cut_short_creates, unclaimed)
            try:
                await self._manifest.record_cancel_requested(list(to_cancel))
            except Exception as exc:
                logger.warning("could not record the cancelled jobs: %s", exc)
        if scope.cancelled_caught:
            logger.warning("cancelling the jobs took more than %s s; gave up", CLEANUP_TIMEOUT)

    def _release_unrecorded_claims(self) -> None:
        """Jobs claimed for shards whose SUBMITTED step was never recorded belong to the
        shard's CREATING intent, which a resume reconciles: released, so that a resume through
        this same client can adopt them (a new process has no claims at all)."""
        claims = self._client._claims
        for batch_id in self._claimed.values():
            claims.release(batch_id)
        self._claimed.clear()

    async def _warn_of_cut_short_creates(self, shards: dict[int, ShardRecord]) -> None:
        try:
            jobs = await self._client.batches.list_batches(max_retries=1)
        except Exception as exc:
            logger.warning("could not list jobs to look for cut-short creates: %s", exc)
            return
        claims = self._client._claims
        ignored = frozenset(self._known_batch_ids)
        for shard_id, shard in shards.items():
            file_id = shard.file_id
            assert file_id is not None
            request = self._request(file_id)
            since = self._create_time(shard)
            maybe = [
                job.id
                for job in jobs
                if not job.is_terminal
                and not claims.is_claimed(job.id)
                and may_have_made(job, request, not_before=since, ignored=ignored)
            ]
            if maybe:
                logger.warning(
                    "shard %d: its create_batch was cut short and may have made one of the "
                    "jobs %s on file %s; left running, as it may be another run's job",
                    shard_id,
                    ", ".join(maybe),
                    file_id,
                )

    async def _cancel_job(self, batch_id: str) -> None:
        try:
            await self._client.batches.cancel_batch(batch_id, max_retries=2)
            logger.info("cancelled batch %s", batch_id)
        except Exception as exc:
            logger.warning("could not cancel batch %s: %s", batch_id, exc)


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to raise for a task group's exception group.

    Shards fail independently, so two can fail at once: the caller still gets one of the
    library's errors to catch, not a bare group. A KeyboardInterrupt or SystemExit wins (the
    process is stopping); else the first error in the group, with the others logged and
    noted on it. Only cancellations: the group itself.
    """
    cancelled: type[BaseException] = anyio.get_cancelled_exc_class()
    leaves = [exc for exc in _leaves(group) if not isinstance(exc, cancelled)]
    if not leaves:
        whole: BaseException = group
        return whole
    stopping = [exc for exc in leaves if not isinstance(exc, Exception)]
    first = stopping[0] if stopping else leaves[0]
    others = [exc for exc in leaves if exc is not first]
    add_note = getattr(first, "add_note", None)  # Python 3.11+
    for other in others:
        logger.warning("another shard failed at the same time: %s: %s", type(other).__name__, other)
        if add_note is not None:
            add_note(f"another shard failed at the same time: {type(other).__name__}: {other}")
    return first


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def _check_requests(requests: Any) -> RequestsInput:
    if isinstance(requests, (str, os.PathLike)):
        return requests
    if isinstance(requests, (bytes, bytearray, Mapping)):
        raise InvalidArgumentError(
            "requests must be a path to a JSONL file or a collection of requests, got "
            f"{type(requests).__name__} (wrap a single request in a list)"
        )
    if isinstance(requests, (Iterable, AsyncIterable)):
        return requests
    raise InvalidArgumentError(
        f"requests must be a path, an iterable or an async iterable, got {type(requests).__name__}"
    )


def _check_endpoint(endpoint: Any) -> EndpointPath:
    return require_endpoint(endpoint)


def _check_count(name: str, value: Any, *, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        # Refused, not clamped: a value past the API's limit is a mistake to hear about, and
        # a clamped run would shard differently from what its caller asked (and recorded).
        raise InvalidArgumentError(
            f"{name} is {value:,}, above the Batch API's limit of {limit:,} per job"
        )
    return value


def _check_state_path(value: Any) -> Path | None:
    if value is None:
        return None
    try:
        text = os.fspath(value)
    except TypeError:
        raise InvalidArgumentError(
            f"state_path must be a path (str or os.PathLike) or None, got {type(value).__name__}"
        ) from None
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"state_path must be a non-empty str path, got {value!r}")
    if "\x00" in text:
        raise InvalidArgumentError(f"state_path {text!r} holds a NUL byte, which no path can")
    return Path(text)


async def gather_batches(
    client: AsyncTogether,
    requests: RequestsInput,
    *,
    endpoint: Endpoint = BatchEndpoint.CHAT_COMPLETIONS,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_concurrency: int = 4,
    state_path: str | os.PathLike[str] | None = None,
    max_attempts: int = 3,
    cancel_on_exit: bool | None = None,
    delete_files: bool = False,
    progress: bool | JobObserver = False,
    poll_interval: float = 2.0,
    max_interval: float = 30.0,
    completion_window: str = "24h",
) -> list[BatchResult]:
    """Run any number of requests as batch jobs; one BatchResult per request, in input order.

    What `asyncio.gather` is to coroutines, for batch jobs: the requests are split into jobs
    within the API's limits, failed rows are resubmitted, and with `state_path` the same call
    resumes after a crash. The arguments are BatchRun's; use BatchRun for the summary.

    Example:
        results = await gather_batches(
            client, [{"messages": [{"role": "user", "content": "Hi"}]}], model="my-model"
        )
        print(results[0].text)
    """
    run = BatchRun(
        client,
        requests,
        endpoint=endpoint,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_concurrency=max_concurrency,
        state_path=state_path,
        max_attempts=max_attempts,
        cancel_on_exit=cancel_on_exit,
        delete_files=delete_files,
        progress=progress,
        poll_interval=poll_interval,
        max_interval=max_interval,
        completion_window=completion_window,
    )
    return await run.gather()


def stream_batches(
    client: AsyncTogether,
    requests: RequestsInput,
    *,
    endpoint: Endpoint = BatchEndpoint.CHAT_COMPLETIONS,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_concurrency: int = 4,
    state_path: str | os.PathLike[str] | None = None,
    max_attempts: int = 3,
    cancel_on_exit: bool | None = None,
    delete_files: bool = False,
    progress: bool | JobObserver = False,
    poll_interval: float = 2.0,
    max_interval: float = 30.0,
    completion_window: str = "24h",
) -> AsyncGenerator[BatchResult, None]:
    """Like gather_batches, but yields each result as its shard finishes (not in input order).

    Memory is bounded by shard size times max_concurrency, not by the dataset. Close the
    iterator if you stop early (`contextlib.aclosing`); that cancels the run.

    Example:
        async with contextlib.aclosing(stream_batches(client, "requests.jsonl")) as results:
            async for result in results:
                print(result.custom_id, result.ok)
    """
    run = BatchRun(
        client,
        requests,
        endpoint=endpoint,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_concurrency=max_concurrency,
        state_path=state_path,
        max_attempts=max_attempts,
        cancel_on_exit=cancel_on_exit,
        delete_files=delete_files,
        progress=progress,
        poll_interval=poll_interval,
        max_interval=max_interval,
        completion_window=completion_window,
    )
    return run.stream()
