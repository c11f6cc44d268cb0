"""`client.batches`: create (reconciled, so one call makes at most one job), get, list, cancel,
and `results`, which streams the rows of a job's output and error files.

The status stream and `wait` live in watch.py; the methods here that expose them only delegate.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from . import watch
from ._convert import result_from_row, structure
from ._errors import (
    APIError,
    APIResponseValidationError,
    APIStatusError,
    BatchNotFinishedError,
    InvalidArgumentError,
)
from ._models import BatchJob, BatchJobStatus, BatchResult, Endpoint
from ._protocol import (
    decode_json,
    is_ambiguous_create_failure,
    require_endpoint,
    require_id,
    require_text,
    unwrap_job,
    with_context,
)
from ._reconcile import CreateRequest
from .watch import BatchWatcher, JobObserver

if TYPE_CHECKING:
    from ._client import AsyncTogether

__all__ = ["Batches"]

logger = logging.getLogger("together_async.batches")


def _jobs_from_list(payload: Any) -> list[BatchJob]:
    # The API answers a bare array; an OpenAI-style {"data": [...]} is accepted too.
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise APIResponseValidationError("GET /batches: expected a JSON array of jobs")
    return structure(payload, list[BatchJob])


_INT64 = range(-(2**63), 2**63)
# How a server refuses to cancel a job that can no longer be cancelled (the emulator and the
# spec: 400), and the states in which a lost cancel's work is seen to be done.
_REFUSALS = frozenset({400, 409, 422})
_CANCELLED = frozenset({BatchJobStatus.CANCELING, BatchJobStatus.CANCELLED})


def create_request(
    file_id: Any,
    endpoint: Any,
    *,
    completion_window: Any = "24h",
    model_id: Any = None,
    priority: Any = None,
) -> CreateRequest:
    """create_batch's arguments, checked: InvalidArgumentError before anything is sent."""
    input_file_id = require_id(file_id, "file_id")
    endpoint_value = require_endpoint(endpoint)
    if not isinstance(completion_window, str) or not completion_window.strip():
        raise InvalidArgumentError("completion_window must be a non-empty string")
    require_text(completion_window, "completion_window")
    if model_id is not None:
        require_text(model_id, "model_id")
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidArgumentError("priority must be an int")
        if priority not in _INT64:
            raise InvalidArgumentError(
                f"priority must be within the 64-bit integer range, got {priority}"
            )
    return CreateRequest(
        input_file_id=input_file_id,
        endpoint=endpoint_value,
        completion_window=completion_window,
        model_id=model_id,
        priority=priority,
    )


def _check_finished(job: BatchJob, batch_id: str, *, partial: bool) -> None:
    status = job.status
    if status == BatchJobStatus.COMPLETED or (partial and job.is_terminal):
        return
    if not job.is_terminal:
        raise BatchNotFinishedError(
            f"batch {batch_id} is {status or 'of unknown status'}: its results come once it "
            f"ends; wait first (job = await client.batches.wait({batch_id!r}), or "
            f"`together-async batches watch {batch_id}`)",
            batch_id=batch_id,
            status=status,
            job=job,
        )
    reason = f" ({job.error})" if job.error else ""
    raise BatchNotFinishedError(
        f"batch {batch_id} ended {status}{reason} without completing; pass partial=True to "
        "read the rows it has",
        batch_id=batch_id,
        status=status,
        job=job,
    )


def _ignored_ids(ignore_jobs: Any) -> frozenset[str]:
    # None is "no jobs", as for any optional collection.
    if ignore_jobs is None:
        return frozenset()
    if isinstance(ignore_jobs, (str, bytes)) or not isinstance(ignore_jobs, Iterable):
        raise InvalidArgumentError(
            "ignore_jobs must be a collection of job ids, not a "
            + ("string" if isinstance(ignore_jobs, str) else type(ignore_jobs).__name__)
        )
    try:
        ignored = frozenset(ignore_jobs)
    except TypeError:
        ignored = None
    if ignored is None or not all(isinstance(job_id, str) for job_id in ignored):
        raise InvalidArgumentError("ignore_jobs must hold job ids (strings)")
    return ignored


class Batches:
    """`client.batches`: create, inspect, cancel batch jobs and read their results."""

    def __init__(self, client: AsyncTogether) -> None:
        self._client = client

    async def create_batch(
        self,
        file_id: str,
        endpoint: Endpoint,
        *,
        completion_window: str = "24h",
        model_id: str | None = None,
        priority: int | None = None,
        ignore_jobs: Collection[str] | None = (),
        max_retries: int | None = None,
    ) -> BatchJob:
        """Start a batch job on an uploaded file; returns the new job.

        There is no idempotency key in the API, so a request that may have reached the
        server (a timeout, a dropped connection, a 5xx) is never simply sent again: the jobs
        are listed first, and a job made since just before the first attempt for everything
        this call asked for (file, endpoint, model, completion window, priority) is returned
        instead. One call makes at most one job, and concurrent calls of one client never
        return the same job.

        The server's `warning`, if any, is kept on the returned job (`job.warning`) and logged.

        Args:
            priority: an integer within the API's 64-bit range.
            ignore_jobs: ids of jobs known not to be this call's, left out of that check
                (None means none). Pass the jobs you already ran on the same file: identical
                uploads share a file id (the API deduplicates by checksum), so an earlier job
                on the same file could otherwise be mistaken for the one this call made.

        Example:
            job = await client.batches.create_batch(uploaded.id, "/v1/chat/completions")
        """
        request = create_request(
            file_id,
            endpoint,
            completion_window=completion_window,
            model_id=model_id,
            priority=priority,
        )
        ignored = _ignored_ids(ignore_jobs)
        body: dict[str, Any] = {
            "input_file_id": request.input_file_id,
            "endpoint": request.endpoint,
            "completion_window": request.completion_window,
        }
        if request.model_id is not None:
            body["model_id"] = request.model_id
        if request.priority is not None:
            body["priority"] = request.priority

        client = self._client
        claims = client._claims
        url = client._url("batches")
        since = datetime.now(timezone.utc) - timedelta(seconds=client.config.create_reconcile_skew)
        maybe_created = False

        async def attempt() -> BatchJob:
            nonlocal maybe_created
            if maybe_created:
                found = await self._find_created(request, since, ignored)
                if found is not None:
                    return found
            async with claims.sending(request.input_file_id):
                try:
                    response = await client._send_once("POST", url, json=body)
                except APIError as exc:
                    if is_ambiguous_create_failure(exc):
                        maybe_created = True
                    raise
                # Claimed before the gate lets a reconcile on this file list the jobs.
                job = self._created_job(decode_json(response.body, what="POST /batches"))
                claims.claim(job)
                return job

        with claims.active(since):
            try:
                return await client._with_retries(attempt, max_retries=max_retries)
            except APIError as exc:
                if not maybe_created:
                    raise
                failure = exc
            # The last attempt may itself have created the job: look once more before giving up.
            try:
                found = await self._find_created(request, since, ignored)
            except APIError as exc:
                raise with_context(
                    failure,
                    f"create_batch for file {request.input_file_id} may have created a job, and "
                    f"listing jobs to check failed too ({exc}); check list_batches() before "
                    "trying again",
                ) from exc
        if found is not None:
            return found
        raise failure

    def _created_job(self, payload: Any) -> BatchJob:
        job_payload, warning = unwrap_job(payload)
        job = structure(job_payload, BatchJob)
        if warning:
            logger.warning("create_batch %s: the server warns: %s", job.id, warning)
            job = attrs.evolve(job, warning=warning)
        return job

    async def _find_created(
        self,
        request: CreateRequest,
        since: datetime,
        ignored: frozenset[str],
    ) -> BatchJob | None:
        """The job this lost create made, adopted and claimed (see _reconcile), if any."""
        claims = self._client._claims
        async with claims.reconciling(request.input_file_id):
            jobs = await self.list_batches()
            found = claims.adopt(jobs, request, not_before=since, ignored=ignored)
        if found is not None:
            logger.warning(
                "create_batch: a request for file %s failed after it may have reached the "
                "server; found job %s made for it, returning that instead of creating another",
                request.input_file_id,
                found.id,
            )
        return found

    async def get_batch(self, id: str, *, max_retries: int | None = None) -> BatchJob:
        """The job with this id."""
        batch_id = require_id(id, "batch id")
        client = self._client
        payload = await client._send_json(
            "GET",
            client._url("batches", batch_id),
            what="GET /batches/{id}",
            max_retries=max_retries,
        )
        return structure(unwrap_job(payload)[0], BatchJob)

    async def list_batches(self, *, max_retries: int | None = None) -> list[BatchJob]:
        """Every batch job of the account (the API does not paginate this list)."""
        client = self._client
        payload = await client._send_json(
            "GET", client._url("batches"), what="GET /batches", max_retries=max_retries
        )
        return _jobs_from_list(payload)

    async def cancel_batch(self, id: str, *, max_retries: int | None = None) -> BatchJob:
        """Ask the API to cancel a job; returns the job as it is after the request.

        Requests that already finished are billed and still appear in the output file. When
        an attempt's answer was lost (a dropped connection, a 5xx) and the retry is refused
        because the job is already cancelling or cancelled, that first attempt did the work:
        the job is returned, not the refusal.
        """
        batch_id = require_id(id, "batch id")
        client = self._client
        url = client._url("batches", batch_id, "cancel")
        answer_lost = False

        async def attempt() -> BatchJob:
            nonlocal answer_lost
            try:
                response = await client._send_once("POST", url)
            except APIStatusError as exc:
                if answer_lost and exc.status_code in _REFUSALS:
                    job = await self.get_batch(batch_id, max_retries=max_retries)
                    if job.status in _CANCELLED:
                        logger.info("cancel_batch %s: already %s", batch_id, job.status)
                        return job
                answer_lost = answer_lost or is_ambiguous_create_failure(exc)
                raise
            except APIError as exc:
                answer_lost = answer_lost or is_ambiguous_create_failure(exc)
                raise
            payload = decode_json(response.body, what="POST /batches/{id}/cancel")
            return structure(unwrap_job(payload)[0], BatchJob)

        return await client._with_retries(attempt, max_retries=max_retries)

    def stream_status(
        self,
        id: str,
        *,
        poll_interval: float = 2.0,
        max_interval: float = 30.0,
        backoff: float = 1.5,
        max_consecutive_failures: int = 20,
        progress: bool | JobObserver = False,
    ) -> BatchWatcher:
        """Follow one job: its current state, then each change, ending after a terminal one.

        Failed polls are retried on an adaptive schedule (quick at first, settling at
        `max_interval`, Retry-After honoured); see `watch.stream_status` for the details.

        Example:
            async for job in client.batches.stream_status(job.id):
                print(job.status, job.progress)
        """
        return watch.stream_status(
            self,
            id,
            poll_interval=poll_interval,
            max_interval=max_interval,
            backoff=backoff,
            max_consecutive_failures=max_consecutive_failures,
            progress=progress,
        )

    async def wait(
        self,
        id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        max_interval: float = 30.0,
        backoff: float = 1.5,
        max_consecutive_failures: int = 20,
        progress: bool | JobObserver = False,
    ) -> BatchJob:
        """Wait for a job to finish and return its terminal state.

        Past `timeout` seconds this raises `WaitTimeoutError` (with `batch_id` and
        `last_job`); the job is left running, never cancelled.

        Example:
            job = await client.batches.wait(job.id, timeout=3600)
        """
        return await watch.wait(
            self,
            id,
            timeout=timeout,
            poll_interval=poll_interval,
            max_interval=max_interval,
            backoff=backoff,
            max_consecutive_failures=max_consecutive_failures,
            progress=progress,
        )

    def stream_statuses(
        self,
        ids: Iterable[str],
        *,
        poll_interval: float = 2.0,
        max_interval: float = 30.0,
        backoff: float = 1.5,
        max_consecutive_failures: int = 20,
        max_concurrent_gets: int = 8,
        progress: bool | JobObserver = False,
    ) -> BatchWatcher:
        """Follow many jobs with one `list_batches` call per tick: the merged changes of all.

        Ends once every job is terminal. For a set of jobs that grows while you watch, use
        `BatchWatcher(client.batches, open_ended=True)` with `add()` and `seal()`.

        Example:
            async for job in client.batches.stream_statuses(ids):
                if job.is_terminal:
                    print(job.id, job.status)
        """
        return watch.stream_statuses(
            self,
            ids,
            poll_interval=poll_interval,
            max_interval=max_interval,
            backoff=backoff,
            max_consecutive_failures=max_consecutive_failures,
            max_concurrent_gets=max_concurrent_gets,
            progress=progress,
        )

    def results(
        self,
        id_or_job: str | BatchJob,
        *,
        partial: bool = False,
        max_retries: int | None = None,
    ) -> AsyncIterator[BatchResult]:
        """Every row of a job's output file and then of its error file, as BatchResult,
        streamed: memory does not depend on the files' size.

        A COMPLETED job can still have failed rows; judge each by `result.ok`. Pass the job
        itself to save a `get_batch` call. Close the iterator if you stop early
        (`contextlib.aclosing`), which releases the connection at once.

        Args:
            partial: also read a job that ended without completing (CANCELLED, EXPIRED,
                FAILED): the rows it has. Without it such a job raises BatchNotFinishedError,
                as a job still running always does (its files do not exist yet).

        Raises:
            BatchNotFinishedError: the job has not completed (saying its status and how to
                wait), at the first iteration.

        Example:
            job = await client.batches.wait(job.id)
            async for result in client.batches.results(job):
                print(result.custom_id, result.text if result.ok else result.error_message)
        """
        if isinstance(id_or_job, BatchJob):
            job: BatchJob | None = id_or_job
            batch_id = require_id(id_or_job.id, "batch id")
        else:
            job = None
            batch_id = require_id(id_or_job, "batch id")
        return self._results(batch_id, job, bool(partial), max_retries)

    async def _results(
        self, batch_id: str, job: BatchJob | None, partial: bool, max_retries: int | None
    ) -> AsyncIterator[BatchResult]:
        if (
            job is None
            or not job.is_terminal
            or (job.output_file_id is None and job.error_file_id is None)
        ):
            job = await self.get_batch(batch_id, max_retries=max_retries)
        _check_finished(job, batch_id, partial=partial)
        for file_id in (job.output_file_id, job.error_file_id):
            if not file_id:
                continue
            # One async generator between the socket and the caller, the rows decoded in a
            # plain loop: nested async generators (lines, file lines, results) cost more per
            # row than the decoding itself. The loop is held for one window of rows at most
            # (about a millisecond), so it stays responsive.
            chunks = self._client.files._content_chunks(file_id, max_retries=max_retries)
            async with contextlib.aclosing(chunks):
                decoder = _ResultDecoder(file_id=file_id, batch_id=batch_id)
                async for chunk in chunks:
                    for window in decoder.feed(chunk):
                        for result in window:
                            yield result
                    decoder.raise_for_bad_line()
                for result in decoder.finish():
                    yield result
                decoder.raise_for_bad_line()

    # --- the official SDK's names, for readers of its docs ----------------------------------

    async def create(
        self,
        input_file_id: str,
        endpoint: Endpoint,
        *,
        completion_window: str = "24h",
        model_id: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
    ) -> BatchJob:
        """`create_batch` under the official SDK's name. Unlike the SDK's `create`, which
        wraps the job (`response.job`), this returns the job itself (its `warning` on it)."""
        return await self.create_batch(
            input_file_id,
            endpoint,
            completion_window=completion_window,
            model_id=model_id,
            priority=priority,
            max_retries=max_retries,
        )

    async def retrieve(self, batch_id: str, *, max_retries: int | None = None) -> BatchJob:
        """`get_batch` under the official SDK's name."""
        return await self.get_batch(batch_id, max_retries=max_retries)

    async def list(self, *, max_retries: int | None = None) -> list[BatchJob]:
        """`list_batches` under the official SDK's name."""
        return await self.list_batches(max_retries=max_retries)

    async def cancel(self, batch_id: str, *, max_retries: int | None = None) -> BatchJob:
        """`cancel_batch` under the official SDK's name."""
        return await self.cancel_batch(batch_id, max_retries=max_retries)


_DECODE_WINDOW = 128 * 1024
"""Bytes of rows decoded before their results are handed on: the rows of a window and their
results stay in the CPU cache (a whole 1 MiB chunk at once was ~15% slower)."""


class _ResultDecoder:
    """Output or error file bytes, fed in chunks of any size, as BatchResults (blank lines
    skipped, CRLF accepted).

    A bad line ends decoding: feed() gives the results before it, and raise_for_bad_line()
    then raises APIResponseValidationError naming the file and the line, so the caller gets
    every good row first, as from a line-by-line reader.
    """

    def __init__(self, *, file_id: str, batch_id: str) -> None:
        self._file_id = file_id
        self._batch_id = batch_id
        self._pending: list[bytes] = []  # the partial last line, as pieces
        # Lines are numbered (for an error) from these two counts, not counted one by one.
        self._rows_before = 0  # results given for the earlier windows
        self._blank_lines = 0
        self._bad_line: APIResponseValidationError | None = None
        self._next_start = 0

    def feed(self, chunk: bytes) -> Iterator[list[BatchResult]]:
        """The results of the lines that `chunk` completes, a list per window of bytes."""
        newline = chunk.find(b"\n")
        if newline < 0 or self._bad_line is not None:
            if chunk:
                self._pending.append(chunk)
            return
        start = 0
        if self._pending:
            self._pending.append(chunk[: newline + 1])
            line = b"".join(self._pending)
            self._pending = []
            yield self._window(line, 0, len(line))
            start = newline + 1
        while self._bad_line is None:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if start < len(chunk):
                    self._pending.append(chunk[start:])
                return
            # Whole lines only: a window holds at least the line it starts with.
            stop = max(start + _DECODE_WINDOW, newline + 1)
            results = self._window(chunk, start, stop)
            start = self._next_start
            yield results

    def finish(self) -> list[BatchResult]:
        """The result of the last line when the file did not end with a newline."""
        if not self._pending or self._bad_line is not None:
            return []
        self._pending.append(b"\n")
        line = b"".join(self._pending)
        self._pending = []
        return self._window(line, 0, len(line))

    def raise_for_bad_line(self) -> None:
        """Raise the error of the bad line met, if any."""
        if self._bad_line is not None:
            raise self._bad_line

    def _window(self, data: bytes, start: int, stop: int) -> list[BatchResult]:
        """The results of the lines of `data` that start at or after `start` and end before
        `stop`; sets `_next_start` to where the first line not decoded begins."""
        # Lines are decoded in place through a memoryview (orjson reads any buffer), so the
        # bytes of the file are never copied into a bytes object per line.
        view = memoryview(data)
        find = data.find
        loads = orjson.loads
        results: list[BatchResult] = []
        append = results.append
        batch_id = self._batch_id
        end = find(b"\n", start, stop)
        while True:
            try:
                while end >= 0:
                    append(result_from_row(loads(view[start:end]), batch_id))
                    start = end + 1
                    end = find(b"\n", start, stop)
                break
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                # Rare: a blank line (skipped, as JSON Lines readers do), or a bad one.
                if view[start:end].tobytes().strip():
                    line = self._rows_before + len(results) + self._blank_lines + 1
                    self._bad_line = self._describe(line, exc)
                    break
                self._blank_lines += 1
                start = end + 1
                end = find(b"\n", start, stop)
        self._rows_before += len(results)
        self._next_start = start
        return results

    def _describe(self, line: int, exc: ValueError) -> APIResponseValidationError:
        if isinstance(exc, orjson.JSONDecodeError):
            problem = f"not valid JSON ({exc.msg})"
        else:
            problem = str(exc)
        return APIResponseValidationError(
            f"batch {self._batch_id}: file {self._file_id} line {line}: {problem}"
        )
