"""What the command line writes: the result row shape, the results and errors files, the summary.

One JSON object per request: `{"custom_id", "status_code", "body"}` for a success and
`{"custom_id", "status_code", "error": {"message", "code"}}` for a failure (status_code is null
when the server gave none). Files are written through worker threads and renamed into place only
when complete, so an interrupted run never leaves a truncated results file behind.
"""

from __future__ import annotations

import logging
import os
import sys
from array import array
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import orjson

from ._models import BatchResult

__all__ = [
    "CommonError",
    "ErrorTally",
    "InputOrderWriter",
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


def remove_stale_staging(path: Path) -> list[Path]:
    """Delete the staging files (spool, partial) that a killed run left beside `path`.

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
        pid_text, _, kind = name[len(prefix) :].partition(".")
        if kind not in _STAGING_KINDS or not pid_text.isdecimal():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _process_alive(pid):
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


class InputOrderWriter:
    """Puts results that arrive in any order back in input order, holding 13 bytes per row.

    Each result's row goes to a spool file beside the output as it arrives, and its offset and
    length in arrays indexed by input position. `commit()` copies the rows in position order
    into the results file (the failed ones into the errors file too), in a worker thread, and
    renames both into place. So memory stays flat however many rows there are.
    """

    def __init__(self, output: Path, errors_output: Path) -> None:
        self._output = output
        self._errors_output = errors_output
        self._spool = _BlockWriter(_staging_path(output, "spool"))
        self._offsets = array("q")
        self._lengths = array("l")
        self._failed = bytearray()
        self._total = 0
        self._failed_count = 0
        self._errors = ErrorTally()

    async def open(self) -> None:
        """Create the spool file, after removing what a killed run left beside the outputs."""
        for path in (self._output, self._errors_output):
            await anyio.to_thread.run_sync(remove_stale_staging, path)
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
        """Write the results and errors files for input rows 0..rows-1, then drop the spool."""
        try:
            await self._spool.close()
            await anyio.to_thread.run_sync(self._copy_in_order, rows)
        finally:
            await self._spool.remove()
        return RowCounts(
            total=self._total,
            ok=self._total - self._failed_count,
            failed=self._failed_count,
            most_common_error=self._errors.most_common(),
        )

    async def discard(self) -> None:
        """Drop the spool (after a failure or Ctrl-C): no results file is written."""
        await self._spool.remove()

    def _copy_in_order(self, rows: int) -> None:
        offsets = self._offsets
        missing = next((p for p in range(rows) if p >= len(offsets) or offsets[p] < 0), None)
        if missing is not None:
            raise RuntimeError(f"no result for input row {missing + 1}")
        if self._total != rows:
            raise RuntimeError(f"{self._total} results for {rows} input rows")
        output = _staging_path(self._output, "partial")
        errors = _staging_path(self._errors_output, "partial")
        try:
            with (
                self._spool.path.open("rb") as spool,
                output.open("wb", buffering=_FLUSH_BYTES) as out,
                errors.open("wb", buffering=_FLUSH_BYTES) as err,
            ):
                spool_fd = spool.fileno()
                lengths, failed = self._lengths, self._failed
                for position in range(rows):
                    line = os.pread(spool_fd, lengths[position], offsets[position])
                    out.write(line)
                    if failed[position]:
                        err.write(line)
            output.replace(self._output)
            errors.replace(self._errors_output)
        finally:
            output.unlink(missing_ok=True)
            errors.unlink(missing_ok=True)


async def write_result_rows(results: AsyncIterable[BatchResult], output: Path | None) -> RowCounts:
    """Write the results as result rows, in the order given, to a file or (None) to stdout.

    A file is renamed into place only once complete; stdout gets blocks of about 64 KiB.
    """
    total = failed = 0
    errors = ErrorTally()
    staged = None if output is None else _StagedFile(output)
    stdout = anyio.wrap_file(sys.stdout.buffer) if staged is None else None
    pending: list[bytes] = []
    pending_bytes = 0

    async def flush() -> None:
        nonlocal pending, pending_bytes
        if pending and stdout is not None:
            await stdout.write(b"".join(pending))
            await stdout.flush()
        pending, pending_bytes = [], 0

    try:
        if staged is not None:
            await staged.open()
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
    return RowCounts(
        total=total, ok=total - failed, failed=failed, most_common_error=errors.most_common()
    )


@attrs.frozen(kw_only=True)
class RunSummary:
    """What `together-async run` did, printed at the end (and as JSON with --json)."""

    input: Path
    output: Path
    errors_output: Path
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
            "errors_output": str(self.errors_output),
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
        f"Results (one line per request, in input order): {summary.output}",
    ]
    if summary.rows_failed:
        lines.append(f"Failed requests only: {summary.errors_output}")
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
