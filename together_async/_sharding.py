"""The file work behind gather_batches: turning input rows into checked shard files
(`InputSharder`), and turning a finished shard's input, output and error files back into one
outcome per row (`ShardAccounting`).

Nothing here touches the network or the event loop. gather.py calls the blocking parts chunk by
chunk through `anyio.to_thread.run_sync`, and `ShardAccounting.settle` (no I/O, a few ms per
call) on the loop itself, so the loop stays responsive and memory stays bounded by a chunk.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import orjson

from ._convert import ok_result, result_from_row
from ._errors import BatchFileError
from ._jsonl import (
    ALLOWED_METHODS,
    BLANK_LINE,
    CHUNK_SIZE,
    MAX_CUSTOM_ID_CHARS,
    MISSING,
    BatchFileProblem,
    LineSplitter,
    bad_json_message,
    body_message,
    custom_id_message,
    duplicate_message,
    method_message,
    not_an_object_message,
    url_message,
)
from ._models import _UNREAD, BatchJobStatus, BatchRequest, BatchResult
from .manifest import NewShard, encode_positions

__all__ = [
    "FINAL_ERROR_CODES",
    "InputSharder",
    "ShardAccounting",
    "WrittenShard",
    "generated_custom_id",
    "ids_path",
    "is_retryable",
]

logger = logging.getLogger("together_async.gather")

MAX_PROBLEMS = 20
"""Problems listed in a BatchFileError (all are counted)."""

_WRITE_BUFFER = CHUNK_SIZE
_MAX_REJECTED_IDS = 100_000
# A line's problems are listed in the validator's order of its fields.
_FIELD_RANK = {None: 0, "custom_id": 1, "body": 2, "method": 3, "url": 4}
_BOM = b"\xef\xbb\xbf"

# Row outcomes worth a second try: the request itself was fine, the service was not.
_RETRYABLE_STATUS = frozenset({408, 429})
_RETRYABLE_ERROR_CODES = frozenset(
    {
        "rate_limit",
        "rate_limited",
        "rate_limit_exceeded",
        "too_many_requests",
        "server_error",
        "internal_error",
        "internal_server_error",
        "service_unavailable",
        "overloaded",
        "bad_gateway",
        "gateway_timeout",
        "upstream_error",
        "engine_unavailable",
    }
)

FINAL_ERROR_CODES = {
    "COMPLETED": "missing_result",
    "EXPIRED": "batch_expired",
    "CANCELLED": "batch_cancelled",
    "FAILED": "batch_failed",
}
"""The error_code given to a row that has no result of its own, by the job's final status."""


def _has_non_finite_float(value: Any) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


def generated_custom_id(position: int) -> str:
    """The custom_id given to the request at `position` (0-based) when it has none."""
    return f"request-{position}"


def ids_path(input_path: Path) -> Path:
    """Where the custom_ids of a shard input file are kept: beside it, as `<name>.ids`.

    Written with the shard (by InputSharder and write_follow_up) so that settling the shard
    needs no second pass over its requests; a missing or stale one is rebuilt from the shard.
    """
    return input_path.with_name(input_path.name + ".ids")


def _write_ids(input_path: Path, sha256: str, custom_ids: list[str]) -> None:
    # No fsync: a torn or stale file fails the checks in _read_ids and is rebuilt.
    data = orjson.dumps({"sha256": sha256, "custom_ids": custom_ids})
    with open(ids_path(input_path), "wb") as file:
        file.write(data)


def _read_ids(input_path: Path, sha256: str) -> list[str] | None:
    """The custom_ids written beside `input_path` for the shard whose hash is `sha256`, or
    None when there is no such file or it belongs to other bytes."""
    try:
        with open(ids_path(input_path), "rb") as file:
            stored = orjson.loads(file.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    if type(stored) is not dict or stored.get("sha256") != sha256:
        return None
    custom_ids = stored.get("custom_ids")
    if type(custom_ids) is not list or not all(type(item) is str for item in custom_ids):
        return None
    return custom_ids


def _add_usage(totals: dict[str, int], row: dict[str, Any]) -> None:
    """Add the token usage of a decoded output line to `totals`, in place: the sum of
    `_convert.usage_of_row(row)` without a dict per row (tests check the two agree)."""
    response = row.get("response")
    if type(response) is dict:
        body = response.get("body")
        if type(body) is dict:
            _add_usage_of_body(totals, body)


def _add_usage_of_body(totals: dict[str, int], body: dict[str, Any]) -> None:
    usage = body.get("usage")
    if type(usage) is dict:
        for key, value in usage.items():
            if type(value) is int:  # not a bool, whose type is bool
                totals[key] = totals.get(key, 0) + value


def is_retryable(result: BatchResult) -> bool:
    """True for a row that failed for reasons of the service (408, 429, 5xx, timeouts)."""
    if result.ok:
        return False
    status = result.status_code
    if status is not None and (status in _RETRYABLE_STATUS or status >= 500):
        return True
    code = (result.error_code or "").lower()
    return code in _RETRYABLE_ERROR_CODES or "timeout" in code or "timed_out" in code


@attrs.frozen(kw_only=True)
class WrittenShard:
    """A shard file written by InputSharder: rows first_position .. first_position+lines-1."""

    name: str
    sha256: str
    lines: int
    bytes: int
    first_position: int

    def as_new_shard(self) -> NewShard:
        """The manifest record of this original shard."""
        return NewShard(
            input_name=self.name,
            input_sha256=self.sha256,
            lines=self.lines,
            bytes=self.bytes,
            first_position=self.first_position,
        )


class InputSharder:
    """Normalises input rows and writes them straight into shard files, checking as it goes.

    Rows are full request lines (`{"custom_id"?, "body", "method"?, "url"?}`, or a BatchRequest)
    or bare bodies (any other mapping), which get wrapped. A missing custom_id becomes
    `request-<position>`; `model` fills bodies with no "model". Each shard holds at most
    `max_lines` lines and `max_bytes` bytes. Every row is held to the batch-file validator's
    rules (`_jsonl.BatchFileValidator`: custom_id, body, method, url, limits, unique ids), so
    a shard that gets uploaded already passes them (tests/test_sharding.py checks the two
    agree on arbitrary rows).

    A line of an input file that is already a complete request line (a custom_id, an object
    body that needs no model filled in, nothing to change) is written as it is: decoded once
    to be checked, never encoded again. Any other row is rebuilt and encoded with orjson.

    Problems are collected (the first MAX_PROBLEMS kept, all counted) rather than raised, so a
    single pass reports everything; `finish()` raises BatchFileError if there were any.

    Duplicate custom_ids are found with a set of 64-bit hashes (about 70 bytes per row instead
    of about 100 for a set of strings); a hash seen twice marks a suspect, and `finish()`
    re-reads the shard files to confirm suspects by their actual ids and name both positions.
    """

    def __init__(
        self,
        directory: Path,
        *,
        endpoint: str,
        model: str | None,
        max_lines: int,
        max_bytes: int,
        source: str | None,
        fingerprint_settings: Mapping[str, Any],
    ) -> None:
        """Args:
        directory: where the shard files go (it must exist).
        endpoint: the batch endpoint; a request's `url`, if any, must equal it.
        model: fills `body["model"]` where missing, when not None.
        max_lines, max_bytes: the limits of one shard.
        source: the input file's name, or None for an in-memory iterable (changes how
            positions are named in problems: "line 7" or "requests[6]").
        fingerprint_settings: the settings that change the shards, hashed into the
            fingerprint along with every row.
        """
        self._directory = directory
        self._endpoint = endpoint
        self._model = model
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._source = source
        self._fingerprint = hashlib.sha256(
            b"together_async.gather v1\n" + orjson.dumps(dict(fingerprint_settings)) + b"\n"
        )
        self.rows = 0
        self.shards: list[WrittenShard] = []
        # (position, rank of the field, problem): sorted into the validator's order at the end.
        self._problems: list[tuple[int, int, BatchFileProblem]] = []
        self._problem_count = 0
        # The custom_ids of rejected rows (by position), so that a row repeating one is named
        # a duplicate as the validator names it; bounded, a pathological file aside.
        self._rejected_ids: dict[int, str] = {}
        self._seen_hashes: set[int] = set()
        # Positions of rows not written (after a problem): shard lines skip them.
        self._rejected: list[int] = []
        self._suspect_hashes: set[int] = set()
        # The shard being written.
        self._file: IO[bytes] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._shard_hash = hashlib.sha256()
        self._shard_lines = 0
        self._shard_bytes = 0
        self._shard_first = 0
        self._shard_ids: list[str] = []
        # Input files: lines are split here, one chunk at a time.
        self._splitter = LineSplitter()

    # --- feeding ----------------------------------------------------------------------

    def add_items(self, items: Iterable[Any]) -> int:
        """Take rows given as Python objects; returns how many were taken (0 at the end)."""
        taken = 0
        for item in items:
            self._add(item, self.rows)
            self.rows += 1
            taken += 1
        return taken

    def add_from_file(self, file: IO[bytes]) -> bool:
        """Read and take the next chunk of a JSONL input file; False once it is all read.

        One call is one worker-thread hop: a read of CHUNK_SIZE bytes and its lines.
        """
        chunk = file.read(CHUNK_SIZE)
        if not chunk:
            last = self._splitter.flush()
            if last is not None:
                self._add_lines([last])
            return False
        self._add_lines(self._splitter.feed(chunk))
        return True

    def _add_lines(self, lines: list[bytes]) -> None:
        # The hot loop of a large input: most lines are complete request lines, taken as they
        # are in runs (see _take_run); the per-row work is a decode and a few checks, with
        # everything it uses bound to locals. Any other line goes to _add_line.
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        model = self._model
        endpoint = self._endpoint
        first = self.rows
        self.rows = first + len(lines)
        run_lines: list[bytes] = []
        run_ids: list[str] = []
        run_first = first
        for position, line in enumerate(lines, first):
            # A line from "{" to "}" has no BOM, CR or padding to strip. A repeated key is
            # read as its last value here, as by the validator, the emulator and the common
            # JSON parsers (Python's, Go's), so the line can go as it is.
            if line[:1] == b"{" and line[-1:] == b"}":
                try:
                    request = loads(line)
                except decode_error:
                    request = None
                if request is not None:
                    custom_id = request.get("custom_id")
                    body = request.get("body")
                    if (
                        type(custom_id) is str
                        and 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS
                        and type(body) is dict
                        and (model is None or "model" in body)
                        and ("method" not in request or request["method"] in ALLOWED_METHODS)
                        and ("url" not in request or request["url"] == endpoint)
                    ):
                        run_lines.append(line)
                        run_ids.append(custom_id)
                        continue
            if run_lines:
                self._take_run(run_lines, run_ids, run_first)
                run_lines = []
                run_ids = []
            self._add_line(line, position)
            run_first = position + 1
        if run_lines:
            self._take_run(run_lines, run_ids, run_first)

    def _add_line(self, line: bytes, position: int) -> None:
        """A line the fast path of _add_lines did not take: checked and rebuilt."""
        if position == 0 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line or line.isspace():
            self._problem(position, None, BLANK_LINE)
            self._rejected.append(position)
            return
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._problem(position, None, bad_json_message(line, exc))
            self._rejected.append(position)
            return
        self._add(item, position)

    def _add(self, item: Any, position: int) -> None:
        normalised = self._normalise(item, position)
        if normalised is None:
            self._rejected.append(position)
            return
        self._take(*normalised, position)

    def _take_run(self, lines: list[bytes], custom_ids: list[str], first: int) -> None:
        """_take for rows at positions first, first+1, ...: in bulk when they all fit in the
        open shard and no id among them was seen before (nearly always), else one by one."""
        count = len(lines)
        size = sum(map(len, lines)) + count
        keys = set(map(hash, custom_ids))
        seen = self._seen_hashes
        if (
            self._file is None
            or self._shard_lines + count > self._max_lines
            or self._shard_bytes + size > self._max_bytes
            or len(keys) < count
            or not seen.isdisjoint(keys)
        ):
            for offset, (line, custom_id) in enumerate(zip(lines, custom_ids, strict=True)):
                self._take(line, custom_id, first + offset)
            return
        seen.update(keys)
        self._shard_ids.extend(custom_ids)
        self._buffer.extend(lines)
        self._buffered += size
        self._shard_lines += count
        self._shard_bytes += size
        if self._buffered >= _WRITE_BUFFER:
            self._flush()

    def _note_rejected_id(self, position: int, custom_id: str) -> None:
        if len(self._rejected_ids) >= _MAX_REJECTED_IDS:
            return
        self._rejected_ids[position] = custom_id
        key = hash(custom_id)
        if key in self._seen_hashes:
            self._suspect_hashes.add(key)
        else:
            self._seen_hashes.add(key)

    def _take(self, line: bytes, custom_id: str, position: int) -> None:
        """Write a checked request line into the current shard (opening the next as needed)."""
        size = len(line) + 1
        if size > self._max_bytes:
            self._problem(
                position,
                None,
                f"the request is {size:,} bytes, more than max_bytes_per_batch "
                f"({self._max_bytes:,}); it cannot go in any batch",
            )
            self._rejected.append(position)
            self._note_rejected_id(position, custom_id)
            return
        if self._file is not None and (
            self._shard_lines >= self._max_lines or self._shard_bytes + size > self._max_bytes
        ):
            self._close_shard()
        if self._file is None:
            self._open_shard(position)
        key = hash(custom_id)
        if key in self._seen_hashes:
            self._suspect_hashes.add(key)
        else:
            self._seen_hashes.add(key)
        self._shard_ids.append(custom_id)
        self._buffer.append(line)
        self._buffered += size
        self._shard_lines += 1
        self._shard_bytes += size
        if self._buffered >= _WRITE_BUFFER:
            self._flush()

    def _normalise(self, item: Any, position: int) -> tuple[bytes, str] | None:
        """The request line of one row (without newline) and its custom_id, or None after
        recording a problem."""
        # `type(...) is dict` first: the ABC check of isinstance(..., Mapping) is slow per row.
        is_dict = type(item) is dict
        if not is_dict and isinstance(item, BatchRequest):
            request: dict[str, Any] = {"custom_id": item.custom_id, "body": item.body}
            if item.method is not None:
                request["method"] = item.method
            if item.url is not None:
                request["url"] = item.url
        elif is_dict or isinstance(item, Mapping):
            # A mapping with a body or a custom_id is a request line; any other is a bare body.
            request = dict(item) if "body" in item or "custom_id" in item else {"body": item}
        else:
            self._problem(position, None, not_an_object_message(item))
            return None
        # Every fault of the row is reported, in the validator's order and words (see
        # _jsonl.py), so `run` and `validate` list the same problems alike.
        problems: list[tuple[str, str]] = []
        custom_id = request.get("custom_id")
        if custom_id is None:
            custom_id = generated_custom_id(position)
        else:
            problem = custom_id_message(custom_id)
            if problem is not None:
                problems.append(("custom_id", problem))
        body: Any = request.get("body")
        if "body" not in request:
            problems.append(("body", MISSING))
        elif type(body) is not dict and not isinstance(body, Mapping):
            problems.append(("body", body_message(body)))
        # Present means checked, as the validator does: a method or url of None is refused.
        if "method" in request:
            problem = method_message(request["method"])
            if problem is not None:
                problems.append(("method", problem))
        if "url" in request:
            problem = url_message(request["url"], self._endpoint)
            if problem is not None:
                problems.append(("url", problem))
        if problems:
            for field, problem in problems:
                self._problem(position, field, problem)
            given = request.get("custom_id") is not None
            if given and not any(field == "custom_id" for field, _ in problems):
                self._note_rejected_id(position, custom_id)
            return None
        if self._model is not None and "model" not in body:
            body = {"model": self._model, **body}
        elif not isinstance(body, dict):
            body = dict(body)
        request.pop("custom_id", None)
        request.pop("body")
        try:
            line = orjson.dumps({"custom_id": custom_id, "body": body, **request})
        except (TypeError, orjson.JSONEncodeError) as exc:
            self._problem(position, None, f"cannot be written as JSON: {exc}")
            return None
        # orjson writes NaN and Infinity as null: the request would change without a word.
        # Only a line with a null can hide one, so most rows skip the walk.
        if b"null" in line and _has_non_finite_float(body):
            self._problem(position, "body", "holds NaN or Infinity, which JSON cannot represent")
            return None
        return line, custom_id

    # --- shard files ------------------------------------------------------------------

    def _open_shard(self, position: int) -> None:
        name = f"shard-{len(self.shards):05d}.jsonl"
        self._file = open(self._directory / name, "wb")  # closed in _close_shard
        self._shard_hash = hashlib.sha256()
        self._shard_lines = 0
        self._shard_bytes = 0
        self._shard_first = position
        self._shard_ids = []

    def _flush(self) -> None:
        if not self._buffer:
            return
        assert self._file is not None
        self._buffer.append(b"")
        data = b"\n".join(self._buffer)
        self._buffer = []
        self._buffered = 0
        self._file.write(data)
        self._shard_hash.update(data)
        self._fingerprint.update(data)

    def _close_shard(self) -> None:
        self._flush()
        assert self._file is not None
        self._file.close()
        self._file = None
        shard = WrittenShard(
            name=f"shard-{len(self.shards):05d}.jsonl",
            sha256=self._shard_hash.hexdigest(),
            lines=self._shard_lines,
            bytes=self._shard_bytes,
            first_position=self._shard_first,
        )
        _write_ids(self._directory / shard.name, shard.sha256, self._shard_ids)
        self.shards.append(shard)

    def close(self) -> None:
        """Close a shard file left open (after an error); safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # --- the end ----------------------------------------------------------------------

    def finish(self) -> str:
        """Close the last shard, confirm duplicate suspects, and return the input fingerprint.

        Raises:
            BatchFileError: listing every problem found (first MAX_PROBLEMS of them).
        """
        if self._file is not None:
            self._close_shard()
        self._seen_hashes = set()
        if self._suspect_hashes:
            self._report_duplicates()
        if self._problem_count:
            self._problems.sort(key=lambda entry: entry[:2])
            raise BatchFileError(
                [problem for _, _, problem in self._problems[:MAX_PROBLEMS]],
                problem_count=self._problem_count,
                source=self._describe_source(),
            )
        return self._fingerprint.hexdigest()

    def _written_ids(self) -> Iterator[tuple[int, str]]:
        """(position, custom_id) of every row written to a shard, in position order."""
        accepted = 0
        skipped = 0
        for shard in self.shards:
            with open(self._directory / shard.name, "rb") as file:
                for line in file:
                    # The accepted-th written row sits at accepted + (rejected rows before it).
                    position = accepted + skipped
                    while skipped < len(self._rejected) and self._rejected[skipped] <= position:
                        skipped += 1
                        position = accepted + skipped
                    accepted += 1
                    yield position, orjson.loads(line)["custom_id"]

    def _report_duplicates(self) -> None:
        first_position: dict[str, int] = {}
        rejected = sorted(self._rejected_ids.items())
        for position, custom_id in heapq.merge(self._written_ids(), rejected):
            if hash(custom_id) not in self._suspect_hashes:
                continue
            first = first_position.setdefault(custom_id, position)
            if first != position:
                self._problem(position, "custom_id", duplicate_message(self._where(first)))

    def _problem(self, position: int | None, field: str | None, message: str) -> None:
        self._problem_count += 1
        if self._source is not None:
            line = None if position is None else position + 1
            problem = BatchFileProblem(line=line, field=field, message=message)
        else:
            # In-memory rows have indexes, not lines: put the index where a reader looks first.
            where = "requests" if position is None else f"requests[{position}]"
            label = where if field is None else f"{where}.{field}"
            problem = BatchFileProblem(line=None, field=label, message=message)
        problems = self._problems
        problems.append((-1 if position is None else position, _FIELD_RANK.get(field, 0), problem))
        # The first MAX_PROBLEMS in line order are listed, whenever they were found
        # (duplicates are confirmed last); pruning at twice that keeps memory bounded.
        if len(problems) >= 2 * MAX_PROBLEMS:
            problems.sort(key=lambda entry: entry[:2])
            del problems[MAX_PROBLEMS:]

    def _where(self, position: int) -> str:
        return f"line {position + 1}" if self._source is not None else f"requests[{position}]"

    def _describe_source(self) -> str:
        return self._source if self._source is not None else "requests"


class ShardAccounting:
    """Turns one finished shard back into exactly one outcome per row.

    Takes the shard's custom_ids from the file written beside it (`ids_path`; rebuilt from
    the shard's input file when missing or stale, as after a crash); `settle(lines)` takes the
    lines of the job's output and error files (either may be missing), a few hundred at a time
    as gather reads them, and returns the rows that are final, as `(input position,
    BatchResult)`. A row is resubmitted instead when
    it failed retryably (408, 429, 5xx, timeouts), or has no result because the job EXPIRED,
    was CANCELLED or lost it, and `retry_allowed` is true. `finish()` settles the rows with no
    result (a final error naming the job's status) and `write_follow_up()` writes the rows to
    resubmit.

    Memory: the shard's custom_ids and one chunk of results; never a whole results file.
    """

    def __init__(
        self,
        input_path: Path,
        positions: Sequence[int],
        *,
        input_sha256: str | None = None,
        batch_id: str | None,
        job_status: str | None,
        job_error: str | None,
        retry_allowed: bool,
    ) -> None:
        """Args:
        input_path: the shard's input file.
        positions: the input position of each of its lines.
        input_sha256: the input file's sha256, to check the custom_ids kept beside it
            against; None to read them from the input file itself.
        batch_id: the job, put in every BatchResult.
        job_status: the job's terminal status.
        job_error: the job's error message, if any.
        retry_allowed: whether rows may be resubmitted at all (attempts left).
        """
        self._input_path = input_path
        self._positions = positions
        self._batch_id = batch_id
        self._status = str(BatchJobStatus(job_status)) if job_status else "UNKNOWN"
        self._job_error = job_error
        self._retry_allowed = retry_allowed
        custom_ids = None if input_sha256 is None else _read_ids(input_path, input_sha256)
        if custom_ids is None:
            with open(input_path, "rb") as file:
                custom_ids = [orjson.loads(line)["custom_id"] for line in file]
        self._index = {custom_id: index for index, custom_id in enumerate(custom_ids)}
        if len(self._index) != len(positions):
            raise RuntimeError(
                f"{input_path} holds {len(self._index)} requests, the state says "
                f"{len(positions)}; the run directory was changed by hand"
            )
        # Per row: 0 no outcome yet, 1 final outcome given, 2 to resubmit.
        self._state = bytearray(len(positions))
        self.unknown_rows = 0
        #: Token usage summed over the final results read so far.
        self.usage: dict[str, int] = {}
        self.resubmit_count = 0

    def settle(self, lines: list[bytes], *, source: str) -> list[tuple[int, BatchResult]]:
        """The final outcomes among some lines of an output or error file (`source` names it
        in warnings). Pure CPU work, about 4 us a line: callers on an event loop pass a few
        hundred lines at a time."""
        # Per row: one decode, one result, a few lookups; everything used bound to locals.
        final: list[tuple[int, BatchResult]] = []
        keep = final.append
        loads = orjson.loads
        index_of = self._index.get
        state = self._state
        positions = self._positions
        batch_id = self._batch_id
        retry_allowed = self._retry_allowed
        usage = self.usage
        for line in lines:
            try:
                row = loads(line)
                # The common row, settled here: a 2xx answer, no error, to a request of this
                # shard not answered before. Final at once (is_retryable is False for it).
                if type(row) is dict and row.get("error") is None:
                    response = row.get("response")
                    custom_id = row.get("custom_id")
                    if type(response) is dict and type(custom_id) is str:
                        code = response.get("status_code")
                        index = index_of(custom_id)
                        if (
                            type(code) is int
                            and 200 <= code < 300
                            and index is not None
                            and not state[index]
                        ):
                            state[index] = 1
                            body = response.get("body")
                            # The result keeps the raw line, not the body (see BatchResult).
                            if body is None:
                                result = ok_result(custom_id, code, None, batch_id, None)
                            else:
                                result = ok_result(custom_id, code, _UNREAD, batch_id, line)
                                if type(body) is dict:
                                    _add_usage_of_body(usage, body)
                            keep((positions[index], result))
                            continue
                result = result_from_row(row, batch_id=batch_id, raw=line)
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                if line.strip():  # a blank line is no row at all
                    # The row then counts as missing: resubmitted or reported, never lost.
                    logger.warning("skipping a malformed line of %s: %s", source, exc)
                continue
            index = index_of(result.custom_id)
            if index is None:
                self.unknown_rows += 1
                logger.warning(
                    "batch %s returned custom_id %r, which it was not sent; ignored",
                    batch_id,
                    result.custom_id,
                )
                continue
            if state[index]:
                logger.warning(
                    "batch %s returned custom_id %r twice; the first answer is kept",
                    batch_id,
                    result.custom_id,
                )
                continue
            if retry_allowed and is_retryable(result):
                state[index] = 2
                self.resubmit_count += 1
            else:
                state[index] = 1
                keep((positions[index], result))
                _add_usage(usage, row)
        return final

    def finish(self) -> list[tuple[int, BatchResult]]:
        """Settle the rows that got no result: resubmit them, or give them a final error."""
        retry_missing = self._retry_allowed and self._status != "FAILED"
        code = FINAL_ERROR_CODES.get(self._status, "missing_result")
        message = f"no result: batch {self._batch_id} ended {self._status}"
        if self._job_error:
            message += f" ({self._job_error})"
        final: list[tuple[int, BatchResult]] = []
        custom_ids: list[str] | None = None
        for index, state in enumerate(self._state):
            if state:
                continue
            if retry_missing:
                self._state[index] = 2
                self.resubmit_count += 1
                continue
            if custom_ids is None:
                custom_ids = list(self._index)  # dicts keep insertion (= line) order
            self._state[index] = 1
            final.append(
                (
                    self._positions[index],
                    BatchResult(
                        custom_id=custom_ids[index],
                        error_message=message,
                        error_code=code,
                        batch_id=self._batch_id,
                    ),
                )
            )
        return final

    def write_follow_up(self, path: Path, *, attempt: int) -> NewShard | None:
        """Write the rows to resubmit into `path`; None (and no file) when there are none."""
        if not self.resubmit_count:
            return None
        positions: list[int] = []
        resubmitted_ids: list[str] = []
        custom_ids = list(self._index)  # dicts keep insertion (= line) order
        hasher = hashlib.sha256()
        size = 0
        temporary = path.with_name(path.name + ".partial")
        with open(self._input_path, "rb") as source, open(temporary, "wb") as target:
            for index, line in enumerate(source):
                if self._state[index] != 2:
                    continue
                if not line.endswith(b"\n"):
                    line += b"\n"
                target.write(line)
                hasher.update(line)
                size += len(line)
                positions.append(self._positions[index])
                resubmitted_ids.append(custom_ids[index])
        sha256 = hasher.hexdigest()
        # The ids first: a follow-up file that exists always has them beside it.
        _write_ids(path, sha256, resubmitted_ids)
        os.replace(temporary, path)
        return NewShard(
            input_name=path.name,
            input_sha256=sha256,
            lines=len(positions),
            bytes=size,
            attempt=attempt,
            positions=encode_positions(positions),
        )
