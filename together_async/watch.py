"""Following batch jobs as they run: `stream_status` (one job), `wait`, and `BatchWatcher` /
`stream_statuses` (many jobs from one `list_batches` call per tick). Polling adapts (quick at
first, backing off toward `max_interval`, Retry-After honoured) and rides through failed polls.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

import anyio
import attrs

from ._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    InvalidArgumentError,
    StatusPollError,
    WaitTimeoutError,
)
from ._models import BatchJob, BatchJobStatus
from ._protocol import is_retryable_status

__all__ = [
    "BatchPoller",
    "BatchWatcher",
    "JobObserver",
    "PollSchedule",
    "is_transient",
    "stream_status",
    "stream_statuses",
    "wait",
]

logger = logging.getLogger("together_async.watch")

# Retry-After is honoured, but never past this: a confused proxy must not park a watch for a day.
_RETRY_AFTER_CAP = 600.0


class BatchPoller(Protocol):
    """What the watchers need from `client.batches`; any object with these two methods will do."""

    async def get_batch(self, batch_id: str, /, *, max_retries: int | None = None) -> BatchJob:
        """One job's current state."""
        ...

    async def list_batches(self, *, max_retries: int | None = None) -> Sequence[BatchJob]:
        """Every job of the account."""
        ...


class JobObserver(Protocol):
    """Something fed every job state a watcher yields (a progress bar, for example)."""

    def update(self, job: BatchJob) -> None:
        """Take note of a new state of a job."""
        ...

    def close(self) -> None:
        """The watcher has ended; release whatever is held."""
        ...


def is_transient(exc: BaseException) -> bool:
    """True for a failed poll worth retrying: a connection failure, a timeout, 408/409/429, 5xx.

    A garbled 2xx body also counts (a proxy's error page); 4xx answers such as 404 or 401 do not.
    """
    if isinstance(exc, (APIConnectionError, APIResponseValidationError)):
        return True
    if isinstance(exc, APIStatusError):
        # The client's own retry rule, so a poll is retried exactly when a call would be.
        return is_retryable_status(exc.status_code)
    return False


def check_progress(progress: object) -> None:
    """Refuse a `progress` argument that is neither a bool nor a JobObserver, up front."""
    if isinstance(progress, bool) or progress is None:
        return
    if not (
        callable(getattr(progress, "update", None)) and callable(getattr(progress, "close", None))
    ):
        raise InvalidArgumentError(
            "progress must be True, False or an observer with update(job) and close() "
            f"methods, got {type(progress).__name__}"
        )


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive finite number, got {value!r}")


@attrs.frozen(kw_only=True)
class PollSchedule:
    """When to poll next: pure arithmetic, so the schedule is predictable and testable.

    The first poll happens at once. After a poll that saw a status change the next one comes
    after `poll_interval` (states often follow each other quickly, VALIDATING -> IN_PROGRESS);
    otherwise the interval grows by `backoff` up to `max_interval`. Progress moving alone does
    not reset it, or a long job would be polled every `poll_interval` for hours; the defaults
    settle at 30 s, Together's advice for long jobs. A failed poll backs off the same way and
    waits at least the server's Retry-After (capped at 10 minutes).

    Args:
        poll_interval: the first and quickest interval, in seconds.
        max_interval: the longest interval, in seconds.
        backoff: the factor the interval grows by after a quiet or failed poll.
        max_consecutive_failures: how many failed polls in a row end the watch with
            `StatusPollError`.
    """

    poll_interval: float = 2.0
    max_interval: float = 30.0
    backoff: float = 1.5
    max_consecutive_failures: int = 20

    def __attrs_post_init__(self) -> None:
        _check_positive("poll_interval", self.poll_interval)
        _check_positive("max_interval", self.max_interval)
        _check_positive("backoff", self.backoff)
        if self.max_interval < self.poll_interval:
            raise InvalidArgumentError(
                f"max_interval ({self.max_interval}) must not be below "
                f"poll_interval ({self.poll_interval})"
            )
        if self.backoff < 1:
            raise InvalidArgumentError(f"backoff must be at least 1, got {self.backoff!r}")
        failures = self.max_consecutive_failures
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise InvalidArgumentError(
                f"max_consecutive_failures must be a positive integer, got {failures!r}"
            )

    def _grown(self, delay: float | None) -> float:
        if delay is None:
            return self.poll_interval
        return min(self.max_interval, max(self.poll_interval, delay * self.backoff))

    def after_success(self, delay: float | None, *, status_changed: bool) -> float:
        """The wait after a successful poll, given the previous wait (None before the first)."""
        if status_changed:
            return self.poll_interval
        return self._grown(delay)

    def after_failure(self, delay: float | None, *, retry_after: float | None) -> float:
        """The wait after a failed poll, honouring the server's Retry-After when it gave one."""
        grown = self._grown(delay)
        if retry_after is not None and retry_after > grown:
            return min(retry_after, max(_RETRY_AFTER_CAP, self.max_interval))
        return grown


def _check_batch_id(batch_id: object) -> str:
    if not isinstance(batch_id, str) or not batch_id.strip():
        raise InvalidArgumentError(f"a batch id must be a non-empty string, got {batch_id!r}")
    return batch_id


def _loose_id(batch_id: str) -> str:
    return batch_id.strip().casefold()


def _lacks_result_files(job: BatchJob) -> bool:
    """A COMPLETED job with neither an output nor an error file: a list entry may be a
    summary that leaves them out, so the job is read on its own before that is believed."""
    return job.status == BatchJobStatus.COMPLETED and not (job.output_file_id or job.error_file_id)


def _change_key(job: BatchJob) -> tuple[object, ...]:
    counts = tuple(sorted(job.request_counts.items())) if job.request_counts else None
    return (str(job.status) if job.status is not None else None, job.progress, counts)


class BatchWatcher:
    """Follows batch jobs and yields a `BatchJob` each time one's status or progress changes.

    Each tick costs one `list_batches` call for all the unfinished jobs; only ids that the list
    does not return are fetched with `get_batch` (at most `max_concurrent_gets` at a time). With
    a single unfinished job a tick is one `get_batch` call. The first state seen of every job is
    yielded, and a job's terminal state is yielded once, after which it is no longer polled.
    Iteration ends when every job is terminal, or, with `open_ended=True`, once `seal()` was
    called too: that form lets a producer add jobs while the watch runs.

    No task or connection is held between two items, so breaking out of the `async for` or
    cancelling the consuming task leaves nothing behind. Call `aclose()` to close a progress bar
    at once when you stop early.

    Example:
        watcher = BatchWatcher(client.batches, open_ended=True)
        watcher.add(job.id)        # from any task of the loop, at any time before the end
        watcher.seal()             # no more ids
        async for job in watcher:
            print(job.id, job.status, job.progress)

    Args:
        batches: `client.batches`, or anything with `get_batch` and `list_batches`.
        ids: the jobs to watch from the start.
        open_ended: True to keep watching, even with every job finished, until `seal()`.
        poll_interval, max_interval, backoff, max_consecutive_failures: see `PollSchedule`.
        max_concurrent_gets: the most `get_batch` calls in flight for ids the list lacks.
        progress: True for an aggregate progress bar (needs the `progress` extra), or any
            `JobObserver` to feed.
    """

    def __init__(
        self,
        batches: BatchPoller,
        ids: Iterable[str] = (),
        *,
        open_ended: bool = False,
        poll_interval: float = 2.0,
        max_interval: float = 30.0,
        backoff: float = 1.5,
        max_consecutive_failures: int = 20,
        max_concurrent_gets: int = 8,
        progress: bool | JobObserver = False,
    ) -> None:
        if isinstance(ids, str):
            raise InvalidArgumentError("ids must be a collection of batch ids, not one string")
        if not isinstance(ids, Iterable):
            raise InvalidArgumentError(
                f"ids must be a collection of batch ids, got {type(ids).__name__}"
            )
        if (
            isinstance(max_concurrent_gets, bool)
            or not isinstance(max_concurrent_gets, int)
            or max_concurrent_gets < 1
        ):
            raise InvalidArgumentError(
                f"max_concurrent_gets must be a positive integer, got {max_concurrent_gets!r}"
            )
        self._batches = batches
        self._schedule = PollSchedule(
            poll_interval=poll_interval,
            max_interval=max_interval,
            backoff=backoff,
            max_consecutive_failures=max_consecutive_failures,
        )
        self._max_concurrent_gets = max_concurrent_gets
        # Insertion-ordered sets and maps: polls and yields follow the order ids were added.
        self._watched: dict[str, None] = {}
        self._unfinished: dict[str, None] = {}
        self._latest: dict[str, BatchJob] = {}
        self._ready: deque[BatchJob] = deque()
        self._sealed = not open_ended
        self._ended = False
        self._id_added: anyio.Event | None = None
        self._delay: float | None = None
        self._next_tick_at: float | None = None
        self._failures = 0
        self._ticks = 0
        check_progress(progress)
        for batch_id in ids:
            self.add(batch_id)
        self._observer = self._make_observer(progress)

    @staticmethod
    def _make_observer(progress: bool | JobObserver) -> JobObserver | None:
        if progress is True:
            from .progress import BatchesProgressBar

            return BatchesProgressBar()
        check_progress(progress)
        if progress is False or progress is None:
            return None
        return progress

    @property
    def ids(self) -> list[str]:
        """Every id watched, in the order it was added."""
        return list(self._watched)

    @property
    def unfinished(self) -> list[str]:
        """The ids not seen in a terminal state yet."""
        return list(self._unfinished)

    @property
    def ticks(self) -> int:
        """How many rounds of polling were made (each is one list call, plus gets if needed)."""
        return self._ticks

    @property
    def latest(self) -> dict[str, BatchJob]:
        """The last state seen of each job (jobs not polled yet are missing)."""
        return dict(self._latest)

    def add(self, batch_id: str) -> None:
        """Watch one more job; an id already watched is ignored.

        Raises:
            InvalidArgumentError: for an empty id, or once iteration has ended.
        """
        batch_id = _check_batch_id(batch_id)
        if self._ended:
            raise InvalidArgumentError(f"cannot add {batch_id!r}: this watcher has ended")
        if batch_id in self._watched:
            return
        self._watched[batch_id] = None
        self._unfinished[batch_id] = None
        if self._id_added is not None:
            self._id_added.set()

    def seal(self) -> None:
        """Declare that no more ids will be added: iteration ends once every job is terminal."""
        self._sealed = True
        if self._id_added is not None:
            self._id_added.set()

    async def aclose(self) -> None:
        """Stop watching and close the progress bar, if any. Safe to call twice."""
        self._end()

    def _end(self) -> None:
        self._ended = True
        self._ready.clear()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.close()

    def __aiter__(self) -> BatchWatcher:
        return self

    async def __anext__(self) -> BatchJob:
        if self._ended:
            raise StopAsyncIteration
        try:
            job = await self._next_change()
        except StopAsyncIteration:
            self._end()
            raise
        except Exception:
            # Cancellation is not caught here: a cancelled consumer may come back for more.
            self._end()
            raise
        if self._observer is not None:
            self._observer.update(job)
        return job

    async def _next_change(self) -> BatchJob:
        while not self._ready:
            if not self._unfinished:
                if self._sealed:
                    raise StopAsyncIteration
                self._id_added = anyio.Event()
                await self._id_added.wait()
                self._next_tick_at = None
                continue
            if self._next_tick_at is not None:
                await anyio.sleep(max(0.0, self._next_tick_at - anyio.current_time()))
            await self._tick()
        return self._ready.popleft()

    async def _tick(self) -> None:
        self._ticks += 1
        ids = list(self._unfinished)
        seen: dict[str, BatchJob] = {}
        failures: list[Exception] = []
        if len(ids) >= 2:
            try:
                listed = await self._batches.list_batches(max_retries=0)
            except Exception as exc:
                # No fallback to N get_batch calls here: that would hammer a struggling API.
                if not is_transient(exc):
                    raise
                failures.append(exc)
            else:
                spelled: dict[str, str] | None = None
                for job in listed:
                    batch_id = job.id
                    if batch_id not in self._unfinished:
                        # A server may spell an id differently in its list (case, spaces):
                        # match it to the id we watch, or the job would never be seen.
                        if spelled is None:
                            spelled = {_loose_id(known): known for known in ids}
                        found = spelled.get(_loose_id(batch_id))
                        if found is None:
                            continue
                        batch_id = found
                    if _lacks_result_files(job):
                        continue  # re-read with get_batch below before it counts as final
                    seen[batch_id] = job
                missing = [batch_id for batch_id in ids if batch_id not in seen]
                if missing:
                    logger.debug("%d watched jobs missing from the list", len(missing))
                    await self._get_each(missing, seen, failures)
        else:
            await self._get_each(ids, seen, failures)

        status_changed = self._absorb(ids, seen)
        if failures:
            self._failures += 1
            last = failures[-1]
            self._give_up_if_too_many(last)
            retry_after = last.retry_after if isinstance(last, APIStatusError) else None
            self._delay = self._schedule.after_failure(self._delay, retry_after=retry_after)
            logger.info(
                "polling %s failed (%s: %s); retrying in %.1f s (%d failure(s) in a row)",
                self._describe(),
                type(last).__name__,
                last,
                self._delay,
                self._failures,
            )
        else:
            self._failures = 0
            self._delay = self._schedule.after_success(self._delay, status_changed=status_changed)
        self._next_tick_at = anyio.current_time() + self._delay

    async def _get_each(
        self, ids: list[str], seen: dict[str, BatchJob], failures: list[Exception]
    ) -> None:
        fatal: list[Exception] = []

        async def fetch(batch_id: str, limiter: anyio.CapacityLimiter | None) -> None:
            try:
                if limiter is None:
                    seen[batch_id] = await self._batches.get_batch(batch_id, max_retries=0)
                else:
                    async with limiter:
                        seen[batch_id] = await self._batches.get_batch(batch_id, max_retries=0)
            except Exception as exc:
                (failures if is_transient(exc) else fatal).append(exc)

        if len(ids) == 1:
            await fetch(ids[0], None)
        else:
            limiter = anyio.CapacityLimiter(self._max_concurrent_gets)
            async with anyio.create_task_group() as group:
                for batch_id in ids:
                    group.start_soon(fetch, batch_id, limiter)
        if fatal:
            raise fatal[0]

    def _absorb(self, ids: list[str], seen: dict[str, BatchJob]) -> bool:
        status_changed = False
        for batch_id in ids:
            job = seen.get(batch_id)
            if job is None:
                continue
            if job.id != batch_id:
                # Yielded under the id it is watched by, so callers waiting on that id see it.
                logger.debug("batch %s: the server calls it %r", batch_id, job.id)
                job = attrs.evolve(job, id=batch_id)
            previous = self._latest.get(batch_id)
            if previous is None or _change_key(previous) != _change_key(job):
                self._ready.append(job)
                status_changed = (
                    status_changed or previous is None or (previous.status != job.status)
                )
                logger.debug("batch %s: %s, progress %s", batch_id, job.status, job.progress)
            self._latest[batch_id] = job
            if job.is_terminal:
                del self._unfinished[batch_id]
        return status_changed

    def _give_up_if_too_many(self, last: Exception) -> None:
        limit = self._schedule.max_consecutive_failures
        if self._failures < limit:
            return
        raise StatusPollError(
            f"gave up watching {self._describe()} after {self._failures} failed polls in a row "
            f"(the jobs themselves may be fine); last error: {type(last).__name__}: {last}",
            batch_ids=tuple(self._unfinished),
            failures=self._failures,
        ) from last

    def _describe(self) -> str:
        if len(self._unfinished) == 1:
            return f"batch {next(iter(self._unfinished))}"
        return f"{len(self._unfinished)} batches"


def stream_status(
    batches: BatchPoller,
    batch_id: str,
    *,
    poll_interval: float = 2.0,
    max_interval: float = 30.0,
    backoff: float = 1.5,
    max_consecutive_failures: int = 20,
    progress: bool | JobObserver = False,
) -> BatchWatcher:
    """Follow one job: yields its current state, then each change, and ends after a terminal one.

    A failed poll (5xx, 429, reset, timeout) is retried on the schedule described in
    `PollSchedule` and never reported as a job failure; `max_consecutive_failures` failed polls
    in a row raise `StatusPollError`. A 404 or 401 raises at once.

    Args:
        batches: `client.batches`, or anything with `get_batch` and `list_batches`.
        batch_id: the job to follow.
        poll_interval, max_interval, backoff, max_consecutive_failures: see `PollSchedule`.
        progress: True for a progress bar on stderr (needs the `progress` extra), or any
            `JobObserver` (such as a `BatchProgressBar` you configured) to feed.

    Example:
        async for job in client.batches.stream_status(batch_id):
            print(job.status, job.progress)
    """
    batch_id = _check_batch_id(batch_id)
    if progress is True:
        from .progress import BatchProgressBar

        progress = BatchProgressBar(desc=batch_id)
    return BatchWatcher(
        batches,
        [batch_id],
        poll_interval=poll_interval,
        max_interval=max_interval,
        backoff=backoff,
        max_consecutive_failures=max_consecutive_failures,
        progress=progress,
    )


def stream_statuses(
    batches: BatchPoller,
    ids: Iterable[str],
    *,
    poll_interval: float = 2.0,
    max_interval: float = 30.0,
    backoff: float = 1.5,
    max_consecutive_failures: int = 20,
    max_concurrent_gets: int = 8,
    progress: bool | JobObserver = False,
) -> BatchWatcher:
    """Follow many jobs at about one request per tick: the merged changes of all of them.

    The same as `BatchWatcher(batches, ids, ...)`; use `BatchWatcher(open_ended=True)` when the
    set of jobs grows while you watch.

    Example:
        async for job in client.batches.stream_statuses(ids):
            if job.is_terminal:
                print(job.id, "finished:", job.status)
    """
    return BatchWatcher(
        batches,
        ids,
        poll_interval=poll_interval,
        max_interval=max_interval,
        backoff=backoff,
        max_consecutive_failures=max_consecutive_failures,
        max_concurrent_gets=max_concurrent_gets,
        progress=progress,
    )


async def wait(
    batches: BatchPoller,
    batch_id: str,
    *,
    # The documented API (`batches.wait(id, timeout=...)`); the bound is applied inside.
    timeout: float | None = None,  # noqa: ASYNC109
    poll_interval: float = 2.0,
    max_interval: float = 30.0,
    backoff: float = 1.5,
    max_consecutive_failures: int = 20,
    progress: bool | JobObserver = False,
) -> BatchJob:
    """Wait for a job to finish and return its terminal state.

    Args:
        timeout: seconds to wait at most; None waits as long as it takes.
        The others: as for `stream_status`.

    Raises:
        WaitTimeoutError: past the timeout; it carries `batch_id` and `last_job`. The job is
            left running (never cancelled).
        StatusPollError: too many failed polls in a row.
    """
    if timeout is not None:
        _check_positive("timeout", timeout)
    stream = stream_status(
        batches,
        batch_id,
        poll_interval=poll_interval,
        max_interval=max_interval,
        backoff=backoff,
        max_consecutive_failures=max_consecutive_failures,
        progress=progress,
    )
    last: BatchJob | None = None
    try:
        with anyio.move_on_after(timeout):
            async for job in stream:
                last = job
    finally:
        await stream.aclose()
    if last is not None and last.is_terminal:
        return last
    state = f"still {last.status}" if last is not None else "not seen yet (no poll succeeded)"
    raise WaitTimeoutError(
        f"batch {batch_id} {state} after {timeout} s; the job was left running",
        batch_id=batch_id,
        last_job=last,
    )
