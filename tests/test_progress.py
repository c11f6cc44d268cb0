"""progress.py: the tqdm bars fed by the watch streams; the library quiet without them."""

from __future__ import annotations

import io
import sys

import pytest
from scripted_batches import FAST, ScriptedBatches, collect, job

from together_async import BatchJob, BatchJobStatus
from together_async.progress import BatchesProgressBar, BatchProgressBar, job_percent
from together_async.watch import stream_status, stream_statuses


def last_frame(output: io.StringIO) -> str:
    """The last redraw of a bar (tqdm separates redraws with carriage returns)."""
    frames = [frame for frame in output.getvalue().replace("\n", "\r").split("\r") if frame]
    return frames[-1]


@pytest.mark.parametrize(
    ("batch", "percent"),
    [
        (BatchJob(id="a", status=BatchJobStatus.IN_PROGRESS, progress=42.5), 42.5),
        (BatchJob(id="a", status=BatchJobStatus.COMPLETED, progress=97.0), 100.0),
        (BatchJob(id="a", status=BatchJobStatus.FAILED, progress=12.0), 12.0),
        (
            BatchJob(
                id="a",
                status=BatchJobStatus("in_progress"),
                request_counts={"total": 8, "completed": 3, "failed": 1},
            ),
            50.0,
        ),
        (BatchJob(id="a", status=BatchJobStatus.VALIDATING), None),
        (BatchJob(id="a", progress=250.0), 100.0),
    ],
)
def test_job_percent(batch: BatchJob, percent: float | None) -> None:
    """Percent comes from `progress`, else from `request_counts`; COMPLETED is always 100."""
    assert job_percent(batch) == percent


def test_single_bar_shows_percent_and_status() -> None:
    """The one-job bar shows the percent done and the status."""
    output = io.StringIO()
    with BatchProgressBar(desc="batch-1", file=output) as bar:
        bar.update(job("batch-1", "VALIDATING"))
        assert "VALIDATING" in last_frame(output)
        bar.update(job("batch-1", "IN_PROGRESS", 40))
        frame = last_frame(output)
    assert frame.startswith("batch-1:  40%")
    assert "IN_PROGRESS" in frame


def test_single_bar_keeps_percent_when_progress_is_unknown() -> None:
    """A state without a progress figure keeps the last percent shown."""
    output = io.StringIO()
    with BatchProgressBar(file=output) as bar:
        bar.update(job("b", "IN_PROGRESS", 60))
        bar.update(job("b", "CANCELLED"))
        frame = last_frame(output)
    assert " 60%" in frame and "CANCELLED" in frame


def test_aggregate_bar_shows_overall_percent_and_counts() -> None:
    """The many-jobs bar shows the mean percent, jobs finished and a count per status."""
    output = io.StringIO()
    with BatchesProgressBar(file=output) as bar:
        bar.update(job("a", "IN_PROGRESS", 50))
        bar.update(job("b", "VALIDATING"))
        bar.update(job("c", "FAILED", 10))
        bar.update(job("d", "COMPLETED"))
        frame = last_frame(output)
    # (50 + 0 + 100 + 100) / 4: finished jobs count as done.
    assert frame.startswith("batches:  62%")
    assert "2/4 done" in frame
    assert "COMPLETED=1 FAILED=1 IN_PROGRESS=1 VALIDATING=1" in frame


def test_close_twice_is_harmless() -> None:
    """close() may be called more than once."""
    bar = BatchProgressBar(file=io.StringIO())
    bar.close()
    bar.close()


def test_missing_tqdm_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without tqdm, asking for a bar says which extra to install."""
    for name in ("tqdm", "tqdm.std", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"together_async\[progress\]"):
        BatchProgressBar()
    with pytest.raises(ImportError, match=r"together_async\[progress\]"):
        stream_status(ScriptedBatches({}), "b1", progress=True)


async def test_stream_with_progress_draws_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """stream_status(progress=True) draws a bar on stderr and finishes it at 100%."""
    batches = ScriptedBatches({"b1": [job("b1", "IN_PROGRESS", 30), job("b1", "COMPLETED")]})
    await collect(stream_status(batches, "b1", progress=True, **FAST))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "b1: 100%" in captured.err and "COMPLETED" in captured.err


async def test_many_jobs_stream_with_progress_draws_one_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """stream_statuses(progress=True) draws a single aggregate bar."""
    ids = ["a", "b", "c"]
    batches = ScriptedBatches({i: [job(i, "IN_PROGRESS", 50), job(i, "COMPLETED")] for i in ids})
    await collect(stream_statuses(batches, ids, progress=True, **FAST))
    err = capsys.readouterr().err
    assert "3/3 done" in err and "COMPLETED=3" in err


async def test_streams_print_nothing_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Without progress=True the library writes nothing to stdout or stderr."""
    batches = ScriptedBatches({"b1": [job("b1", "IN_PROGRESS", 30), job("b1", "COMPLETED")]})
    await collect(stream_status(batches, "b1", **FAST))
    assert capsys.readouterr() == ("", "")
