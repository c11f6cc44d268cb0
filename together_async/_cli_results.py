"""What the command line writes: the result row shape, the results and errors files, the summary.

One JSON object per request: `{"custom_id", "status_code", "body"}` for a success and
`{"custom_id", "status_code", "error": {"message", "code"}}` for a failure (status_code is null
when the server gave none). Files are written through worker threads and renamed into place only
when complete, so an interrupted run never leaves a truncated results file behind.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import orjson

from ._models import BatchResult

__all__ = [
    "RowCounts",
    "RunSummary",
    "errors_path_for",
    "render_summary",
    "result_row",
    "write_result_rows",
    "write_results",
]

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
class RowCounts:
    """How many result rows were written, and how many of them failed."""

    total: int
    ok: int
    failed: int


class _StagedFile:
    """A file written in large blocks from a worker thread and renamed into place on commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self._file: Any = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def open(self) -> None:
        self._file = await anyio.open_file(self._staging, "wb")

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= _FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._pending:
            block = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            await self._file.write(block)

    async def commit(self) -> None:
        await self._flush()
        await self._file.aclose()
        await anyio.Path(self._staging).replace(self.path)

    async def discard(self) -> None:
        if self._file is not None:
            with anyio.CancelScope(shield=True):
                await self._file.aclose()
                await anyio.Path(self._staging).unlink(missing_ok=True)


async def write_results(
    results: Iterable[BatchResult] | AsyncIterable[BatchResult],
    output: Path,
    *,
    errors_output: Path | None = None,
) -> RowCounts:
    """Write every result to `output` and the failed ones to `errors_output`, in the given order.

    Both files are replaced only once complete. The errors file is always written (empty when
    nothing failed), so a stale one from an earlier run never lingers.
    """
    targets = [_StagedFile(output)]
    if errors_output is not None:
        targets.append(_StagedFile(errors_output))
    total = failed = 0
    try:
        for target in targets:
            await target.open()
        async for result in _aiterate(results):
            row = result_row(result)
            line = orjson.dumps(row) + b"\n"
            total += 1
            await targets[0].write(line)
            if "error" in row:
                failed += 1
                if errors_output is not None:
                    await targets[1].write(line)
        for target in targets:
            await target.commit()
    except BaseException:
        for target in targets:
            await target.discard()
        raise
    return RowCounts(total=total, ok=total - failed, failed=failed)


async def write_result_rows(rows: AsyncIterable[dict[str, Any]], output: Path | None) -> RowCounts:
    """Write result rows (see result_row) to a file, or to stdout when `output` is None."""
    total = failed = 0
    staged = None if output is None else _StagedFile(output)
    stdout = anyio.wrap_file(os.fdopen(os.dup(1), "wb")) if staged is None else None
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
        async for row in rows:
            total += 1
            failed += "error" in row
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
        if stdout is not None:
            with anyio.CancelScope(shield=True):
                await stdout.aclose()
    return RowCounts(total=total, ok=total - failed, failed=failed)


async def _aiterate(
    items: Iterable[BatchResult] | AsyncIterable[BatchResult],
) -> Any:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


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
