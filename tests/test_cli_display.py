"""`run`'s live line fits the terminal: parts are dropped whole, least important first, so the
line never wraps and never cuts a word; at 120, 80 and 40 columns, and in a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from terminal import cli_on_terminal

from together_async import BatchJob, BatchJobStatus
from together_async._cli_run import RunDisplay
from together_async.gather import BatchRunSummary
from together_async.progress import RunProgress

WIDE = 1000


def busy_run(display: RunDisplay) -> RunProgress:
    """A run in the middle: 3 jobs of 4 created, in three different states."""
    display.update(BatchJob(id="a", status=BatchJobStatus.COMPLETED))
    display.update(BatchJob(id="b", status=BatchJobStatus.IN_PROGRESS, progress=40.0))
    display.update(BatchJob(id="c", status=BatchJobStatus.VALIDATING))
    totals = BatchRunSummary(rows=100_000, rows_ok=33_000, rows_failed=10, jobs=3, shards=4)
    return display.progress(totals)


def shown(width: int) -> tuple[str, str]:
    """The line at `width` columns, and the line with room for everything (no bar)."""
    display = RunDisplay(io.StringIO(), width=width)
    progress = busy_run(display)
    full = re.sub(r" \[[^\]]*\]", "", display.line(progress, width=WIDE, elapsed=75.0))
    return display.line(progress, width=width, elapsed=75.0), full


def assert_whole_words(line: str, full: str) -> None:
    """Every word of `line` is a word of the full line: nothing was cut in the middle."""
    words = set(full.split())
    assert [word for word in line.split() if word not in words] == []


def test_120_columns_show_every_part() -> None:
    """At 120 columns the line has the rows, jobs, jobs to create, statuses, rate and time."""
    line, full = shown(120)
    assert len(line) <= 119
    assert line == (
        " 35% 35,000/100,000 rows | jobs 1/3 done, 1 to create "
        "(1 COMPLETED, 1 IN_PROGRESS, 1 VALIDATING) | 467 rows/s | 01:15"
    )
    assert line == full


def test_80_columns_drop_the_rate_and_then_the_statuses() -> None:
    """At 80 columns the rate goes first, then the status breakdown; the rest stays."""
    line, full = shown(80)
    assert len(line) <= 79
    assert line == " 35% 35,000/100,000 rows | jobs 1/3 done, 1 to create | 01:15"
    assert_whole_words(line, full)


def test_40_columns_keep_the_rows_whole() -> None:
    """At 40 columns what fits is the percent and the rows, never half a part."""
    line, full = shown(40)
    assert len(line) <= 39
    assert line == " 35% 35,000/100,000 rows"
    assert_whole_words(line, full)


def test_a_wide_terminal_gets_a_bar() -> None:
    """With room to spare the line gains a bar; the figures are unchanged."""
    display = RunDisplay(io.StringIO(), width=200)
    line = display.line(busy_run(display), width=200, elapsed=75.0)
    assert len(line) <= 199
    assert line.startswith(" 35% [") and "] 35,000/100,000 rows | jobs 1/3 done" in line


@pytest.mark.parametrize("width", [120, 80, 40])
def test_every_width_has_room_for_the_last_column(width: int) -> None:
    """The line leaves the terminal's last column free, where writing may wrap the line."""
    display = RunDisplay(io.StringIO(), width=width)
    progress = busy_run(display)
    for elapsed in (0.0, 1.0, 75.0, 4000.0):
        assert len(display.line(progress, width=width, elapsed=elapsed)) < width


def test_the_line_is_redrawn_in_place_and_cleared() -> None:
    """Each draw goes back to the line's start and erases what a longer line left."""
    stream = io.StringIO()
    display = RunDisplay(stream, width=40)
    progress = busy_run(display)
    display.draw(progress)
    display.finish(progress)
    assert stream.getvalue() == "\r 35% 35,000/100,000 rows\x1b[K" * 2 + "\n"


def run_on_terminal(tmp_path: Path, columns: int) -> tuple[int, str]:
    """`run --emulator` with stderr on a pseudo-terminal `columns` wide; the exit code and
    what the terminal got."""
    with (tmp_path / "in.jsonl").open("w") as file:
        for index in range(200):
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{index}"}]}
            file.write(json.dumps({"custom_id": f"r{index}", "body": body}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOGETHER_")}
    run = cli_on_terminal(
        "run", "in.jsonl", "-o", "out.jsonl", "--emulator", "--emulator-latency", "0.2",
        "--max-requests-per-batch", "50", cwd=tmp_path, env=env, columns=columns,
    )  # fmt: skip
    return run.returncode, run.shown


@pytest.mark.parametrize("columns", [80, 40])
def test_on_a_narrow_terminal_no_frame_wraps(tmp_path: Path, columns: int) -> None:
    """In a pseudo-terminal of 80 or 40 columns every frame of the live line fits in one
    row, and the last says 100% with every row."""
    code, drawn = run_on_terminal(tmp_path, columns)
    assert code == 0
    lines = drawn.replace("\r\n", "\n").split("\n")
    frames = [f.replace("\x1b[K", "") for line in lines for f in line.split("\r") if f.strip()]
    assert frames, drawn
    assert max(len(frame) for frame in frames) < columns
    assert frames[-1].startswith("100% ")
    assert "200/200 rows" in frames[-1]


def test_a_scheduled_retry_is_shown_on_the_line() -> None:
    """After the client schedules a retry the line says so (which try, the wait, the cause)."""
    display = RunDisplay(io.StringIO(), width=WIDE)
    progress = busy_run(display)
    display.note_retry(2, 5, 4.2, "503")
    assert "| retry 2/5 in 4s (503) |" in display.line(progress, width=WIDE, elapsed=75.0)


def test_the_retry_outlasts_the_status_breakdown_on_a_narrow_line() -> None:
    """When room runs out the status breakdown goes before the retry note does."""
    display = RunDisplay(io.StringIO(), width=80)
    progress = busy_run(display)
    display.note_retry(1, 5, 30.0, "no connection")
    line = display.line(progress, width=80, elapsed=75.0)
    assert "retry 1/5 in 30s (no connection)" in line and "VALIDATING" not in line
    assert len(line) <= 79


async def test_client_retries_reach_the_line_during_a_run(make_emulator: object) -> None:
    """A retry the client logs while the display follows a run shows up in what is drawn,
    and the command's stderr handler (WARNING and up) does not print it."""
    from together_async import AsyncTogether
    from together_async.emulator.faults import Fault

    emulator = await make_emulator(  # type: ignore[operator]
        faults=[Fault(kind="error", status=503, times=1, routes=("GET /batches",))]
    )
    stream = io.StringIO()
    display = RunDisplay(stream, width=WIDE)
    progress = busy_run(display)

    class Run:
        summary = BatchRunSummary(rows=100_000, rows_ok=33_000, rows_failed=10, jobs=3, shards=4)

    async def work() -> None:
        async with AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url) as client:
            await client.batches.list_batches()
        display.draw(progress)

    await display.follow(Run(), work())  # type: ignore[arg-type]
    assert "retry 1/5" in stream.getvalue() and "(503)" in stream.getvalue()


def test_a_log_record_on_a_terminal_clears_the_live_line_first() -> None:
    """The command's log handler starts a record with a line clear on a terminal, so it never
    reads glued to the live status line; piped, the record is as it was."""
    import logging

    from together_async.cli import _CommandLogHandler

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    record = logging.LogRecord("together_async.batches", logging.WARNING, "", 0, "note", (), None)
    on_terminal, piped = Terminal(), io.StringIO()
    _CommandLogHandler(on_terminal).emit(record)
    _CommandLogHandler(piped).emit(record)
    assert on_terminal.getvalue() == "\r\x1b[Knote\n"
    assert piped.getvalue() == "note\n"


def test_the_retry_note_is_gone_from_the_final_line() -> None:
    """The last line of a run shows no retry: the run is over."""
    stream = io.StringIO()
    display = RunDisplay(stream, width=WIDE)
    progress = busy_run(display)
    display.note_retry(5, 5, 9.0, "503")
    display.finish(progress)
    assert "retry" not in stream.getvalue().rsplit("\r", 1)[-1]
