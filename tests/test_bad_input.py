"""The bad-input catalogue: malformed batch files are refused by `files.upload(check=True)`
naming the line before any request leaves the process, and the emulator fails a job on the
same bytes with an error naming the same line (in the spec's BatchJob shape); bad arguments
are refused with a clear error before any request, and gather refuses bad rows up front."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import orjson
import pytest
from emulator_helpers import CHAT, RawAPI, schema_errors, spec_schema

from together_async import (
    AsyncTogether,
    BatchFileError,
    InvalidArgumentError,
    gather_batches,
    stream_batches,
)
from together_async.emulator import Emulator

pytestmark = pytest.mark.timeout(120)

MAX_LINES = 50_000
MAX_BYTES = 100 * 1024 * 1024


def row(custom_id: str, text: str = "hello", **extra: Any) -> bytes:
    """One valid request line (with its newline), plus any extra keys."""
    line = {
        "custom_id": custom_id,
        "body": {"model": "test-model", "messages": [{"role": "user", "content": text}]},
        **extra,
    }
    return orjson.dumps(line) + b"\n"


def around(bad: bytes, *, before: int = 2, after: int = 1) -> bytes:
    """`bad` (one line, newline included) between valid lines: it sits on line before + 1."""
    head = b"".join(row(f"before-{i}") for i in range(before))
    tail = b"".join(row(f"after-{i}") for i in range(after))
    return head + bad + tail


@attrs.frozen
class BadInput:
    """A malformed batch file: its bytes (or a writer for big ones), the line to blame (None
    for the whole file) and words the message must contain."""

    kind: str
    data: bytes | Callable[[Path], None]
    line: int | None
    says: str

    def write(self, path: Path) -> None:
        """Put the file at `path` (blocking; call in a worker thread)."""
        if callable(self.data):
            self.data(path)
        else:
            path.write_bytes(self.data)


def write_too_many_lines(path: Path) -> None:
    with path.open("wb") as file:
        for start in range(0, MAX_LINES + 1, 5_000):
            stop = min(start + 5_000, MAX_LINES + 1)
            file.write(b"".join(b'{"custom_id":"r%d","body":{}}\n' % i for i in range(start, stop)))


# Lines of exactly LINE_BYTES bytes (newline included), so the line that crosses the byte limit
# is known in advance, and few enough lines to stay under the line limit.
LINE_BYTES = 2_500
FIRST_LINE_PAST_MAX_BYTES = MAX_BYTES // LINE_BYTES + 1


def fixed_size_line(index: int) -> bytes:
    prefix = b'{"custom_id":"r%d","body":{"pad":"' % index
    suffix = b'"}}\n'
    return prefix + b"x" * (LINE_BYTES - len(prefix) - len(suffix)) + suffix


def write_too_many_bytes(path: Path) -> None:
    with path.open("wb") as file:
        for start in range(0, FIRST_LINE_PAST_MAX_BYTES + 10, 1_000):
            file.write(b"".join(fixed_size_line(i) for i in range(start, start + 1_000)))


def write_one_enormous_line(path: Path) -> None:
    with path.open("wb") as file:
        file.write(b'{"custom_id":"huge","body":{"text":"')
        block = b"y" * (1 << 20)
        for _ in range(MAX_BYTES // len(block) + 1):
            file.write(block)
        file.write(b'"}}\n')


CATALOGUE = [
    BadInput("invalid-json", around(b'{"custom_id": "x", "body": {\n'), 3, "not valid JSON"),
    BadInput("trailing-comma", around(b'{"custom_id": "x", "body": {},}\n'), 3, "not valid JSON"),
    BadInput("single-quotes", around(b"{'custom_id': 'x', 'body': {}}\n"), 3, "not valid JSON"),
    BadInput("array-line", around(b'[{"custom_id": "x", "body": {}}]\n'), 3, "got an array"),
    BadInput("nested-arrays", around(b"[[1, [2, [3]]]]\n"), 3, "got an array"),
    BadInput("string-line", around(b'"just a string"\n'), 3, "got a string"),
    BadInput("number-line", around(b"42\n"), 3, "JSON object"),
    BadInput("null-line", around(b"null\n"), 3, "got null"),
    BadInput("missing-custom-id", around(b'{"body": {}}\n'), 3, "custom_id: missing"),
    BadInput(
        "duplicate-custom-id", row("same") + row("other") + row("same"), 3, "duplicates line 1"
    ),
    BadInput("too-long-custom-id", around(row("c" * 65)), 3, "at most 64"),
    BadInput(
        "non-string-custom-id",
        around(b'{"custom_id": 7, "body": {}}\n'),
        3,
        "custom_id: must be a string",
    ),
    BadInput(
        "null-custom-id",
        around(b'{"custom_id": null, "body": {}}\n'),
        3,
        "custom_id: must be a string",
    ),
    BadInput("empty-custom-id", around(row("")), 3, "custom_id: is empty"),
    BadInput("missing-body", around(b'{"custom_id": "x"}\n'), 3, "body: missing"),
    BadInput(
        "string-body", around(b'{"custom_id": "x", "body": "hi"}\n'), 3, "body: must be a JSON"
    ),
    BadInput("array-body", around(b'{"custom_id": "x", "body": []}\n'), 3, "body: must be a JSON"),
    BadInput("null-body", around(b'{"custom_id": "x", "body": null}\n'), 3, "body: must be a JSON"),
    BadInput("wrong-url", around(row("x", url="/v1/embeddings")), 3, "not the batch endpoint"),
    BadInput(
        "non-string-url",
        around(b'{"custom_id": "x", "url": 1, "body": {}}\n'),
        3,
        "url: must be a string",
    ),
    BadInput("get-method", around(row("x", method="GET")), 3, 'must be "POST" or "FILE"'),
    BadInput("lowercase-method", around(row("x", method="post")), 3, 'must be "POST" or "FILE"'),
    BadInput(
        "invalid-utf8",
        around(b'{"custom_id": "x", "body": {"text": "caf\xe9"}}\n'),
        3,
        "not valid UTF-8",
    ),
    BadInput(
        "lone-surrogate",
        around(b'{"custom_id": "x", "body": {"text": "\\ud800"}}\n'),
        3,
        "not valid JSON",
    ),
    BadInput(
        "raw-control-character",
        around(b'{"custom_id": "x", "body": {"text": "a\x01b"}}\n'),
        3,
        "not valid JSON",
    ),
    BadInput("bom", b"\xef\xbb\xbf" + row("a") + row("b"), 1, "byte order mark"),
    BadInput("crlf", row("a") + row("b")[:-1] + b"\r\n" + row("c"), 2, "CRLF"),
    BadInput("blank-line", row("a") + b"\n" + row("b"), 2, "blank line"),
    BadInput("whitespace-line", row("a") + b"   \t\n" + row("b"), 2, "blank line"),
    BadInput(
        "nan",
        around(b'{"custom_id": "x", "body": {"temperature": NaN}}\n'),
        3,
        "NaN and Infinity are not valid JSON",
    ),
    BadInput(
        "infinity",
        around(b'{"custom_id": "x", "body": {"temperature": -Infinity}}\n'),
        3,
        "NaN and Infinity are not valid JSON",
    ),
    BadInput("empty-file", b"", None, "the file is empty"),
    BadInput("truncated-last-line", row("a") + row("b") + row("c")[:25], 3, "not valid JSON"),
    BadInput(
        "trailing-garbage",
        around(row("x")[:-1] + b" trailing\n"),
        3,
        "not valid JSON",
    ),
    BadInput("two-objects-on-a-line", around(row("x")[:-1] + row("y")), 3, "not valid JSON"),
    BadInput("too-many-lines", write_too_many_lines, MAX_LINES + 1, "more than the limit"),
]

BIG_CATALOGUE = [
    BadInput(
        "too-many-bytes",
        write_too_many_bytes,
        FIRST_LINE_PAST_MAX_BYTES,
        "larger than the limit",
    ),
    BadInput("one-enormous-line", write_one_enormous_line, 1, "larger than the limit"),
]

ALL_CASES = [pytest.param(case, id=case.kind) for case in CATALOGUE] + [
    pytest.param(case, id=case.kind, marks=pytest.mark.slow) for case in BIG_CATALOGUE
]


def test_the_catalogue_has_at_least_25_distinct_kinds() -> None:
    """Issue 8 asks for 25 kinds of malformed input at least; every kind is named once."""
    kinds = [case.kind for case in CATALOGUE + BIG_CATALOGUE]
    assert len(set(kinds)) == len(kinds) >= 25


async def written(case: BadInput, tmp_path: Path) -> Path:
    path = tmp_path / f"{case.kind}.jsonl"
    await anyio.to_thread.run_sync(case.write, path)
    return path


def requests_served(emulator: Emulator) -> int:
    return sum(emulator.stats.requests.values())


# --- client side: refused before any request ------------------------------------------------


@pytest.mark.parametrize("case", ALL_CASES)
async def test_upload_check_refuses_before_any_request(
    case: BadInput, client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """files.upload(check=True) raises BatchFileError naming the line; the server saw nothing."""
    path = await written(case, tmp_path)
    with pytest.raises(BatchFileError) as raised:
        await client.files.upload(path, endpoint=CHAT)
    error = raised.value
    assert requests_served(emulator) == 0
    assert error.source == str(path)
    first = error.problems[0]
    assert first.line == case.line, error
    assert case.says in str(first), error
    if case.line is not None:
        assert f"line {case.line}:" in str(error)


# --- server side: the emulator fails the job on the same bytes --------------------------------


@pytest.mark.parametrize("case", ALL_CASES)
async def test_emulator_fails_the_job_naming_the_line(
    case: BadInput, client: AsyncTogether, api: RawAPI, tmp_path: Path
) -> None:
    """Uploaded unchecked, the same bytes make the job FAILED, its error naming the line, and
    the job as served matches the spec's BatchJob schema."""
    path = await written(case, tmp_path)
    uploaded = await client.files.upload(path, check=False)
    job = await client.batches.create_batch(uploaded.id, CHAT)
    finished = await client.batches.wait(job.id, timeout=60, poll_interval=0.01, max_interval=0.1)
    assert finished.status == "FAILED"
    assert finished.error is not None
    assert finished.error.startswith("Input file validation failed")
    if case.line is not None:
        assert f"line {case.line}:" in finished.error
    assert case.says in finished.error
    assert finished.output_file_id is None

    wire = await api.json("GET", f"/batches/{job.id}")
    assert schema_errors(wire, spec_schema("get", "/batches/{id}", 200)) == []
    assert wire["status"] == "FAILED" and wire["error"] == finished.error


async def test_every_problem_of_a_file_is_listed_with_its_line(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """A file with several problems gets all of them, each with its own line, in one error."""
    data = row("a") + b"[1]\n" + row("a") + b'{"custom_id": "z"}\n' + row("b", method="PUT")
    with pytest.raises(BatchFileError) as raised:
        await client.files.upload(data, endpoint=CHAT)
    lines = [(problem.line, problem.field) for problem in raised.value.problems]
    assert lines == [(2, None), (3, "custom_id"), (4, "body"), (5, "method")]
    assert raised.value.problem_count == 4
    assert requests_served(emulator) == 0


async def test_edge_cases_that_are_valid_pass_the_check(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """A 64-character id, unicode ids and text, no final newline, url and method given:
    accepted by the check and by the server's validation."""
    data = (
        row("c" * 64)
        + row("ünïcødé-🙂", "日本語のテキスト")
        + row("x", url=CHAT, method="POST")
        + row("last")[:-1]
    )
    uploaded = await client.files.upload(data, endpoint=CHAT)
    job = await client.batches.create_batch(uploaded.id, CHAT)
    finished = await client.batches.wait(job.id, timeout=30, poll_interval=0.01, max_interval=0.1)
    assert finished.status == "COMPLETED", finished.error
    assert emulator.stats.jobs_created[uploaded.id] == 1


# --- gather: bad rows are refused before any upload ------------------------------------------


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


NESTED_TOO_DEEP = nested(300)

GATHER_CASES = {
    "invalid-json": (around(b'{"custom_id": "x", "body": {\n'), "line 3"),
    "array-line": (around(b"[1, 2]\n"), "line 3"),
    "duplicate-custom-id": (row("same") + row("other") + row("same"), "line 3"),
    "too-long-custom-id": (around(row("c" * 65)), "line 3"),
    "non-string-custom-id": (around(b'{"custom_id": 7, "body": {}}\n'), "line 3"),
    "string-body": (around(b'{"custom_id": "x", "body": "hi"}\n'), "line 3"),
    "wrong-url": (around(row("x", url="/v1/embeddings")), "line 3"),
    "get-method": (around(row("x", method="GET")), "line 3"),
    "invalid-utf8": (around(b'{"custom_id": "x", "body": {"t": "caf\xe9"}}\n'), "line 3"),
    "nan": (around(b'{"custom_id": "x", "body": {"t": NaN}}\n'), "line 3"),
    "blank-line": (row("a") + b"\n" + row("b"), "line 2"),
}


@pytest.mark.parametrize("kind", sorted(GATHER_CASES))
async def test_gather_refuses_a_bad_file_before_any_request(
    kind: str, client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """gather_batches on a JSONL path raises BatchFileError naming the line; nothing is sent."""
    data, where = GATHER_CASES[kind]
    path = tmp_path / "requests.jsonl"
    await anyio.Path(path).write_bytes(data)
    with pytest.raises(BatchFileError, match=where):
        await gather_batches(client, path, model="m", poll_interval=0.01)
    assert requests_served(emulator) == 0


@pytest.mark.parametrize(
    ("rows", "where"),
    [
        ([{"custom_id": "a", "body": {}}, {"custom_id": "a", "body": {}}], "requests[1]"),
        ([{"custom_id": "a", "body": {}}, 42], "requests[1]"),
        ([{"custom_id": 5, "body": {}}], "requests[0]"),
        ([{"custom_id": "a", "body": []}], "requests[0]"),
        ([{"custom_id": "a" * 65, "body": {}}], "requests[0]"),
        ([{"custom_id": "a", "body": {"t": float("nan")}}], "requests[0]"),
        ([{"body": {}}, {"body": {"t": [1.0, float("-inf")]}}], "requests[1]"),
        ([{"custom_id": "a", "body": {1: "int key"}}], "requests[0]"),
        ([{"custom_id": "a", "body": {"deep": NESTED_TOO_DEEP}}], "requests[0]"),
        ([{"custom_id": "a", "body": b"bytes"}], "requests[0]"),
        ([{"custom_id": "a", "body": {}, "method": "GET"}], "requests[0]"),
        ([{"custom_id": "a", "body": {}, "url": "/v1/embeddings"}], "requests[0]"),
        ([{"custom_id": "a"}], "requests[0]"),
        ([{"body": {"text": "x" * 2_000}}], "requests[0]"),
    ],
    ids=[
        "duplicate",
        "not-an-object",
        "id-type",
        "body-type",
        "id-length",
        "nan",
        "infinity-in-a-list",
        "non-string-key",
        "nested-too-deep",
        "bytes-body",
        "bad-method",
        "wrong-url",
        "id-without-body",
        "row-over-max-bytes-per-batch",
    ],
)
async def test_gather_refuses_bad_rows_of_an_iterable_by_position(
    rows: list[Any], where: str, client: AsyncTogether, emulator: Emulator
) -> None:
    """Rows given as Python objects are refused by position (`requests[i]`), before any request."""
    with pytest.raises(BatchFileError, match=re.escape(where)):
        await gather_batches(client, rows, model="m", max_bytes_per_batch=1_000, poll_interval=0.01)
    assert requests_served(emulator) == 0


async def test_stream_refuses_bad_rows_before_any_request(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """stream_batches checks the whole input before its first upload, like gather_batches."""
    rows = [{"custom_id": f"r{i}", "body": {}} for i in range(100)] + [{"custom_id": "r3"}]
    stream = stream_batches(client, rows, model="m", poll_interval=0.01)
    with pytest.raises(BatchFileError, match=r"requests\[100\]"):
        async for _ in stream:
            pass
    assert requests_served(emulator) == 0


# --- bad arguments: clear errors before any request ------------------------------------------

FILE_ID = "file-00000000-0000-4000-8000-000000000000"
BATCH_ID = "00000000-0000-4000-8000-000000000000"


def bad_calls(client: AsyncTogether, tmp_path: Path) -> dict[str, Callable[[], Any]]:
    """Calls with a bad argument, each a zero-argument callable returning an awaitable or an
    async iterator; the key names the argument at fault."""
    files, batches = client.files, client.batches
    return {
        "files.retrieve empty id": lambda: files.retrieve(""),
        "files.retrieve blank id": lambda: files.retrieve("   "),
        "files.retrieve id not a string": lambda: files.retrieve(123),  # type: ignore[arg-type]
        "files.delete empty id": lambda: files.delete(""),
        "files.delete None id": lambda: files.delete(None),  # type: ignore[arg-type]
        "files.retrieve_content empty id": lambda: files.retrieve_content(""),
        "files.iter_lines empty id": lambda: files.iter_lines(""),
        "files.iter_json id not a string": lambda: files.iter_json(b"file"),  # type: ignore[arg-type]
        "files.upload of an int": lambda: files.upload(123),  # type: ignore[arg-type]
        "files.upload of a missing path": lambda: files.upload(tmp_path / "missing.jsonl"),
        "files.upload of a directory": lambda: files.upload(tmp_path),
        "files.upload of a text stream": lambda: files.upload(io.StringIO("{}")),  # type: ignore[arg-type]
        "files.upload empty purpose": lambda: files.upload(row("a"), purpose=""),
        "files.upload empty filename": lambda: files.upload(row("a"), filename=" "),
        "files.upload negative max_retries": lambda: files.upload(row("a"), max_retries=-1),
        "batches.get_batch empty id": lambda: batches.get_batch(""),
        "batches.get_batch dot-dot id": lambda: batches.get_batch(".."),
        "batches.cancel_batch dot-dot id": lambda: batches.cancel_batch(".."),
        "files.delete dot id": lambda: files.delete("."),
        "files.retrieve_content dot-dot id": lambda: files.retrieve_content(".."),
        "batches.get_batch id not a string": lambda: batches.get_batch(42),  # type: ignore[arg-type]
        "batches.cancel_batch empty id": lambda: batches.cancel_batch(""),
        "batches.create_batch empty file id": lambda: batches.create_batch("", CHAT),
        "batches.create_batch empty endpoint": lambda: batches.create_batch(FILE_ID, ""),
        "batches.create_batch relative endpoint": lambda: batches.create_batch(
            FILE_ID, "chat/completions"
        ),
        "batches.create_batch unknown endpoint": lambda: batches.create_batch(
            FILE_ID, "/v1/chat/completion"
        ),
        "batches.create_batch endpoint not a string": lambda: batches.create_batch(
            FILE_ID,
            7,  # type: ignore[arg-type]
        ),
        "batches.create_batch empty completion_window": lambda: batches.create_batch(
            FILE_ID, CHAT, completion_window=""
        ),
        "batches.create_batch priority not an int": lambda: batches.create_batch(
            FILE_ID,
            CHAT,
            priority="high",  # type: ignore[arg-type]
        ),
        "batches.create_batch model_id not a string": lambda: batches.create_batch(
            FILE_ID,
            CHAT,
            model_id=1,  # type: ignore[arg-type]
        ),
        "batches.get_batch negative max_retries": lambda: batches.get_batch(
            BATCH_ID, max_retries=-1
        ),
        "batches.wait empty id": lambda: batches.wait(""),
        "batches.wait negative timeout": lambda: batches.wait(BATCH_ID, timeout=-1),
        "batches.wait zero poll_interval": lambda: batches.wait(BATCH_ID, poll_interval=0),
        "batches.stream_status empty id": lambda: batches.stream_status(""),
        "batches.stream_status negative poll_interval": lambda: batches.stream_status(
            BATCH_ID, poll_interval=-1
        ),
        "batches.stream_status backoff below 1": lambda: batches.stream_status(
            BATCH_ID, backoff=0.5
        ),
        "batches.stream_statuses one string": lambda: batches.stream_statuses(BATCH_ID),
        "batches.stream_statuses an empty id among others": lambda: batches.stream_statuses(
            [BATCH_ID, ""]
        ),
        "batches.stream_statuses zero max_concurrent_gets": lambda: batches.stream_statuses(
            [BATCH_ID], max_concurrent_gets=0
        ),
        "batches.stream_statuses zero max_consecutive_failures": lambda: batches.stream_statuses(
            [BATCH_ID], max_consecutive_failures=0
        ),
        "batches.wait NaN timeout": lambda: batches.wait(BATCH_ID, timeout=float("nan")),
        "batches.stream_status max_interval below poll_interval": lambda: batches.stream_status(
            BATCH_ID, poll_interval=5, max_interval=1
        ),
        "batches.results empty id": lambda: batches.results(""),
        "gather_batches zero max_requests_per_batch": lambda: gather_batches(
            client, [{}], max_requests_per_batch=0
        ),
        "gather_batches negative max_bytes_per_batch": lambda: gather_batches(
            client, [{}], max_bytes_per_batch=-1
        ),
        "gather_batches negative max_concurrency": lambda: gather_batches(
            client, [{}], max_concurrency=-4
        ),
        "gather_batches zero max_attempts": lambda: gather_batches(client, [{}], max_attempts=0),
        "gather_batches bool max_attempts": lambda: gather_batches(client, [{}], max_attempts=True),
        "gather_batches relative endpoint": lambda: gather_batches(
            client, [{}], endpoint="chat/completions"
        ),
        "gather_batches empty model": lambda: gather_batches(client, [{}], model=" "),
        "gather_batches bytes requests": lambda: gather_batches(client, b'{"body": {}}\n'),
        "gather_batches one dict as requests": lambda: gather_batches(client, {"body": {}}),
        "gather_batches int requests": lambda: gather_batches(client, 5),  # type: ignore[arg-type]
        "gather_batches negative poll_interval": lambda: gather_batches(
            client, [{}], poll_interval=-1
        ),
        "stream_batches zero max_concurrency": lambda: stream_batches(
            client, [{}], max_concurrency=0
        ),
    }


async def call(factory: Callable[[], Any]) -> None:
    """Run a bad call to its first step: await it, or pull one item from its iterator."""
    made = factory()
    if hasattr(made, "__anext__"):
        try:
            await made.__anext__()
        finally:
            aclose = getattr(made, "aclose", None)
            if aclose is not None:
                await aclose()
    else:
        await made


BAD_CALLS = sorted(bad_calls(AsyncTogether(api_key="x", base_url="http://127.0.0.1:9"), Path()))


@pytest.mark.parametrize("name", BAD_CALLS)
async def test_bad_arguments_fail_clearly_before_any_request(
    name: str, client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """Every bad argument raises InvalidArgumentError whose message names what is wrong, and
    nothing reaches the server."""
    with pytest.raises(InvalidArgumentError) as raised:
        await call(bad_calls(client, tmp_path)[name])
    message = str(raised.value)
    assert message and len(message) < 300
    assert requests_served(emulator) == 0


def test_bad_client_settings_fail_clearly() -> None:
    """Negative timeouts and retries, or a base URL that is not http(s), are refused at once."""
    for options in (
        {"timeout": -1},
        {"timeout": 0},
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"base_url": "ftp://example.com"},
        {"base_url": "api.together.ai"},
        {"base_url": "https://api.together.ai/v1?x=1"},
        {"api_key": 12345},
    ):
        with pytest.raises(InvalidArgumentError):
            AsyncTogether(**({"api_key": "k", "base_url": "http://127.0.0.1:9"} | options))
