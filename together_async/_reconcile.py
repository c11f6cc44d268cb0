"""Which job a lost create may have made, and which jobs are already someone's.

The API has no idempotency key: a `POST /batches` whose answer was lost (a reset, a timeout, a
5xx) may or may not have made a job, and the only way to know is to list the jobs and
recognise it. Uploads are deduplicated by checksum, so one file id can carry the jobs of many
callers. This module is the one home of that decision:

- `may_have_made` is the rule: a job may be a lost create's when it matches everything the
  create asked for (`CreateRequest`) and was made at or after the create (less the allowed
  clock skew); `pick` is the tie-break (the oldest).
- `ClaimRegistry`, one per client, records the jobs that calls of this client created or
  adopted, so one job is never handed to two calls. Its per-file gate makes a reconcile wait
  for this client's creates in flight on that file and hold new ones back while it lists:
  once they have answered, every job they made is claimed, and the unclaimed candidates
  left are the lost creates' own.

create_batch's reconcile, gather's resume and gather's cancel-on-exit all use these.
"""

from __future__ import annotations

import contextvars
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone

import anyio
import attrs

from ._models import BatchJob, EndpointPath

__all__ = ["ClaimRegistry", "CreateRequest", "claim_hook", "may_have_made", "pick"]

_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


@attrs.frozen(kw_only=True)
class CreateRequest:
    """What a create asked for; None means the call left it to the server (any value matches)."""

    input_file_id: str
    endpoint: EndpointPath
    completion_window: str | None = None
    model_id: str | None = None
    priority: int | None = None


def _same(asked: object, answered: object) -> bool:
    # None on either side matches: the caller left it to the server, or the server's answer
    # does not say (the spec's job has no priority or completion_window). Adopting such a job
    # risks less than billing a second one.
    return asked is None or answered is None or asked == answered


def _window(value: str | None) -> str | None:
    return value.strip().lower() if value is not None else None


def may_have_made(
    job: BatchJob, request: CreateRequest, *, not_before: datetime, ignored: frozenset[str]
) -> bool:
    """Whether `job` may be the one `request` made when its answer was lost: same input file,
    endpoint, model, completion window and priority, made at or after `not_before` (the
    create's time less the allowed clock skew), not one of `ignored`. A field the server's job
    leaves out counts as a match, and so does a job that does not say when it was made."""
    return (
        job.input_file_id == request.input_file_id
        and job.id not in ignored
        and _same(request.endpoint, job.endpoint)
        and _same(request.model_id, job.model_id)
        and _same(_window(request.completion_window), _window(job.completion_window))
        and _same(request.priority, job.priority)
        and (job.created_at is None or job.created_at >= not_before)
    )


def _guessed(job: BatchJob, request: CreateRequest) -> int:
    # How many fields matched only because one side did not say (see `_same`).
    pairs = (
        (request.endpoint, job.endpoint),
        (request.model_id, job.model_id),
        (request.completion_window, job.completion_window),
        (request.priority, job.priority),
    )
    return sum((asked is None) != (answered is None) for asked, answered in pairs)


def pick(candidates: Iterable[BatchJob], request: CreateRequest) -> BatchJob | None:
    """The candidate that matches `request` best, then the oldest (a job without a date
    counts as oldest).

    Best first: a job whose fields say exactly what was asked beats one that matched only
    because it, or the request, left a field unsaid; so of concurrent lost creates with
    different settings on one file, each takes its own job, not a neighbour's. Then oldest:
    when several lost creates asked the same, each taking the oldest one left hands every job
    to exactly one.
    """
    return min(
        candidates,
        key=lambda job: (_guessed(job, request), job.created_at or _OLDEST),
        default=None,
    )


_CLAIM_HOOK: contextvars.ContextVar[Callable[[BatchJob], None] | None] = contextvars.ContextVar(
    "together_async_claim_hook", default=None
)


@contextmanager
def claim_hook(hook: Callable[[BatchJob], None]) -> Iterator[None]:
    """Within this block (this task), `hook` learns each job a claim is recorded for, at once.

    gather runs create_batch inside one, so a run knows its job even when it is cancelled
    between create_batch claiming the job and returning it.
    """
    token = _CLAIM_HOOK.set(hook)
    try:
        yield
    finally:
        _CLAIM_HOOK.reset(token)


class _Gate:
    """One file id's traffic: creates in flight, and at most one reconcile at a time."""

    __slots__ = ("closed", "drained", "lock", "sending", "users")

    def __init__(self) -> None:
        self.users = 0
        self.sending = 0
        self.lock = anyio.Lock()
        self.closed: anyio.Event | None = None  # set when the reconcile holding the gate ends
        self.drained: anyio.Event | None = None  # set when the last create in flight ends


MAX_CLAIMS = 10_000
"""Claims kept at most, whatever their age (see `ClaimRegistry`)."""


class ClaimRegistry:
    """The jobs this client's calls created or adopted, and the gate of each file id.

    Claims are read and written without an await in between (one event loop), so they need no
    lock of their own; what must be exclusive is a reconcile's list-then-claim against the
    creates in flight on the same file, and each file's gate holds an `anyio.Lock` for that.

    A claim only matters while some call could still take its job for its own, that is while
    the job's `created_at` is not older than the earliest `not_before` of a call in progress
    or of one starting now (now less the skew). Older claims are dropped, so a long-lived
    client keeps only the last few minutes of claims; `MAX_CLAIMS` bounds the rest (jobs the
    server gave no date, which no time can rule out).
    """

    def __init__(self, *, skew: float, limit: int = MAX_CLAIMS) -> None:
        self._skew = skew
        self._limit = limit
        self._claims: OrderedDict[str, datetime | None] = OrderedDict()
        self._active: Counter[datetime] = Counter()
        self._gates: dict[str, _Gate] = {}
        self._sends_started = 0

    @property
    def sends_started(self) -> int:
        """Creates this client has sent so far (a listing taken before the next is stale)."""
        return self._sends_started

    def __len__(self) -> int:
        return len(self._claims)

    def is_claimed(self, job_id: str) -> bool:
        """True when a call of this client already created or adopted this job."""
        return job_id in self._claims

    def claim(self, job: BatchJob) -> None:
        """Record `job` as the job of the call that created or adopted it."""
        self._claims[job.id] = job.created_at
        self._claims.move_to_end(job.id)
        self._prune()
        hook = _CLAIM_HOOK.get()
        if hook is not None:
            hook(job)

    def release(self, job_id: str) -> None:
        """Forget a claim whose call ended without keeping the job (see gather's exit)."""
        self._claims.pop(job_id, None)

    def adopt(
        self,
        jobs: Iterable[BatchJob],
        request: CreateRequest,
        *,
        not_before: datetime,
        ignored: frozenset[str],
    ) -> BatchJob | None:
        """The oldest unclaimed job of `jobs` that `request` may have made, claimed; or None."""
        with self.active(not_before):
            found = pick(
                (
                    job
                    for job in jobs
                    if job.id not in self._claims
                    and may_have_made(job, request, not_before=not_before, ignored=ignored)
                ),
                request,
            )
            if found is not None:
                self.claim(found)
        return found

    @contextmanager
    def active(self, not_before: datetime) -> Iterator[None]:
        """A call that may adopt jobs made at or after `not_before` is in progress."""
        self._active[not_before] += 1
        try:
            yield
        finally:
            self._active[not_before] -= 1
            if not self._active[not_before]:
                del self._active[not_before]

    def _prune(self) -> None:
        floor = datetime.fromtimestamp(time.time() - self._skew, tz=timezone.utc)
        if self._active:
            floor = min(floor, min(self._active))
        # Claims are in claim order, which is nearly creation order: drop from the front
        # until a claim that may still matter.
        while self._claims:
            job_id, created_at = next(iter(self._claims.items()))
            if created_at is None or created_at >= floor:
                break
            del self._claims[job_id]
        while len(self._claims) > self._limit:
            self._claims.popitem(last=False)

    def _enter(self, file_id: str) -> _Gate:
        gate = self._gates.get(file_id)
        if gate is None:
            gate = self._gates[file_id] = _Gate()
        gate.users += 1
        return gate

    def _leave(self, file_id: str, gate: _Gate) -> None:
        gate.users -= 1
        if not gate.users:
            del self._gates[file_id]

    @asynccontextmanager
    async def sending(self, file_id: str) -> AsyncIterator[None]:
        """Around one create's POST on `file_id`: waits while a reconcile on that file lists
        jobs. Claim the job the POST answered before leaving."""
        gate = self._enter(file_id)
        try:
            while gate.closed is not None:
                await gate.closed.wait()
            gate.sending += 1
            self._sends_started += 1
            try:
                yield
            finally:
                gate.sending -= 1
                if not gate.sending and gate.drained is not None:
                    gate.drained.set()
        finally:
            self._leave(file_id, gate)

    @asynccontextmanager
    async def reconciling(self, file_id: str) -> AsyncIterator[None]:
        """Around a lost create's list-and-adopt on `file_id`: alone among the reconciles on
        that file, after this client's creates in flight on it have answered (and claimed
        their jobs), with new ones held back until it ends."""
        gate = self._enter(file_id)
        try:
            async with gate.lock:
                reopened = anyio.Event()
                gate.closed = reopened
                try:
                    while gate.sending:
                        gate.drained = anyio.Event()
                        await gate.drained.wait()
                    gate.drained = None
                    yield
                finally:
                    gate.closed = None
                    reopened.set()
        finally:
            self._leave(file_id, gate)
