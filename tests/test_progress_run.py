"""Progress that tells the truth: rows done of the run's rows, jobs done of the jobs created,
never 100% while a row awaits its result; and a quiet text bar in a notebook without
ipywidgets."""

from __future__ import annotations

import importlib
import io
import sys
import types
from typing import Any

import pytest

from together_async import AsyncTogether, BatchJob, BatchJobStatus, gather_batches
from together_async.emulator import Emulator
from together_async.emulator.engines import EchoEngine, Engine, EngineReply
from together_async.gather import BatchRunSummary
from together_async.progress import BatchesProgressBar, run_progress


def done(batch_id: str) -> BatchJob:
    return BatchJob(id=batch_id, status=BatchJobStatus.COMPLETED)


def frames(text: str) -> list[str]:
    """Each redraw of a bar (tqdm separates them with carriage returns)."""
    return [frame for frame in text.replace("\n", "\r").split("\r") if frame.strip()]


def test_not_100_while_a_follow_up_shard_is_pending() -> None:
    """Every job finished but a follow-up shard of resubmitted rows waits: not done."""
    totals = BatchRunSummary(rows=100, rows_ok=90, jobs=2, shards=3)
    progress = run_progress(totals, [done("a"), done("b")])
    assert (progress.rows_done, progress.percent, progress.finished) == (90, 90, False)
    assert (progress.jobs_done, progress.jobs, progress.jobs_to_create) == (2, 2, 1)


def test_finished_jobs_whose_results_are_unread_stay_below_100() -> None:
    """Jobs COMPLETED on the server while their results are not read yet: 99%, not 100%."""
    progress = run_progress(BatchRunSummary(rows=100, jobs=2, shards=2), [done("a"), done("b")])
    assert (progress.rows_done, progress.percent) == (99, 99)


def test_percent_rounds_down() -> None:
    """999 of 1,000 rows is 99%, never a rounded-up 100%."""
    totals = BatchRunSummary(rows=1000, rows_ok=999, jobs=1, shards=1)
    assert run_progress(totals, [done("a")]).percent == 99


def test_jobs_not_created_yet_are_counted_apart() -> None:
    """Jobs done count against the jobs created; shards without a job are `to create`."""
    running = BatchJob(id="a", status=BatchJobStatus.IN_PROGRESS, progress=50.0)
    progress = run_progress(BatchRunSummary(rows=400, jobs=1, shards=4), [running])
    assert (progress.jobs_done, progress.jobs, progress.jobs_to_create) == (0, 1, 3)
    # The running job is a quarter of the rows, half done.
    assert progress.rows_done == 50


def test_every_row_collected_is_100_with_every_job_done() -> None:
    """Once every row has its result the run is 100%, its jobs all done."""
    totals = BatchRunSummary(rows=10, rows_ok=8, rows_failed=2, jobs=3, shards=3)
    progress = run_progress(totals, [done("a")])
    assert (progress.percent, progress.finished, progress.jobs_done) == (100, True, 3)


def test_bar_with_run_totals_shows_rows_and_jobs() -> None:
    """Given the run's totals, the bar shows rows done of the rows and jobs done of created."""
    totals = BatchRunSummary(rows=100, rows_ok=90, jobs=2, shards=3)
    output = io.StringIO()
    bar = BatchesProgressBar(totals=lambda: totals, file=output, ncols=120)
    bar.update(done("a"))
    bar.update(done("b"))
    frame = frames(output.getvalue())[-1]
    assert frame.startswith("batches:  90%|")
    assert "| 90/100 rows [" in frame
    assert frame.endswith(", jobs 2/2 done, 1 to create (2 COMPLETED)")
    bar._bar.close()


def test_bar_with_run_totals_draws_the_final_figures_on_close() -> None:
    """close() redraws with the run's figures as they are then (every row collected)."""
    figures = {"now": BatchRunSummary(rows=100, jobs=1, shards=1)}
    output = io.StringIO()
    bar = BatchesProgressBar(totals=lambda: figures["now"], file=output)
    bar.update(done("a"))
    assert "batches:  99%" in frames(output.getvalue())[-1]
    figures["now"] = BatchRunSummary(rows=100, rows_ok=100, jobs=1, shards=1)
    bar.close()
    assert frames(output.getvalue())[-1].startswith("batches: 100%|")


class FailOnce(Engine):
    """Echoes, but answers the first attempt of some rows with a 503 (resubmitted later)."""

    instant = True

    def __init__(self, custom_ids: set[str]) -> None:
        self.pending = set(custom_ids)
        self._echo = EchoEngine()

    def respond_now(self, endpoint: str, body: Any, *, custom_id: str, created: int) -> EngineReply:
        if custom_id in self.pending:
            self.pending.discard(custom_id)
            return EngineReply(
                status_code=503,
                body={"error": {"message": "overloaded", "type": "server_error"}},
                error_message="overloaded",
                error_code="server_error",
            )
        return self._echo.respond_now(endpoint, body, custom_id=custom_id, created=created)


async def test_gather_progress_reaches_100_only_with_every_row(
    make_emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """gather_batches(progress=True) with a resubmitted row: no frame says 100% before every
    row is in, and the last one says all rows and all jobs are done."""
    emulator: Emulator = await make_emulator(engine=FailOnce({"request-7"}))
    requests = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(60)]
    async with AsyncTogether(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        results = await gather_batches(
            client,
            requests,
            model="m",
            max_requests_per_batch=20,
            progress=True,
            poll_interval=0.02,
            max_interval=0.1,
        )
    assert all(result.ok for result in results)
    drawn = frames(capsys.readouterr().err)
    assert drawn[-1].startswith("batches: 100%|")
    assert "| 60/60 rows [" in drawn[-1] and "jobs 4/4 done (4 COMPLETED)" in drawn[-1]
    early = [frame for frame in drawn[:-1] if "100%" in frame]
    assert all("60/60 rows" in frame and "to create" not in frame for frame in early)


class Recorder:
    """A user's own JobObserver: records what it is fed."""

    def __init__(self) -> None:
        self.seen: list[BatchJob] = []
        self.closed = 0

    def update(self, job: BatchJob) -> None:
        self.seen.append(job)

    def close(self) -> None:
        self.closed += 1


async def test_a_user_observer_is_fed_as_before(emulator: Emulator) -> None:
    """A JobObserver passed as progress= gets every job's states and one close()."""
    recorder = Recorder()
    requests = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(30)]
    async with AsyncTogether(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        await gather_batches(
            client,
            requests,
            model="m",
            max_requests_per_batch=10,
            progress=recorder,
            poll_interval=0.02,
            max_interval=0.1,
        )
    last = {job.id: job.status for job in recorder.seen}
    assert list(last.values()) == ["COMPLETED"] * 3
    assert recorder.closed == 1


@pytest.fixture
def notebook_without_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The modules tqdm.auto looks at to detect a Jupyter kernel, with ipywidgets missing."""
    shell = type("ZMQInteractiveShell", (), {})()
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    for name in ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for variable in ("QT_API", "SPYDER_ARGS"):
        monkeypatch.delenv(variable, raising=False)


def test_the_simulated_notebook_makes_tqdm_auto_warn(notebook_without_ipywidgets: None) -> None:
    """The simulation reaches tqdm's notebook path: tqdm.auto itself warns there."""
    from tqdm.std import TqdmWarning

    with pytest.warns(TqdmWarning, match="IProgress not found"):
        importlib.import_module("tqdm.auto")


@pytest.mark.filterwarnings("error")
def test_a_notebook_without_ipywidgets_gets_the_text_bar_quietly(
    notebook_without_ipywidgets: None,
) -> None:
    """In a notebook without ipywidgets a bar is tqdm's text bar, with no TqdmWarning."""
    from tqdm.std import tqdm

    output = io.StringIO()
    with BatchesProgressBar(file=output) as bar:
        bar.update(done("a"))
        assert type(bar._bar) is tqdm
    assert "batches: 100%" in output.getvalue()


@pytest.mark.parametrize("columns", [40, 60, 70])
def test_bar_on_a_narrow_line_drops_whole_parts(columns: int) -> None:
    """At 70 columns and less the bar's text drops whole parts (statuses, then jobs to
    create, then jobs) and fits: no word is cut at the edge."""
    totals = BatchRunSummary(rows=500, rows_ok=100, jobs=3, shards=5)
    output = io.StringIO()
    bar = BatchesProgressBar(totals=lambda: totals, file=output, ncols=columns)
    bar.update(done("a"))
    frame = frames(output.getvalue())[-1]
    assert len(frame) <= columns
    full = ", jobs 1/3 done, 2 to create (1 COMPLETED)"
    tail = frame.split("rows [", 1)[1].split("]", 1)[1]
    assert full.startswith(tail) and tail in ("", ", jobs 1/3 done", ", jobs 1/3 done, 2 to create")
    bar._bar.close()
