"""Optional progress bars for batch jobs, fed by the watch streams (the `progress` extra: tqdm).

tqdm is imported only when a bar is made, so the library itself prints nothing unless a bar is
asked for. In a notebook with ipywidgets (the `notebook` extra) the bar is a widget; without
ipywidgets it is the text bar, quietly (tqdm.auto would warn "IProgress not found").

`run_progress` is the one account of how far a gather run is, shared by the bar that
`gather_batches(progress=True)` draws and the live line of `together-async run`: rows done of
the total rows, jobs done of the jobs created, and never 100% while any row awaits its result.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar

import attrs

from ._models import BatchJob, BatchJobStatus

__all__ = [
    "BatchProgressBar",
    "BatchesProgressBar",
    "RunProgress",
    "RunTotals",
    "job_percent",
    "observer_for_run",
    "run_progress",
]

logger = logging.getLogger("together_async.progress")

_INSTALL_HINT = (
    "progress bars need tqdm, which comes with the `progress` extra: "
    "pip install 'together_async[progress]'"
)


def _tqdm_class() -> Any:
    try:
        from tqdm.std import tqdm as text_bar
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    try:
        has_widgets = importlib.util.find_spec("ipywidgets") is not None
    except (ImportError, ValueError):
        has_widgets = False
    if not has_widgets:
        # tqdm.auto would pick its notebook bar in a notebook and then, finding no ipywidgets,
        # warn "IProgress not found" before falling back to this same text bar.
        logger.debug("no ipywidgets: text progress bar (the `notebook` extra has the widget)")
        return text_bar
    with warnings.catch_warnings():
        # An ipywidgets too old for tqdm gives the same warning and the same fallback.
        warnings.filterwarnings("ignore", message="IProgress not found")
        from tqdm.auto import tqdm
    return tqdm


def job_percent(job: BatchJob) -> float | None:
    """How far along a job is, 0-100, from `progress` or `request_counts`; None when unknown.

    A COMPLETED job counts as 100 whatever its last progress figure said.
    """
    if job.status == BatchJobStatus.COMPLETED:
        return 100.0
    if job.progress is not None:
        return min(100.0, max(0.0, float(job.progress)))
    counts = job.request_counts or {}
    total = counts.get("total") or 0
    if total > 0:
        done = counts.get("completed", 0) + counts.get("failed", 0)
        return min(100.0, 100.0 * done / total)
    return None


class RunTotals(Protocol):
    """The figures of a run that progress needs (`BatchRun.summary` has them)."""

    @property
    def rows(self) -> int: ...
    @property
    def rows_ok(self) -> int: ...
    @property
    def rows_failed(self) -> int: ...
    @property
    def jobs(self) -> int: ...
    @property
    def shards(self) -> int: ...


@attrs.frozen(kw_only=True)
class RunProgress:
    """How far a gather run is, as `run_progress` reckons it.

    Attributes:
        rows: input rows (0 until the input has been read).
        rows_done: rows with their final result, or done on the server going by the jobs'
            progress, whichever is ahead; below `rows` while any row awaits its result.
        rows_collected: rows whose final result has been read.
        jobs: batch jobs created so far.
        jobs_done: of those, the jobs seen in a final state.
        jobs_to_create: shards that have no job yet (follow-ups of resubmitted rows too).
        by_status: jobs seen, counted by status.
        finished: every row has its final result.
    """

    rows: int
    rows_done: int
    rows_collected: int
    jobs: int
    jobs_done: int
    jobs_to_create: int
    by_status: Mapping[str, int]
    finished: bool

    @property
    def percent(self) -> int:
        """Whole percent of rows done, rounded down: 100 only once finished."""
        if self.finished:
            return 100
        if self.rows <= 0:
            return 0
        return min(99, math.floor(100 * self.rows_done / self.rows))

    def rows_text(self) -> str:
        """`551/1,000 rows`."""
        return f"{self.rows_done:,}/{self.rows:,} rows"

    def jobs_text(self) -> str:
        """`jobs 1/3 done`."""
        return f"jobs {self.jobs_done}/{self.jobs} done"

    def to_create_text(self) -> str | None:
        """`2 to create`, or None when every shard has its job."""
        return f"{self.jobs_to_create} to create" if self.jobs_to_create else None

    def statuses_text(self) -> str | None:
        """`(1 COMPLETED, 2 IN_PROGRESS)`, or None before any job was seen."""
        if not self.by_status:
            return None
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.by_status.items()))
        return f"({counts})"


def run_progress(totals: RunTotals, jobs: Iterable[BatchJob]) -> RunProgress:
    """How far a run is, from its totals and the last state seen of each of its jobs."""
    seen = list(jobs)
    rows = totals.rows
    collected = totals.rows_ok + totals.rows_failed
    finished = rows > 0 and collected >= rows
    created = max(totals.jobs, len(seen))
    by_status = Counter(str(job.status or "UNKNOWN") for job in seen)
    if finished:
        done, jobs_done = rows, created
    else:
        # Shards are about equal in size: a job without request_counts stands for its share.
        share = rows / max(totals.shards, created, 1)
        on_server = 0.0
        for job in seen:
            percent = job_percent(job) or 0.0
            size = (job.request_counts or {}).get("total") or share
            on_server += percent / 100 * size
        # Below the total until every row has its final result: a finished job's rows may be
        # resubmitted, and their results may not be read yet.
        done = min(max(rows - 1, 0), max(collected, int(on_server)))
        jobs_done = sum(1 for job in seen if job.is_terminal)
    return RunProgress(
        rows=rows,
        rows_done=done,
        rows_collected=collected,
        jobs=created,
        jobs_done=jobs_done,
        jobs_to_create=max(0, totals.shards - created),
        by_status=dict(by_status),
        finished=finished,
    )


_AnyBar = TypeVar("_AnyBar", bound="_Bar")


class _Bar:
    def __init__(self, tqdm_kwargs: dict[str, Any]) -> None:
        self._bar = _tqdm_class()(**tqdm_kwargs)
        self._closed = False

    def _show(self, percent: float, postfix: str) -> None:
        self._bar.n = round(percent, 1)
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Close the bar (it stays on screen). Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._bar.close()

    def __enter__(self: _AnyBar) -> _AnyBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BatchProgressBar(_Bar):
    """A bar for one job: percent done, status and elapsed time.

    Feed it with `update(job)`, or pass it as `progress=` to `stream_status` / `wait`.

    Args:
        desc: the label in front of the bar (the batch id is a good one).
        tqdm_kwargs: passed on to tqdm (`file=`, `position=`, `leave=`, ...).
    """

    def __init__(self, *, desc: str | None = None, **tqdm_kwargs: Any) -> None:
        options: dict[str, Any] = {
            "total": 100,
            "desc": desc,
            "bar_format": "{l_bar}{bar}| {elapsed}{postfix}",
        }
        options.update(tqdm_kwargs)
        super().__init__(options)
        self._percent = 0.0

    def update(self, job: BatchJob) -> None:
        """Show a new state of the job."""
        percent = job_percent(job)
        if percent is not None:
            self._percent = percent
        self._show(self._percent, str(job.status) if job.status is not None else "UNKNOWN")


class BatchesProgressBar(_Bar):
    """An aggregate bar for many jobs.

    Alone, it shows the mean percent over the jobs seen so far (finished jobs counting as 100),
    the jobs finished and a count per status. Given a run's `totals` (gather_batches gives
    them), it shows rows done of the run's total rows and jobs done of the jobs created (see
    `run_progress`), and reaches 100% only when every row has its result.

    Args:
        desc: the label in front of the bar.
        totals: a callable returning the run's figures (`lambda: run.summary`), or None.
        tqdm_kwargs: passed on to tqdm.
    """

    def __init__(
        self,
        *,
        desc: str | None = "batches",
        totals: Callable[[], RunTotals] | None = None,
        **tqdm_kwargs: Any,
    ) -> None:
        self._totals = totals
        self._label = desc
        options: dict[str, Any] = {"total": 100, "desc": desc}
        if totals is None:
            options["bar_format"] = "{l_bar}{bar}| {elapsed}{postfix}"
        else:
            # tqdm's own percentage rounds 99.6% up to "100%": the run's figure is shown
            # instead, rounded down, in the description.
            options["bar_format"] = "{desc}|{bar}| {n_fmt}/{total_fmt} rows [{elapsed}]{postfix}"
            options["desc"] = self._described(0)
            options["total"] = max(totals().rows, 1)
        options.update(tqdm_kwargs)
        super().__init__(options)
        self._percent: dict[str, float] = {}
        self._status: dict[str, str] = {}
        self._jobs: dict[str, BatchJob] = {}

    def _described(self, percent: int) -> str:
        return f"{self._label + ': ' if self._label else ''}{percent:3d}%"

    def update(self, job: BatchJob) -> None:
        """Take in a new state of one of the jobs."""
        self._jobs[job.id] = job
        if self._totals is not None:
            self._show_run()
            return
        percent = job_percent(job)
        if job.is_terminal:
            percent = 100.0
        if percent is not None:
            self._percent[job.id] = percent
        else:
            self._percent.setdefault(job.id, 0.0)
        self._status[job.id] = str(job.status) if job.status is not None else "UNKNOWN"
        overall = sum(self._percent.values()) / len(self._percent)
        finished = sum(1 for status in self._status.values() if BatchJobStatus(status).is_terminal)
        by_status = Counter(self._status.values())
        counts = " ".join(f"{status}={n}" for status, n in sorted(by_status.items()))
        self._show(overall, f"{finished}/{len(self._status)} done, {counts}")

    def _show_run(self) -> None:
        assert self._totals is not None
        progress = run_progress(self._totals(), self._jobs.values())
        jobs = progress.jobs_text()
        to_create = progress.to_create_text()
        statuses = progress.statuses_text()
        with_create = f"{jobs}, {to_create}" if to_create else jobs
        # Whole parts only, least important dropped first: tqdm would cut the line at the
        # terminal's edge, mid-word.
        choices = [
            with_create + (f" {statuses}" if statuses else ""),
            with_create,
            jobs,
            "",
        ]
        bar = self._bar
        bar.total = max(progress.rows, 1)
        bar.n = progress.rows_done
        described = self._described(progress.percent)
        bar.set_description_str(described, refresh=False)
        counts = f"{progress.rows_done}/{progress.rows}"
        fixed = f"{described}|{'#' * _MIN_BAR}| {counts} rows [00:00:00], "
        room = _columns(bar) - 1 - len(fixed)
        postfix = next(choice for choice in choices if len(choice) <= max(room, 0))
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Draw the run's final figures (with totals) and close the bar. Safe to call twice."""
        if self._totals is not None and not self._closed:
            self._show_run()
        super().close()


_MIN_BAR = 10  # the bar's own columns tqdm is left at least


def _columns(bar: Any) -> int:
    """The width the bar is drawn in: tqdm's when it knows it, else the terminal's."""
    width = getattr(bar, "ncols", None)
    if isinstance(width, int) and width > 0:
        return width
    return shutil.get_terminal_size((80, 24)).columns


def observer_for_run(progress: Any, totals: Callable[[], RunTotals]) -> Any:
    """The observer a gather run feeds: for `progress=True` a bar that knows the run's
    totals; any other value (False, a user's JobObserver) as it is."""
    if progress is True:
        return BatchesProgressBar(totals=totals)
    return progress
