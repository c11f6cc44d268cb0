"""Streaming JSONL: line splitting, line decoding, and the batch-input-file validator.

Shared by the client (upload check, results decoding, gather) and the emulator (server-side
validation), so both apply one set of rules. The pure parts do no I/O; the async readers do theirs
in worker threads, one chunk at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import attrs
import orjson

from ._errors import BatchFileError, InvalidArgumentError

__all__ = [
    "CHUNK_SIZE",
    "BatchFileProblem",
    "BatchFileReport",
    "BatchFileValidator",
    "JsonLinesDecoder",
    "LineSplitter",
    "aiter_file_chunks",
    "aiter_file_lines",
    "aiter_json",
    "aiter_lines",
    "check_batch_bytes",
    "check_batch_chunks",
    "check_batch_file",
    "raise_for_problems",
    "validate_batch_bytes",
    "validate_batch_file",
]

CHUNK_SIZE = 1024 * 1024
"""How much the file readers read at a time."""

DEFAULT_MAX_LINES = 50_000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_PROBLEMS = 20
MAX_CUSTOM_ID_CHARS = 64
ALLOWED_METHODS = ("POST", "FILE")

_BOM = b"\xef\xbb\xbf"


class LineSplitter:
    """Cuts a byte stream, fed in chunks of any size, into lines.

    `b"\\n"` ends a line and is removed; a `b"\\r"` before it is kept, so the caller decides
    what CRLF means. Memory holds one partial line at most, and `max_line_bytes` bounds it.

    Example:
        splitter = LineSplitter()
        splitter.feed(b'{"a": 1}\\n{"b"')   # [b'{"a": 1}']
        splitter.feed(b": 2}")              # []
        splitter.flush()                    # b'{"b": 2}'
    """

    def __init__(self, *, max_line_bytes: int | None = None) -> None:
        """Args:
        max_line_bytes: a line longer than this (without its newline) raises ValueError
            naming the line; None means no limit beyond the caller's own.
        """
        self._max_line_bytes = max_line_bytes
        # The partial last line, as pieces: joining once at the newline keeps a line that
        # spans many chunks linear instead of quadratic.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._lines_done = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines that `chunk` completes, in order."""
        if b"\n" not in chunk:
            if chunk:
                self._pending.append(chunk)
                self._pending_size += len(chunk)
                self._check_pending()
            return []
        lines = chunk.split(b"\n")
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = b"".join(self._pending)
        tail = lines.pop()
        self._pending = [tail] if tail else []
        self._pending_size = len(tail)
        if self._max_line_bytes is not None:
            self._check_lines(lines, self._max_line_bytes)
        self._lines_done += len(lines)
        self._check_pending()
        return lines

    def flush(self) -> bytes | None:
        """The last line if the data did not end with a newline, else None."""
        if not self._pending:
            return None
        line = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        self._lines_done += 1
        return line

    def _check_lines(self, lines: list[bytes], limit: int) -> None:
        if max(map(len, lines)) > limit:
            index = next(i for i, line in enumerate(lines) if len(line) > limit)
            self._raise_too_long(self._lines_done + index + 1)

    def _check_pending(self) -> None:
        if self._max_line_bytes is not None and self._pending_size > self._max_line_bytes:
            self._raise_too_long(self._lines_done + 1)

    def _raise_too_long(self, line_number: int) -> None:
        raise ValueError(
            f"line {line_number}: longer than the limit of {self._max_line_bytes:,} bytes"
        )


class JsonLinesDecoder:
    """Decodes JSON Lines fed in chunks of any size: one value per line, with orjson.

    Tolerant where data files need it: CRLF endings and blank lines are accepted (blank lines
    are skipped). A line that is not JSON raises ValueError naming the source and line number.
    """

    def __init__(self, *, source: str = "<data>", max_line_bytes: int | None = None) -> None:
        """Args:
        source: names the data in error messages (a file name or a file id).
        max_line_bytes: see LineSplitter.
        """
        self._source = source
        self._splitter = LineSplitter(max_line_bytes=max_line_bytes)
        self._line_number = 0

    def feed(self, chunk: bytes) -> list[Any]:
        """The values of the lines that `chunk` completes."""
        return self._decode(self._splitter.feed(chunk))

    def finish(self) -> list[Any]:
        """The value of the last line when the data did not end with a newline."""
        last = self._splitter.flush()
        return [] if last is None else self._decode([last])

    def _decode(self, lines: list[bytes]) -> list[Any]:
        values = []
        for line in lines:
            self._line_number += 1
            if not line or line.isspace():  # blank, or a CRLF file's blank line
                continue
            try:
                values.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise ValueError(
                    f"{self._source}: line {self._line_number}: not valid JSON ({exc.msg})"
                ) from exc
        return values


async def aiter_lines(
    chunks: AsyncIterable[bytes], *, max_line_bytes: int | None = None
) -> AsyncGenerator[bytes, None]:
    """The lines of an async byte stream, without their line endings (LF or CRLF).

    Blank lines are yielded too, so a caller can count lines.
    """
    splitter = LineSplitter(max_line_bytes=max_line_bytes)
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            yield line[:-1] if line.endswith(b"\r") else line
    last = splitter.flush()
    if last is not None:
        yield last[:-1] if last.endswith(b"\r") else last


async def aiter_file_chunks(
    path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE
) -> AsyncGenerator[bytes, None]:
    """The bytes of a local file, `chunk_size` at a time, each read in a worker thread."""
    async with await anyio.open_file(path, "rb") as file:
        while chunk := await file.read(chunk_size):
            yield chunk


async def aiter_file_lines(
    path: str | os.PathLike[str],
    *,
    chunk_size: int = CHUNK_SIZE,
    max_line_bytes: int | None = None,
) -> AsyncGenerator[bytes, None]:
    """The lines of a local file, as aiter_lines gives them, read chunk by chunk off the loop.

    Close the iterator (`contextlib.aclosing`) if you stop early, so the file is closed at once.
    """
    async with contextlib.aclosing(aiter_file_chunks(path, chunk_size=chunk_size)) as chunks:
        async for line in aiter_lines(chunks, max_line_bytes=max_line_bytes):
            yield line


async def aiter_json(
    chunks: AsyncIterable[bytes], *, source: str = "<data>", max_line_bytes: int | None = None
) -> AsyncGenerator[Any, None]:
    """The decoded values of an async JSON Lines byte stream; see JsonLinesDecoder."""
    decoder = JsonLinesDecoder(source=source, max_line_bytes=max_line_bytes)
    async for chunk in chunks:
        for value in decoder.feed(chunk):
            yield value
    for value in decoder.finish():
        yield value


@attrs.frozen(kw_only=True)
class BatchFileProblem:
    """One thing wrong with a batch input file.

    `line` is 1-based and None for problems of the whole file; `field` is the request key at
    fault (`custom_id`, `body`, `method`, `url`) or None. str() reads like
    `line 7: custom_id: duplicates line 3`.
    """

    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        parts = [] if self.line is None else [f"line {self.line}"]
        if self.field is not None:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


@attrs.frozen(kw_only=True)
class BatchFileReport:
    """The outcome of validating a batch input file.

    Attributes:
        lines: lines examined (every line when the file is within the limits).
        bytes: bytes fed in (reading stops soon after a limit is passed).
        problems: the first problems found, in line order (capped at max_problems).
        problem_count: all problems found, including those not kept.
        sha256: hex digest of the whole input, when asked for (the validate_* functions always
            ask) and the input was read to its end.
    """

    lines: int
    bytes: int
    problems: tuple[BatchFileProblem, ...]
    problem_count: int
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        """True when the file has no problem."""
        return self.problem_count == 0


def raise_for_problems(report: BatchFileReport, *, source: str) -> None:
    """Raise BatchFileError listing the report's problems, if it has any."""
    if not report.ok:
        raise BatchFileError(
            list(report.problems), problem_count=report.problem_count, source=source
        )


# The wording of each batch-file problem, in one place: the validator (validate, upload, the
# emulator) and gather's InputSharder (run) call these, so the same fault reads the same.

BLANK_LINE = "blank line; remove blank lines, one request per line"
MISSING = "missing"


def json_type(value: Any) -> str:
    """What a value is, in JSON's words (`an object`, `a string`, ...), for problem messages;
    a Python value with no JSON counterpart is named by its type."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a Python {type(value).__name__}"


def show(value: Any) -> str:
    """A value as it would appear in the file, shortened to 40 characters."""
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bad_json_message(line: bytes, exc: orjson.JSONDecodeError) -> str:
    """A line that orjson could not decode: not UTF-8, or not JSON (and where)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return (
            f"not valid UTF-8 (byte 0x{line[bad.start]:02x} at byte {bad.start + 1} of the "
            "line); save the file as UTF-8"
        )
    message = f"not valid JSON ({exc.msg} at column {exc.colno})"
    if b"NaN" in line or b"Infinity" in line:
        message += "; NaN and Infinity are not valid JSON"
    return message


def not_an_object_message(value: Any) -> str:
    """A line (or row) that is not a JSON object."""
    return f"must be a JSON object, got {json_type(value)}"


def custom_id_message(custom_id: Any) -> str | None:
    """What is wrong with a present custom_id, or None when it is fine."""
    # isinstance, not type(): a str subclass (an enum member) given in Python is a string.
    if not isinstance(custom_id, str):
        return f"must be a string, got {json_type(custom_id)}"
    if not custom_id:
        return "is empty"
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return f"is {len(custom_id)} characters long; at most {MAX_CUSTOM_ID_CHARS} allowed"
    return None


def duplicate_message(first: str) -> str:
    """A custom_id seen before, at `first` (`line 3`, or `requests[2]` for in-memory rows)."""
    return f"duplicates {first}"


def body_message(body: Any) -> str:
    """A present body that is not an object."""
    return f"must be a JSON object, got {json_type(body)}"


def method_message(method: Any) -> str | None:
    """What is wrong with a present method, or None when it is fine."""
    if isinstance(method, str) and method in ALLOWED_METHODS:
        return None
    return f'must be "POST" or "FILE", got {show(method)}'


def url_message(url: Any, endpoint: str) -> str | None:
    """What is wrong with a present url given the batch endpoint, or None when it is fine."""
    if not isinstance(url, str):
        return f"must be a string, got {json_type(url)}"
    if url != endpoint:
        return f"{show(url)} is not the batch endpoint {show(endpoint)}"
    return None


class BatchFileValidator:
    """Checks a batch input file fed in chunks, against the rules of the Batch API.

    Rules: UTF-8; one JSON object per line; `custom_id` a unique string of 1 to 64 characters;
    `body` an object; `method`, if present, `POST` or `FILE`; `url`, if present, the batch
    endpoint (when none is given, the same url on every line); at most `max_lines` lines and
    `max_bytes` bytes; not empty. A final newline is optional. Blank lines, CRLF line endings and
    a UTF-8 BOM are rejected with a hint on how to fix the file, as the server's parser is strict
    and a failed VALIDATING costs a whole job cycle.

    Memory: one partial line (never more than `max_bytes`) and the custom_ids seen (never more
    than `max_lines`). Past a limit the validator stops parsing and reports the limit once.

    Example:
        validator = BatchFileValidator(endpoint="/v1/chat/completions")
        for chunk in chunks:
            validator.feed(chunk)
        report = validator.finish()
        raise_for_problems(report, source="batch.jsonl")
    """

    raise_for_problems = staticmethod(raise_for_problems)

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        max_lines: int = DEFAULT_MAX_LINES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_problems: int = DEFAULT_MAX_PROBLEMS,
    ) -> None:
        """Args:
        endpoint: the batch endpoint, e.g. "/v1/chat/completions"; None when not known yet.
        max_lines: most lines allowed.
        max_bytes: most bytes allowed.
        max_problems: most problems kept in the report (all are counted).
        """
        self._endpoint = None if endpoint is None else str(endpoint)
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._max_problems = max_problems
        self._splitter = LineSplitter()
        self._bytes = 0
        self._line_number = 0
        self._first_line_by_custom_id: dict[str, int] = {}
        self._first_url: tuple[str, int] | None = None
        self._problems: list[BatchFileProblem] = []
        self._problem_count = 0
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a limit was passed: feeding more data changes nothing."""
        return self._stopped

    def feed(self, chunk: bytes) -> None:
        """Check the lines that `chunk` completes."""
        if self._stopped:
            return
        room = self._max_bytes - self._bytes
        self._bytes += len(chunk)
        if len(chunk) <= room:
            self._check_lines(self._splitter.feed(chunk))
            return
        self._check_lines(self._splitter.feed(chunk[:room]))
        if not self._stopped:
            self._stop(
                self._line_number + 1,
                f"the file is larger than the limit of {self._max_bytes:,} bytes; "
                "split it into smaller files",
            )

    def finish(self) -> BatchFileReport:
        """Check the last line and return the report. Call once, after the last feed()."""
        if not self._stopped:
            last = self._splitter.flush()
            if last is not None:
                self._check_lines([last])
        if self._bytes == 0:
            self._add(None, None, "the file is empty; a batch needs at least one request line")
        return BatchFileReport(
            lines=self._line_number,
            bytes=self._bytes,
            problems=tuple(self._problems),
            problem_count=self._problem_count,
        )

    def _add(self, line: int | None, field: str | None, message: str) -> None:
        self._problem_count += 1
        if len(self._problems) < self._max_problems:
            self._problems.append(BatchFileProblem(line=line, field=field, message=message))

    def _stop(self, line: int, message: str) -> None:
        self._add(line, None, message)
        self._stopped = True

    def _check_lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if self._stopped:
                return
            if self._line_number == self._max_lines:
                self._stop(
                    self._line_number + 1,
                    f"more than the limit of {self._max_lines:,} lines; "
                    "split the requests into several files",
                )
                return
            self._line_number += 1
            self._check_line(self._line_number, line)

    def _check_line(self, number: int, line: bytes) -> None:
        if number == 1 and line.startswith(_BOM):
            self._add(number, None, "starts with a UTF-8 byte order mark (BOM); save without a BOM")
            line = line[len(_BOM) :]
        if line.endswith(b"\r"):
            self._add(
                number,
                None,
                "ends with CRLF (\\r\\n); save the file with LF line endings (e.g. dos2unix)",
            )
            line = line[:-1]
        if not line or line.isspace():
            self._add(number, None, BLANK_LINE)
            return
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._add(number, None, bad_json_message(line, exc))
            return
        if type(request) is not dict:
            self._add(number, None, not_an_object_message(request))
            return
        self._check_custom_id(number, request)
        body = request.get("body")
        if type(body) is not dict:
            if "body" not in request:
                self._add(number, "body", MISSING)
            else:
                self._add(number, "body", body_message(body))
        if "method" in request:
            problem = method_message(request["method"])
            if problem is not None:
                self._add(number, "method", problem)
        if "url" in request:
            self._check_url(number, request["url"])

    def _check_custom_id(self, number: int, request: dict[str, Any]) -> None:
        if "custom_id" not in request:
            self._add(number, "custom_id", MISSING)
            return
        custom_id = request["custom_id"]
        problem = custom_id_message(custom_id)
        if problem is not None:
            self._add(number, "custom_id", problem)
        else:
            first = self._first_line_by_custom_id.setdefault(custom_id, number)
            if first != number:
                self._add(number, "custom_id", duplicate_message(f"line {first}"))

    def _check_url(self, number: int, url: Any) -> None:
        if not isinstance(url, str) or self._endpoint is not None:
            problem = url_message(url, self._endpoint or "")
            if problem is not None:
                self._add(number, "url", problem)
        elif self._first_url is None:
            self._first_url = (url, number)
        elif url != self._first_url[0]:
            first_url, first_line = self._first_url
            self._add(
                number,
                "url",
                f"{show(url)} differs from {show(first_url)} on line {first_line}; "
                "a batch runs against one endpoint",
            )


def check_batch_chunks(
    chunks: Iterable[bytes],
    *,
    endpoint: str | None = None,
    sha256: bool = False,
    **limits: int,
) -> BatchFileReport:
    """Validate a batch input given as byte chunks; stops consuming them at a limit.

    Args:
        chunks: the input, in pieces of any size.
        endpoint: see BatchFileValidator.
        sha256: also compute the input's sha256 in the same pass, as `report.sha256` (None when
            reading stopped at a limit). validate_batch_file and validate_batch_bytes always do.
        limits: `max_lines`, `max_bytes`, `max_problems`, as for BatchFileValidator.
    """
    validator = BatchFileValidator(endpoint=endpoint, **limits)
    hasher = hashlib.sha256() if sha256 else None
    for chunk in chunks:
        validator.feed(chunk)
        if validator.stopped:
            hasher = None
            break
        if hasher is not None:
            hasher.update(chunk)
    report = validator.finish()
    return report if hasher is None else attrs.evolve(report, sha256=hasher.hexdigest())


def check_batch_file(
    path: str | os.PathLike[str], *, endpoint: str | None = None, **limits: int
) -> BatchFileReport:
    """Validate a local batch input file, read 1 MiB at a time; see check_batch_chunks.

    Blocking: on an event loop use validate_batch_file. Raises InvalidArgumentError when the
    file cannot be read; problems with its content go in the report.
    """
    return _check_file(path, endpoint=endpoint, sha256=False, limits=limits)


def check_batch_bytes(
    data: bytes, *, endpoint: str | None = None, **limits: int
) -> BatchFileReport:
    """Validate a batch input held in memory; see check_batch_chunks. Blocking."""
    return _check_bytes(data, endpoint=endpoint, sha256=False, limits=limits)


async def validate_batch_file(
    path: str | os.PathLike[str], *, endpoint: str | None = None, **limits: int
) -> BatchFileReport:
    """Validate a local batch input file in a worker thread; raise BatchFileError on problems.

    The report carries the file's sha256 (the upload's checksum), computed in the same pass.

    Example:
        report = await validate_batch_file("batch.jsonl", endpoint="/v1/chat/completions")
    """
    check = partial(_check_file, path, endpoint=endpoint, sha256=True, limits=limits)
    report = await anyio.to_thread.run_sync(check)
    raise_for_problems(report, source=os.fspath(path))
    return report


async def validate_batch_bytes(
    data: bytes, *, source: str = "<bytes>", endpoint: str | None = None, **limits: int
) -> BatchFileReport:
    """validate_batch_file for a batch input held in memory.

    `source` names the input in the error, e.g. the file name the upload will use.
    """
    check = partial(_check_bytes, data, endpoint=endpoint, sha256=True, limits=limits)
    report = await anyio.to_thread.run_sync(check)
    raise_for_problems(report, source=source)
    return report


def _check_file(
    path: str | os.PathLike[str], *, endpoint: str | None, sha256: bool, limits: dict[str, int]
) -> BatchFileReport:
    if isinstance(path, (bool, int)) or not isinstance(path, (str, os.PathLike)):
        # An int is a file descriptor to open(): open(1) would read, then close, stdout.
        raise InvalidArgumentError(
            f"path must be a str or os.PathLike path to a batch file, got {type(path).__name__}"
        )
    try:
        file = open(path, "rb")
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read the batch file {path}: {exc}") from None
    with file:
        chunks = iter(partial(file.read, CHUNK_SIZE), b"")
        try:
            return check_batch_chunks(chunks, endpoint=endpoint, sha256=sha256, **limits)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read the batch file {path}: {exc}") from None


def _check_bytes(
    data: bytes, *, endpoint: str | None, sha256: bool, limits: dict[str, int]
) -> BatchFileReport:
    # Fed in slices, so the lines of one huge feed() never hold a second copy of the data.
    chunks = (data[start : start + CHUNK_SIZE] for start in range(0, len(data), CHUNK_SIZE))
    return check_batch_chunks(chunks, endpoint=endpoint, sha256=sha256, **limits)
