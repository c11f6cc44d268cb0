"""`together-async run`: one batch file through gather_batches, with a live display, results
files and a summary. The target is the API (key and base URL as for every command) or, with
`--emulator`, an in-process emulator with settings that make a 1,000-row file finish in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shlex
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import orjson

from ._cli_results import STDOUT, InputOrderWriter, OutputTarget, RunSummary, errors_path_for
from ._client import AsyncTogether
from ._errors import APIConnectionError, APITimeoutError, InvalidArgumentError
from ._models import BatchEndpoint, BatchJob
from .gather import MAX_REQUESTS_PER_BATCH, BatchRun, BatchRunSummary
from .progress import RunProgress, run_progress

__all__ = [
    "DEFAULT_ENDPOINT",
    "EMULATOR_LATENCY",
    "RunDisplay",
    "RunInterrupted",
    "check_run_paths",
    "emulator_data_dir",
    "first_line_url",
    "interrupted_message",
    "run_batch_file",
    "stderr_is_terminal",
]

DEFAULT_ENDPOINT = BatchEndpoint.CHAT_COMPLETIONS.value
EMULATOR_LATENCY = 0.02
"""Simulated seconds per request on `--emulator`: 1,000 rows take about a second, so the
progress display is visible without making anyone wait."""
_REFRESH_SECONDS = 0.25


class RunInterrupted(Exception):
    """The run was interrupted (Ctrl-C); the message says what happened to its jobs."""


def emulator_data_dir(state: Path) -> Path:
    """Where `--emulator` keeps its files when `--state` is given, so a rerun can resume."""
    return state.with_name(state.name + ".emulator")


async def first_line_url(path: Path) -> str | None:
    """The `url` of a batch file's first line, if it has one (the endpoint when none is given)."""

    def read() -> bytes:
        with path.open("rb") as file:
            return file.readline(1024 * 1024)

    try:
        request = orjson.loads(await anyio.to_thread.run_sync(read))
    except orjson.JSONDecodeError:
        return None
    url = request.get("url") if isinstance(request, dict) else None
    return url if isinstance(url, str) and url.startswith("/") else None


@contextlib.asynccontextmanager
async def _open_target(args: argparse.Namespace) -> AsyncIterator[AsyncTogether]:
    if not args.emulator:
        async with AsyncTogether(api_key=args.api_key, base_url=args.base_url) as client:
            yield client
        return
    from .emulator import Emulator

    data_dir = None if args.state is None else emulator_data_dir(args.state)
    # A fresh random key: the emulator then checks it like the real API would.
    key = secrets.token_urlsafe(24)
    async with Emulator(
        data_dir=data_dir, api_key=key, latency=args.emulator_latency, concurrency=32
    ) as emulator:
        async with AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url) as client:
            yield client


async def run_batch_file(
    args: argparse.Namespace,
    *,
    poll_interval: float,
    max_interval: float,
    display_stream: IO[str] | None,
) -> RunSummary:
    """Run args.input end to end and write the results files; the summary of what happened.

    Args:
        args: the parsed `run` options.
        poll_interval, max_interval: the job polling schedule (see watch.PollSchedule).
        display_stream: where the live display goes (stderr on a terminal), or None for none.

    Raises:
        RunInterrupted: when cancelled (Ctrl-C); the jobs are cancelled without --state and
            left running (resumable) with it.
    """
    endpoint = args.endpoint or await first_line_url(args.input) or DEFAULT_ENDPOINT
    options: dict[str, Any] = {
        "endpoint": endpoint,
        "model": args.model,
        "max_requests_per_batch": args.max_requests_per_batch,
        "state_path": args.state,
        "poll_interval": poll_interval,
        "max_interval": max_interval,
    }
    if args.max_attempts is not None:
        options["max_attempts"] = args.max_attempts
    if not await anyio.Path(args.input).is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(args.input))
    output = await anyio.to_thread.run_sync(OutputTarget.locate, args.output)
    if not output.direct and not await anyio.Path(output.path.parent).is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(args.output.parent))
    # Beside a FIFO or a device there is no file to hold only the failed rows: they are in
    # the results stream, and the summary says so.
    errors_name = None if output.direct else errors_path_for(args.output)
    await anyio.to_thread.run_sync(
        check_run_paths, args.input, args.output, errors_name, args.state, args.emulator
    )
    errors_output = (
        None
        if errors_name is None
        else await anyio.to_thread.run_sync(OutputTarget.locate, errors_name)
    )
    spool_dir = None if args.state is None else args.state.absolute().parent
    writer = InputOrderWriter(output, errors_output, spool_dir=spool_dir)
    run: BatchRun | None = None
    try:
        await writer.open()
        async with _open_target(args) as client:
            display = None if display_stream is None else RunDisplay(display_stream)
            run = BatchRun(client, args.input, progress=display or False, **options)
            collecting = _collect(run, writer)
            if display is None:
                await collecting
            else:
                await display.follow(run, collecting)
        counts = await writer.commit(run.summary.rows)
    except asyncio.CancelledError:
        await writer.discard()
        jobs = 0 if run is None else run.summary.jobs
        raise RunInterrupted(
            interrupted_message(args, jobs, output_is_file=not output.direct)
        ) from None
    except BaseException:
        await writer.discard()
        raise
    final = run.summary
    return RunSummary(
        input=args.input,
        output=args.output,
        errors_output=errors_name,
        endpoint=endpoint,
        jobs=final.jobs,
        shards=final.shards,
        rows=counts.total,
        rows_ok=counts.ok,
        rows_failed=counts.failed,
        resubmitted_rows=final.resubmitted_rows,
        prompt_tokens=final.usage.get("prompt_tokens", 0),
        completion_tokens=final.usage.get("completion_tokens", 0),
        total_tokens=final.usage.get("total_tokens", 0),
        wall_seconds=final.wall_time,
        resumed=final.resumed,
        emulator=args.emulator,
        state=args.state,
        most_common_error=counts.most_common_error,
    )


def check_run_paths(
    input: Path, output: Path, errors_output: Path | None, state: Path | None, emulator: bool
) -> None:
    """Refuse, before any work, outputs that would overwrite the input or the run's state.

    Compared as resolved paths (symlinks followed) and by inode where both exist, so
    `run x.jsonl -o ./x.jsonl` or a hard link to the input is caught too; `-o -` is compared
    by what stdout is (`run x.jsonl -o - >> x.jsonl`). errors_output is None when no errors
    file is written. Blocking: call it in a worker thread.
    """

    def same(a: Path, b: Path) -> bool:
        if a == STDOUT:
            return _stdout_is(b)
        if a.resolve() == b.resolve():
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False

    def inside(path: Path, directory: Path) -> bool:
        return path != STDOUT and path.resolve().is_relative_to(directory.resolve())

    targets = [(output, "-o/--output")]
    if errors_output is not None:
        targets.append((errors_output, "the errors file"))
    for target, option in targets:
        if target != STDOUT and target.is_dir():
            raise InvalidArgumentError(
                f"{option} {target} is a directory: give a file path, e.g. "
                f"{target / 'results.jsonl'}"
            )
        if same(target, input):
            what = "stdout" if target == STDOUT else target
            raise InvalidArgumentError(
                f"{option} {what} is the input file: the results would overwrite it; "
                "choose another output path"
            )
        if state is None:
            continue
        if same(target, state):
            raise InvalidArgumentError(
                f"{option} {target} is the --state file: choose another output path"
            )
        protected = [Path(f"{state}.files")]
        if emulator:
            protected.append(emulator_data_dir(state))
        for directory in protected:
            if inside(target, directory):
                raise InvalidArgumentError(
                    f"{option} {target} is inside {directory}, which the run keeps its "
                    "files in: choose an output outside it"
                )
    if state is not None and same(state, input):
        raise InvalidArgumentError(
            f"--state {state} is the input file: choose another path for the run's state"
        )


def _stdout_is(path: Path) -> bool:
    """Whether stdout is redirected to the regular file at `path` (`-o - >> path`)."""
    try:
        ours = os.fstat(sys.stdout.fileno())
        theirs = os.stat(path)
    except (AttributeError, OSError, ValueError):
        return False  # no descriptor (captured in tests), or no such file
    return stat.S_ISREG(ours.st_mode) and (ours.st_dev, ours.st_ino) == (
        theirs.st_dev,
        theirs.st_ino,
    )


async def _collect(run: BatchRun, writer: InputOrderWriter) -> None:
    """Stream the run's results into the writer, which puts them back in input order."""
    async with contextlib.aclosing(run.stream_with_positions()) as results:
        async for position, result in results:
            await writer.add(position, result)


def resume_command(args: argparse.Namespace) -> str:
    """The `run` command line that resumes this run as it is, to copy and paste.

    It carries every option the state and the run depend on that was given (the API key
    never: it is read again from --api-key or TOGETHER_API_KEY), so it works verbatim.
    """
    words = ["together-async", "run", str(args.input), "-o", str(args.output)]
    if args.state is not None:
        words += ["--state", str(args.state)]
    defaults = {"max_requests_per_batch": MAX_REQUESTS_PER_BATCH}
    for name, option in (
        ("endpoint", "--endpoint"),
        ("model", "--model"),
        ("max_requests_per_batch", "--max-requests-per-batch"),
        ("max_attempts", "--max-attempts"),
        ("poll_interval", "--poll-interval"),
        ("max_poll_interval", "--max-poll-interval"),
        ("base_url", "--base-url"),
    ):
        value = getattr(args, name, None)
        if value is not None and value != defaults.get(name):
            words += [option, str(value)]
    if args.emulator:
        words.append("--emulator")
        if args.emulator_latency != EMULATOR_LATENCY:
            words += ["--emulator-latency", str(args.emulator_latency)]
    return shlex.join(words)


def interrupted_message(args: argparse.Namespace, jobs: int, *, output_is_file: bool = True) -> str:
    """What to tell the user after Ctrl-C: what became of the jobs, and how to go on.

    The --state suggested sits beside the output, or beside the input when the output is not
    a file to put one beside (stdout, a FIFO, a device).
    """
    one = jobs == 1
    started = f"{jobs} batch job" + ("" if one else "s")
    if args.state is None:
        beside = args.output if output_is_file else args.input
        suggestion = beside.with_name(beside.name + ".state")
        again = argparse.Namespace(**{**vars(args), "state": suggestion})
        return (
            f"interrupted: the {started} this run created "
            + ("was" if one else "were")
            + " cancelled.\nTo be able to resume after an interruption, pass --state next "
            f"time, e.g.:\n  {resume_command(again)}"
        )
    if args.emulator:
        # The in-process emulator ends with this command: its jobs wait in its data beside
        # the state file and go on when the command is run again.
        fate = (
            f"the {started} already created "
            + ("is" if one else "are")
            + f" recorded in {args.state}; the in-process emulator stopped with this command "
            "and runs " + ("it" if one else "them") + " on when you resume"
        )
    else:
        fate = (
            f"the {started} already created "
            + ("keeps" if one else "keep")
            + " running and "
            + ("is" if one else "are")
            + f" recorded in {args.state}"
        )
    key_hint = (
        "\n(the API key is not repeated here: pass --api-key again or set TOGETHER_API_KEY)"
        if getattr(args, "api_key", None)
        else ""
    )
    return (
        f"interrupted: {fate}.\nResume (nothing is uploaded or created twice) with:\n"
        f"  {resume_command(args)}{key_hint}"
    )


class RunDisplay:
    """A live status line of a run on a terminal: percent and rows done of the total, jobs
    done of the jobs created (and still to create), jobs by status, rate and elapsed time.

    Fed by the run's job watcher (it is a JobObserver) and by the run's summary, read a few
    times a second; the figures are `progress.run_progress`'s, so the line says 100% only
    once every row has its result. The line fits the terminal: parts are dropped whole, least
    important first (the bar, the rate, the status breakdown, the elapsed time, the jobs to
    create, the jobs), so it never wraps and never cuts a word.
    """

    def __init__(self, stream: IO[str], *, width: int | None = None) -> None:
        """Args:
        stream: where to draw (a terminal).
        width: the columns to fit in; None to ask the terminal at every redraw (it may be
            resized).
        """
        self._stream = stream
        self._width = width
        self._jobs: dict[str, BatchJob] = {}
        self._drawn = False
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self._blocks = encoding.startswith("utf")
        # Drawing happens in worker threads, where there is no event loop clock.
        self._started = time.monotonic()
        # The last retry the client scheduled: (when it was told, what to show).
        self._retry: tuple[float, float, str] | None = None

    # JobObserver
    def update(self, job: BatchJob) -> None:
        """Take note of a job's new state."""
        self._jobs[job.id] = job

    def close(self) -> None:
        """The watcher ended; the display itself ends with the run."""

    def note_retry(self, number: int, of: int, wait: float, reason: str) -> None:
        """Show, until that retry is due (and a little after), that a call is being retried."""
        text = (
            f"retry {number}/{of} in {wait:.0f}s ({reason})"
            if wait >= 1
            else (f"retry {number}/{of} ({reason})")
        )
        self._retry = (time.monotonic(), wait, text)

    def _retry_text(self) -> str | None:
        if self._retry is None:
            return None
        told, wait, text = self._retry
        return text if time.monotonic() - told <= wait + _RETRY_SHOWN_AFTER else None

    async def follow(self, run: BatchRun, work: Awaitable[None]) -> None:
        """Await `work` (which drives `run`) while redrawing the status line."""
        self._started = time.monotonic()
        with _retries_shown_on(self):
            await self._follow(run, work)

    async def _follow(self, run: BatchRun, work: Awaitable[None]) -> None:
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._redraw_forever, run)
                try:
                    await work
                except Exception as exc:
                    # Kept out of the task group, which would wrap it in an ExceptionGroup:
                    # the run's own error is what the user must read, as when piped.
                    failure = exc
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.finish, self.progress(run.summary))
        if failure is not None:
            raise failure

    async def _redraw_forever(self, run: BatchRun) -> None:
        while True:
            # The figures are taken here, on the loop that updates them; only the drawing,
            # which may block on a slow terminal, goes to a worker thread.
            await anyio.to_thread.run_sync(self.draw, self.progress(run.summary))
            await anyio.sleep(_REFRESH_SECONDS)

    def progress(self, summary: BatchRunSummary) -> RunProgress:
        """The run's progress from its summary and the job states seen."""
        return run_progress(summary, self._jobs.values())

    def line(self, progress: RunProgress, *, width: int, elapsed: float) -> str:
        """The status line for `progress`, at most `width - 1` characters (the last column
        is left free: writing there makes some terminals wrap)."""
        room = width - 1
        percent = f"{progress.percent:3d}%"
        rows = progress.rows_text()
        rate = f"{progress.rows_done / elapsed:,.0f} rows/s" if elapsed > 0 else None
        optional: dict[str, str | None] = {
            "jobs": progress.jobs_text(),
            "to_create": progress.to_create_text(),
            "statuses": progress.statuses_text(),
            "elapsed": _clock(elapsed),
            "rate": rate,
            "retry": self._retry_text(),
        }

        def compose(kept: Mapping[str, str], bar: str | None = None) -> str:
            head = " ".join(part for part in (percent, bar, rows) if part)
            jobs = kept.get("jobs")
            if jobs:
                if kept.get("to_create"):
                    jobs += f", {kept['to_create']}"
                if kept.get("statuses"):
                    jobs += f" {kept['statuses']}"
            groups = [head, jobs, kept.get("retry"), kept.get("rate"), kept.get("elapsed")]
            return " | ".join(group for group in groups if group)

        kept = {name: text for name, text in optional.items() if text}
        everything = len(kept)
        text = compose(kept)
        for name in _DROP_ORDER:
            if len(text) <= room:
                break
            kept.pop(name, None)
            text = compose(kept)
        if len(text) > room:
            text = percent if len(percent) <= room else ""
        elif len(kept) == everything:
            # Room to spare with every part shown: the bar takes some of it.
            spare = room - len(text) - 3  # "[", "]" and a space
            if spare >= _MIN_BAR:
                text = compose(kept, self._bar(progress, min(spare, _MAX_BAR)))
        return text

    def _bar(self, progress: RunProgress, size: int) -> str:
        share = progress.percent / 100
        if not self._blocks:
            filled = int(share * size)
            return "[" + "#" * filled + "-" * (size - filled) + "]"
        eighths = int(share * size * 8)
        full, part = divmod(eighths, 8)
        partial = _EIGHTHS[part] if part and full < size else ""
        return "[" + "█" * full + partial + " " * (size - full - len(partial)) + "]"

    def _columns(self) -> int:
        if self._width is not None:
            return self._width
        try:
            columns = os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns or shutil.get_terminal_size().columns or 80

    def draw(self, progress: RunProgress) -> None:
        """Redraw the line in place (blocking: call from a worker thread)."""
        if progress.rows == 0:
            return  # still reading the input
        text = self.line(progress, width=self._columns(), elapsed=time.monotonic() - self._started)
        # Back to the line's start, the new text, then erase what a longer line left.
        self._stream.write("\r" + text + "\x1b[K")
        self._stream.flush()
        self._drawn = True

    def finish(self, progress: RunProgress) -> None:
        """Draw the last state and end the line (blocking)."""
        self._retry = None  # the run is over: no retry is pending any more
        self.draw(progress)
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


# The parts of the status line dropped, in this order, when the terminal is too narrow.
_DROP_ORDER = ("rate", "statuses", "elapsed", "to_create", "retry", "jobs")
# Seconds a retry stays on the line after it was due (its attempt is then under way).
_RETRY_SHOWN_AFTER = 0.5


class _RetryNotes(logging.Handler):
    """Hands the client's retry records (see `_client.py`) to the display's line."""

    def __init__(self, display: RunDisplay) -> None:
        super().__init__(logging.INFO)
        self._display = display

    def emit(self, record: logging.LogRecord) -> None:
        told = getattr(record, "together_retry", None)
        if told is None:
            return
        number, of, wait = told
        failure = record.args[-1] if isinstance(record.args, tuple) and record.args else None
        status = getattr(failure, "status_code", None)
        if status is not None:
            reason = str(status)
        elif isinstance(failure, APITimeoutError):
            reason = "timeout"
        elif isinstance(failure, APIConnectionError):
            reason = "no connection"
        else:
            reason = type(failure).__name__
        self._display.note_retry(number, of, wait, reason)


@contextlib.contextmanager
def _retries_shown_on(display: RunDisplay) -> Iterator[None]:
    client_logger = logging.getLogger("together_async.client")
    handler = _RetryNotes(display)
    level = client_logger.level
    if client_logger.getEffectiveLevel() > logging.INFO:
        client_logger.setLevel(logging.INFO)
    client_logger.addHandler(handler)
    try:
        yield
    finally:
        client_logger.removeHandler(handler)
        client_logger.setLevel(level)


_MIN_BAR = 10
_MAX_BAR = 30
_EIGHTHS = " ▏▎▍▌▋▊▉"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def stderr_is_terminal() -> bool:
    """True when stderr is a terminal (the live display is drawn only then)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
