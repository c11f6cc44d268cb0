"""What the command line writes: the result row shape, the results and errors files, the summary.

One JSON object per request: `{"custom_id", "status_code", "body"}` for a success and
`{"custom_id", "status_code", "error": {"message", "code"}}` for a failure (status_code is null
when the server gave none). Files are written through worker threads and renamed into place only
when complete, so an interrupted run never leaves a truncated results file behind. An output
that is not a regular file (stdout, a FIFO, a device) is written into directly instead: renaming
over it would put a regular file in its place.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import sys
import tempfile
from array import array
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.to_thread
import attrs
import orjson

from ._errors import TogetherError
from ._models import BatchResult
from ._tempdirs import may_be_alive

__all__ = [
    "CommonError",
    "ErrorTally",
    "STDOUT",
    "InputOrderWriter",
    "OutputTarget",
    "RowCounts",
    "RunSummary",
    "errors_path_for",
    "remove_stale_staging",
    "render_summary",
    "result_row",
    "write_result_rows",
]

logger = logging.getLogger("together_async.cli")

_FLUSH_BYTES = 1024 * 1024
# How often opening a FIFO that has no reader yet is tried again.
_FIFO_RETRY_SECONDS = 0.05

STDOUT = Path("-")
"""The output path that means stdout (`-o -`)."""


def result_row(result: BatchResult) -> dict[str, Any]:
    """The JSON object the command line writes for one request's result."""
    row: dict[str, Any] = {"custom_id": result.custom_id, "status_code": result.status_code}
    if result.ok:
        row["body"] = result.body
    else:
        message = result.error_message
        if message is None:
            message = f"HTTP {result.status_code}" if result.status_code else "no response"
        row["error"] = {"message": message, "code": result.error_code}
    return row


def errors_path_for(output: Path) -> Path:
    """`results.jsonl` -> `results.errors.jsonl` (any other name gets `.errors.jsonl` added)."""
    name = output.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return output.with_name(stem + ".errors.jsonl")


@attrs.frozen(kw_only=True)
class CommonError:
    """The error most failed rows share, and on how many rows it was."""

    status_code: int | None
    code: str | None
    message: str
    rows: int

    def describe(self, *, max_chars: int = 160) -> str:
        """`400 invalid_request_error: 'messages' is required (1,000 rows)`."""
        message = self.message
        if len(message) > max_chars:
            cut = message[:max_chars].rsplit(" ", 1)[0] or message[:max_chars]
            message = cut.rstrip(" ,;:") + " ..."
        head = " ".join(str(part) for part in (self.status_code, self.code) if part is not None)
        noun = "row" if self.rows == 1 else "rows"
        return f"{head + ': ' if head else ''}{message} ({self.rows:,} {noun})"

    def as_json(self) -> dict[str, Any]:
        """The error as plain JSON data."""
        return {
            "status_code": self.status_code,
            "code": self.code,
            "message": self.message,
            "rows": self.rows,
        }


_MAX_DISTINCT_ERRORS = 10_000


class ErrorTally:
    """Counts failed rows by (status_code, code, message), to name the most common error.

    At most 10,000 distinct errors are told apart (rows with a new one after that are not
    counted), so a run whose every message differs keeps memory bounded.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[int | None, str | None, str], int] = {}

    def add(self, row: dict[str, Any]) -> None:
        """Count a result row, if it is a failure (`result_row`'s shape)."""
        error = row.get("error")
        if error is None:
            return
        key = (row.get("status_code"), error.get("code"), str(error.get("message")))
        counts = self._counts
        if key in counts:
            counts[key] += 1
        elif len(counts) < _MAX_DISTINCT_ERRORS:
            counts[key] = 1

    def most_common(self) -> CommonError | None:
        """The error on most rows (the first seen among equals), or None when none failed."""
        if not self._counts:
            return None
        (status_code, code, message), rows = max(self._counts.items(), key=lambda kv: kv[1])
        return CommonError(status_code=status_code, code=code, message=message, rows=rows)


@attrs.frozen(kw_only=True)
class RowCounts:
    """How many result rows were written, how many of them failed, and their most common
    error."""

    total: int
    ok: int
    failed: int
    most_common_error: CommonError | None = None


class _BlockWriter:
    """An async file writer that gathers small writes into ~1 MiB blocks for a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._file: Any = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def open(self) -> None:
        self._file = await anyio.open_file(self.path, "wb")

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.size += len(data)
        if self._pending_bytes >= _FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._pending:
            block = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            await self._file.write(block)

    async def close(self) -> None:
        """Write what is pending and close the file."""
        await self._flush()
        await self._file.aclose()
        self._file = None

    async def remove(self) -> None:
        """Close without writing what is pending, and delete the file (safe when cancelled)."""
        with anyio.CancelScope(shield=True):
            if self._file is not None:
                await self._file.aclose()
                self._file = None
            await anyio.Path(self.path).unlink(missing_ok=True)


class _StagedFile(_BlockWriter):
    """A file written beside its final path and renamed into place only on commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(_staging_path(path, "partial"))
        self.final_path = path

    async def commit(self) -> None:
        await self.close()
        await anyio.Path(self.path).replace(self.final_path)

    async def discard(self) -> None:
        await self.remove()


_STAGING_KINDS = ("spool", "partial")


def _staging_path(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


# The spool of a run whose output is not a regular file lives in a directory of its own
# choosing (the state's or TMPDIR) under this name, with a token: runs in one process differ.
_DETACHED_SPOOL = "together-async-run"


def _detached_spool_path(directory: Path) -> Path:
    return directory / f".{_DETACHED_SPOOL}.{os.getpid()}.{secrets.token_hex(4)}.spool"


def remove_stale_staging(path: Path) -> list[Path]:
    """Delete the staging files (spool, partial) that a killed run left beside `path`
    (`.NAME.PID.KIND` or `.NAME.PID.TOKEN.KIND`).

    Only files of processes that are gone: a run still writing beside the same output keeps
    its own. Blocking: call it in a worker thread. Returns what was removed.
    """
    removed: list[Path] = []
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split(".")
        if len(parts) not in (2, 3):
            continue
        pid_text, kind = parts[0], parts[-1]
        if kind not in _STAGING_KINDS or not pid_text.isdecimal():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or may_be_alive(pid):
            continue
        stale = path.with_name(name)
        try:
            stale.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove %s, left by an earlier run: %s", stale, exc)
            continue
        logger.info("removed %s, left by an earlier run that was killed", stale)
        removed.append(stale)
    return removed


class OutputTarget:
    """Where one of `run`'s files goes, and how it is written there.

    A regular file, or a name nothing has yet, is written under a staging name beside it and
    renamed over it once complete, so it is never left half-written; a symlink is followed to
    the file it names, which is what gets replaced (the link stays a link, as with
    `files.retrieve_content`). Anything else that exists (a FIFO, a character device, a
    terminal) and stdout are written into directly, as `command > target` would: a rename would
    put a regular file in their place, and a device cannot have a staging file beside it.
    """

    def __init__(self, name: Path, path: Path, *, direct: bool) -> None:
        self.name = name
        """The path as given, for messages."""
        self.path = path
        """The file renamed over (symlinks resolved), or the direct target opened."""
        self.direct = direct
        """Written into directly (stdout, a FIFO, a device) rather than staged and renamed."""
        self._stream: BinaryIO | None = None
        self._owned = False
        self._partial: Path | None = None
        self._file: BinaryIO | None = None

    @classmethod
    def file(cls, path: Path) -> OutputTarget:
        """A regular file at `path`, staged beside it and renamed into place."""
        return cls(path, path, direct=False)

    @classmethod
    def locate(cls, name: Path) -> OutputTarget:
        """How `name` is to be written, from what it is now (blocking: it stats the path)."""
        if name == STDOUT:
            return cls(name, name, direct=True)
        try:
            mode: int | None = os.stat(name).st_mode
        except FileNotFoundError:
            mode = None  # a new file, or a dangling symlink: its target is created
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # Opened by its own name: /dev/stdout and /proc/self/fd/N resolve to names that
            # cannot be opened.
            return cls(name, name, direct=True)
        return cls(name, Path(os.path.realpath(name)), direct=False)

    @property
    def is_stdout(self) -> bool:
        return self.direct and self.name == STDOUT

    def describe(self) -> str:
        return "stdout" if self.is_stdout else str(self.name)

    async def open(self) -> None:
        """Open a direct target now, before any work, so a device that refuses writing fails
        the run before it starts and a FIFO's reader always sees an end (it waits here for
        one). A staged file is only created when written."""
        if not self.direct or self._stream is not None:
            return
        if self.is_stdout:
            await anyio.to_thread.run_sync(sys.stdout.flush)
            self._stream = sys.stdout.buffer
            return
        self._stream = await _open_direct(self.path)
        self._owned = True

    def begin(self) -> BinaryIO:
        """The file to write the rows into (blocking)."""
        if self.direct:
            if self._stream is None:
                raise RuntimeError(f"{self.describe()} was not opened")
            return self._stream
        self._partial = _staging_path(self.path, "partial")
        self._file = self._partial.open("wb", buffering=_FLUSH_BYTES)
        return self._file

    def finish(self) -> None:
        """All rows are written: flush a direct target, rename a staged one into place."""
        if self.direct:
            if self._stream is not None:
                self._stream.flush()
            self.close()
            return
        if self._file is not None and self._partial is not None:
            self._file.close()
            self._file = None
            self._partial.replace(self.path)
            self._partial = None

    def close(self) -> None:
        """Drop a staging file not renamed yet and close a target this process opened
        (blocking, idempotent, never raises for a reader gone away)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
            self._partial = None
        if self._stream is not None and self._owned:
            stream, self._stream = self._stream, None
            try:
                stream.close()  # the descriptor is closed even when the flush fails
            except OSError as exc:
                logger.debug("closing %s: %s", self.name, exc)


async def _open_direct(path: Path) -> BinaryIO:
    """Open an existing FIFO or device for writing; a FIFO waits for its reader, cancellably."""
    flags = os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    told = False
    while True:
        try:
            fd = os.open(path, flags)
            break
        except OSError as exc:
            # ENXIO on a FIFO: no reader yet (a blocking open would hold a worker thread that
            # Ctrl-C cannot free). On a socket it never changes, so that is an error.
            if exc.errno == errno.ENXIO and _is_fifo(path):
                if not told:
                    logger.warning("waiting for a reader to open %s", path)
                    told = True
                await anyio.sleep(_FIFO_RETRY_SECONDS)
                continue
            reason = "cannot write to a socket" if exc.errno == errno.ENXIO else exc.strerror
            raise TogetherError(f"cannot write to {path}: {reason or exc}") from None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb", buffering=_FLUSH_BYTES)


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class InputOrderWriter:
    """Puts results that arrive in any order back in input order, holding 13 bytes per row.

    Each result's row goes to a spool file as it arrives, and its offset and length in arrays
    indexed by input position. `commit()` copies the rows in position order into the results
    target (the failed ones into the errors target too), in a worker thread; staged files are
    renamed into place then. So memory stays flat however many rows there are.

    The spool sits beside a regular output (where `remove_stale_staging` finds a killed run's);
    beside a FIFO or a device there is no room for one, so it goes to `spool_dir` (default
    TMPDIR) then.
    """

    def __init__(
        self,
        output: Path | OutputTarget,
        errors_output: Path | OutputTarget | None,
        *,
        spool_dir: Path | None = None,
    ) -> None:
        """Args:
        output: the results target (a Path is a regular file).
        errors_output: the failed rows' target, or None for no errors file.
        spool_dir: where the spool goes when `output` is written directly.
        """
        self._output = output if isinstance(output, OutputTarget) else OutputTarget.file(output)
        self._errors_output = (
            errors_output
            if errors_output is None or isinstance(errors_output, OutputTarget)
            else OutputTarget.file(errors_output)
        )
        if self._output.direct:
            directory = Path(tempfile.gettempdir()) if spool_dir is None else spool_dir
            self._stale_beside = [directory / _DETACHED_SPOOL]
            spool = _detached_spool_path(directory)
        else:
            self._stale_beside = [
                target.path
                for target in (self._output, self._errors_output)
                if target is not None and not target.direct
            ]
            spool = _staging_path(self._output.path, "spool")
        self._spool = _BlockWriter(spool)
        self._offsets = array("q")
        self._lengths = array("l")
        self._failed = bytearray()
        self._total = 0
        self._failed_count = 0
        self._errors = ErrorTally()

    @property
    def spool_path(self) -> Path:
        """Where the rows wait until `commit()`."""
        return self._spool.path

    async def open(self) -> None:
        """Open the direct targets and create the spool file, after removing what a killed
        run left beside the outputs (or in the spool's directory)."""
        for path in self._stale_beside:
            await anyio.to_thread.run_sync(remove_stale_staging, path)
        for target in (self._output, self._errors_output):
            if target is not None:
                await target.open()
        await self._spool.open()

    async def add(self, position: int, result: BatchResult) -> None:
        """Take the result of the input row at `position` (0-based)."""
        if position >= len(self._offsets):
            grow = max(position + 1, 2 * len(self._offsets), 1024) - len(self._offsets)
            self._offsets.extend(array("q", [-1]) * grow)
            self._lengths.extend(array("l", [0]) * grow)
            self._failed.extend(bytes(grow))
        if self._offsets[position] != -1:
            raise RuntimeError(f"two results for input row {position + 1}")
        row = result_row(result)
        line = orjson.dumps(row) + b"\n"
        self._offsets[position] = self._spool.size
        self._lengths[position] = len(line)
        self._total += 1
        if "error" in row:
            self._failed[position] = 1
            self._failed_count += 1
            self._errors.add(row)
        await self._spool.write(line)

    async def commit(self, rows: int) -> RowCounts:
        """Write the results and errors for input rows 0..rows-1, then drop the spool."""
        try:
            await self._spool.close()
            await anyio.to_thread.run_sync(self._copy_in_order, rows)
        finally:
            await self.discard()
        return RowCounts(
            total=self._total,
            ok=self._total - self._failed_count,
            failed=self._failed_count,
            most_common_error=self._errors.most_common(),
        )

    async def discard(self) -> None:
        """Drop the spool (after a failure or Ctrl-C) and close the direct targets: no
        results file is written."""
        with anyio.CancelScope(shield=True):
            await self._spool.remove()
            await anyio.to_thread.run_sync(self._close_targets)

    def _close_targets(self) -> None:
        for target in (self._output, self._errors_output):
            if target is not None:
                target.close()

    def _copy_in_order(self, rows: int) -> None:
        offsets = self._offsets
        missing = next((p for p in range(rows) if p >= len(offsets) or offsets[p] < 0), None)
        if missing is not None:
            raise RuntimeError(f"no result for input row {missing + 1}")
        if self._total != rows:
            raise RuntimeError(f"{self._total} results for {rows} input rows")
        output, errors = self._output, self._errors_output
        failure: tuple[OutputTarget, OSError] | None = None
        try:
            writing = output
            with self._spool.path.open("rb") as spool:
                out = output.begin()
                err = None
                errors_target = output
                if errors is not None:
                    writing = errors_target = errors
                    err = errors.begin()
                spool_fd = spool.fileno()
                lengths, failed = self._lengths, self._failed
                for position in range(rows):
                    line = os.pread(spool_fd, lengths[position], offsets[position])
                    writing = output
                    out.write(line)
                    if failed[position] and err is not None:
                        writing = errors_target
                        err.write(line)
                writing = output
                output.finish()
                if errors is not None:
                    writing = errors
                    errors.finish()
        except OSError as exc:
            failure = (writing, exc)
        finally:
            self._close_targets()
        if failure is not None:
            # Raised outside the handler so no broken pipe hangs on it as context: only
            # stdout's reader leaving is the quiet end of a pipeline (see cli.run_cli).
            target, error = failure
            if target.is_stdout and isinstance(error, BrokenPipeError):
                raise error
            raise TogetherError(f"writing {target.describe()}: {_write_failure(error)}")


async def write_result_rows(results: AsyncIterable[BatchResult], output: Path | None) -> RowCounts:
    """Write the results as result rows, in the order given, to a file or (None, `-`) stdout.

    A file is renamed into place only once complete (through a symlink to its file); a FIFO
    or a device is written into directly, as stdout is, in blocks of about 64 KiB.
    """
    total = failed = 0
    errors = ErrorTally()
    target = None
    if output is not None and output != STDOUT:
        target = await anyio.to_thread.run_sync(OutputTarget.locate, output)
    staged = None if target is None or target.direct else _StagedFile(target.path)
    direct: Any = None  # an anyio file over the FIFO or device, closed here
    stream: Any = None if staged is not None else anyio.wrap_file(sys.stdout.buffer)
    pending: list[bytes] = []
    pending_bytes = 0

    async def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending or stream is None:
            return
        data = b"".join(pending)
        pending, pending_bytes = [], 0
        failure: OSError | None = None
        try:
            await stream.write(data)
            await stream.flush()
        except OSError as exc:
            if direct is None:
                raise  # stdout: a reader gone is the quiet end of a pipeline
            failure = exc
        if failure is not None:
            # Outside the handler: no broken pipe as context, which would read as stdout's.
            raise TogetherError(f"writing {output}: {_write_failure(failure)}")

    try:
        if staged is not None:
            await staged.open()
        elif target is not None:
            direct = stream = anyio.wrap_file(await _open_direct(target.path))
        async for result in results:
            row = result_row(result)
            total += 1
            if "error" in row:
                failed += 1
                errors.add(row)
            line = orjson.dumps(row) + b"\n"
            if staged is not None:
                await staged.write(line)
            else:
                pending.append(line)
                pending_bytes += len(line)
                if pending_bytes >= 64 * 1024:
                    await flush()
        if staged is not None:
            await staged.commit()
        else:
            await flush()
    except BaseException:
        if staged is not None:
            await staged.discard()
        raise
    finally:
        if direct is not None:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(OSError):
                    await direct.aclose()
    return RowCounts(
        total=total, ok=total - failed, failed=failed, most_common_error=errors.most_common()
    )


def _write_failure(error: OSError) -> str:
    if isinstance(error, BrokenPipeError):
        return "its reader closed it before all results were written"
    return error.strerror or str(error)


@attrs.frozen(kw_only=True)
class RunSummary:
    """What `together-async run` did, printed at the end (and as JSON with --json)."""

    input: Path
    output: Path
    errors_output: Path | None
    """None when no errors file was written (the output is stdout, a FIFO or a device)."""
    endpoint: str
    jobs: int
    shards: int
    rows: int
    rows_ok: int
    rows_failed: int
    resubmitted_rows: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    wall_seconds: float
    resumed: bool
    emulator: bool
    state: Path | None
    most_common_error: CommonError | None = None

    def as_json(self) -> dict[str, Any]:
        """The summary as plain JSON data."""
        return {
            "input": str(self.input),
            "output": str(self.output),
            "errors_output": None if self.errors_output is None else str(self.errors_output),
            "endpoint": self.endpoint,
            "jobs": self.jobs,
            "shards": self.shards,
            "rows": self.rows,
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "most_common_error": (
                None if self.most_common_error is None else self.most_common_error.as_json()
            ),
            "resubmitted_rows": self.resubmitted_rows,
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "total": self.total_tokens,
            },
            "wall_seconds": round(self.wall_seconds, 3),
            "resumed": self.resumed,
            "emulator": self.emulator,
            "state": None if self.state is None else str(self.state),
        }


def render_summary(summary: RunSummary) -> str:
    """The summary as a few lines a person reads."""
    jobs = f"{summary.jobs:,} batch job" + ("" if summary.jobs == 1 else "s")
    where = " on the local emulator" if summary.emulator else ""
    resumed = " (resumed)" if summary.resumed else ""
    lines = [
        f"Done{resumed}: {summary.rows:,} requests in {jobs}{where}, "
        f"{_duration(summary.wall_seconds)}.",
        f"  succeeded:    {summary.rows_ok:,}",
        f"  failed:       {summary.rows_failed:,}",
    ]
    if summary.most_common_error is not None:
        lines.append(f"  most common error: {summary.most_common_error.describe()}")
    if summary.resubmitted_rows:
        lines.append(f"  resubmitted:  {summary.resubmitted_rows:,} (retryable failures)")
    lines += [
        f"  tokens:       {summary.total_tokens:,} ({summary.prompt_tokens:,} prompt + "
        f"{summary.completion_tokens:,} completion)",
        "Results (one line per request, in input order): "
        + ("stdout" if summary.output == STDOUT else str(summary.output)),
    ]
    if summary.rows_failed and summary.errors_output is not None:
        lines.append(f"Failed requests only: {summary.errors_output}")
    elif summary.rows_failed:
        lines.append(
            "Failed requests are in the results only: no errors file is written for an "
            "output that is stdout, a FIFO or a device."
        )
    if summary.emulator:
        lines.append(
            "The emulator answers with synthetic text, no model ran. For real results set "
            "TOGETHER_API_KEY and run again without --emulator."
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
