"""Optional progress bars for batch jobs, fed by the watch streams (the `progress` extra: tqdm).

`tqdm.auto` is imported only when a bar is made, so it renders in notebooks and terminals alike
and the library itself prints nothing unless a bar is asked for.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType
from typing import Any

from ._models import BatchJob, BatchJobStatus

__all__ = ["BatchProgressBar", "BatchesProgressBar", "job_percent"]

_INSTALL_HINT = (
    "progress bars need tqdm, which comes with the `progress` extra: "
    "pip install 'together_async[progress]'"
)


def _tqdm_class() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
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

    def __enter__(self) -> _Bar:
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
        tqdm_kwargs: passed on to `tqdm.auto.tqdm` (`file=`, `position=`, `leave=`, ...).
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
    """An aggregate bar for many jobs: overall percent, jobs finished and a count per status.

    The overall percent is the mean over the jobs seen so far, finished jobs counting as 100.

    Args:
        desc: the label in front of the bar.
        tqdm_kwargs: passed on to `tqdm.auto.tqdm`.
    """

    def __init__(self, *, desc: str | None = "batches", **tqdm_kwargs: Any) -> None:
        options: dict[str, Any] = {
            "total": 100,
            "desc": desc,
            "bar_format": "{l_bar}{bar}| {elapsed}{postfix}",
        }
        options.update(tqdm_kwargs)
        super().__init__(options)
        self._percent: dict[str, float] = {}
        self._status: dict[str, str] = {}

    def update(self, job: BatchJob) -> None:
        """Take in a new state of one of the jobs."""
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
