"""The emulator as a server under bad input: malformed multipart, JSON, ids, lengths and
ranges, sent as raw bytes over loopback, answer 4xx in the API's error shapes (never a 500
that clients retry) and leave no file, finished or partial, in the emulator's storage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import attrs
import orjson
import pytest
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_file, component, schema_errors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from together_async.emulator import Emulator

CHAT = "/v1/chat/completions"
MULTIPART = "multipart/form-data; boundary=XX"


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def request_bytes(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    content_length: int | None = None,
    authorization: bytes = b"Bearer " + EMULATOR_KEY.encode(),
) -> bytes:
    """A raw HTTP/1.1 request; `content_length` overrides the true length (a lie if it differs)."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines.append(b"Authorization: " + authorization)
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode())
    length = len(body) if content_length is None else content_length
    if body or content_length is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {length}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response, read by its Content-Length (the server may linger before closing)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status=int(status_line.split(" ")[1]), headers=headers, body=body)


async def send(port: int, data: bytes) -> Answer:
    """Write `data` on a fresh connection and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()
        await writer.wait_closed()


def part(headers: bytes, content: bytes) -> tuple[bytes, bytes]:
    return headers, content


FIELD_PURPOSE = part(b'Content-Disposition: form-data; name="purpose"', b"batch-api")
FILE_PART = part(
    b'Content-Disposition: form-data; name="file"; filename="batch.jsonl"\r\n'
    b"Content-Type: application/octet-stream",
    chat_file(2),
)


def multipart(
    parts: Iterable[tuple[bytes, bytes]], *, boundary: bytes = b"XX", close: bool = True
) -> bytes:
    """A multipart body; `close=False` leaves out the closing boundary."""
    body = b"".join(
        b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
        for headers, content in parts
    )
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def assert_file_error(answer: Answer, status: int = 400) -> None:
    """The answer has the status and the file routes' ErrorData shape."""
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert schema_errors(body, component("ErrorData")) == []
    assert body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def assert_batch_error(answer: Answer, status: int = 400) -> None:
    """The answer has the status and the batch routes' `{"error": "<message>"}` shape."""
    assert answer.status == status, (answer.status, answer.body)
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


async def stored_files(emulator: Emulator) -> list[str]:
    """Ids of every file record, and any upload left in flight on disk."""
    records = [record.id for record in await emulator.storage.list_files(include_pending=True)]
    incoming = await asyncio.to_thread(lambda: sorted(emulator.storage.incoming_dir.iterdir()))
    return records + [str(path) for path in incoming]


# -- POST /files/upload ------------------------------------------------------------------------


async def test_a_well_formed_raw_upload_is_accepted(emulator: Emulator) -> None:
    """The raw request the bad cases below mutate is itself a valid upload (the control)."""
    body = multipart([FIELD_PURPOSE, FILE_PART])
    answer = await send(
        emulator.port,
        request_bytes("POST", "/v1/files/upload", headers={"Content-Type": MULTIPART}, body=body),
    )
    assert answer.status == 200, answer.body
    assert answer.json()["bytes"] == len(FILE_PART[1])


BIG_BOUNDARY = "B" * 100_000


def upload_with(flawed: tuple[bytes, bytes]) -> bytes:
    """A valid upload (purpose and file) with one extra, flawed part in front."""
    return multipart([flawed, FIELD_PURPOSE, FILE_PART])


# Each case is a valid upload but for one flaw, and names a fragment of the message it earns
# (so a 400 for some other reason does not pass).
BAD_UPLOADS: dict[str, tuple[str | None, bytes, str]] = {
    "no boundary": ("multipart/form-data", multipart([FIELD_PURPOSE, FILE_PART]), "boundary"),
    "empty boundary": (
        "multipart/form-data; boundary=",
        multipart([FIELD_PURPOSE, FILE_PART]),
        "boundary",
    ),
    "100 kB boundary": (
        f"multipart/form-data; boundary={BIG_BOUNDARY}",
        multipart([FIELD_PURPOSE, FILE_PART], boundary=BIG_BOUNDARY.encode()),
        "boundary is longer than 70",
    ),
    "71-character boundary": (
        f"multipart/form-data; boundary={'b' * 71}",
        multipart([FIELD_PURPOSE, FILE_PART], boundary=b"b" * 71),
        "boundary is longer than 70",
    ),
    "garbage part header": (
        MULTIPART,
        upload_with(part(b"\x00\xff no colon here", b"x")),
        "malformed multipart",
    ),
    "part header with an empty name": (
        MULTIPART,
        upload_with(part(b": value", b"x")),
        "malformed multipart",
    ),
    "part without Content-Disposition": (
        MULTIPART,
        upload_with(part(b"X-Note: hi", b"x")),
        "no Content-Disposition",
    ),
    "unterminated quote in Content-Disposition": (
        MULTIPART,
        upload_with(part(b'Content-Disposition: form-data; name="note', b"x")),
        "not a valid form-data header",
    ),
    "Content-Disposition not form-data": (
        MULTIPART,
        upload_with(part(b'Content-Disposition: attachment; name="note"', b"x")),
        "not a valid form-data header",
    ),
    "empty part name": (
        MULTIPART,
        upload_with(part(b'Content-Disposition: form-data; name=""', b"x")),
        "no name",
    ),
    "part without a name": (
        MULTIPART,
        upload_with(part(b"Content-Disposition: form-data", b"x")),
        "no name",
    ),
    "non-UTF-8 part name": (
        MULTIPART,
        upload_with(part(b'Content-Disposition: form-data; name="\xff\xfe"', b"x")),
        "not valid UTF-8",
    ),
    "non-UTF-8 file name": (
        MULTIPART,
        multipart(
            [
                FIELD_PURPOSE,
                part(b'Content-Disposition: form-data; name="file"; filename="\xff.jsonl"', b"{}"),
            ]
        ),
        "not valid UTF-8",
    ),
    "base64 transfer encoding": (
        MULTIPART,
        multipart(
            [FIELD_PURPOSE, part(FILE_PART[0] + b"\r\nContent-Transfer-Encoding: base64", b"e30=")]
        ),
        "Content-Transfer-Encoding",
    ),
    "gzip content encoding": (
        MULTIPART,
        multipart([FIELD_PURPOSE, part(FILE_PART[0] + b"\r\nContent-Encoding: gzip", b"\x1f\x8b")]),
        "Content-Encoding",
    ),
    "nested multipart without a boundary": (
        MULTIPART,
        upload_with(
            part(
                b'Content-Disposition: form-data; name="note"\r\nContent-Type: multipart/mixed',
                b"x",
            )
        ),
        "malformed multipart",
    ),
    "nested multipart": (
        MULTIPART,
        upload_with(
            part(
                b'Content-Disposition: form-data; name="note"\r\n'
                b"Content-Type: multipart/mixed; boundary=YY",
                multipart([FIELD_PURPOSE], boundary=b"YY"),
            )
        ),
        "nested multipart",
    ),
    "no closing boundary": (
        MULTIPART,
        multipart([FIELD_PURPOSE, FILE_PART], close=False),
        "malformed multipart",
    ),
    "file part cut before its boundary": (
        MULTIPART,
        multipart([FIELD_PURPOSE], close=False) + b"--XX\r\n" + FILE_PART[0] + b"\r\n\r\n{",
        "malformed multipart",
    ),
    "empty body": (MULTIPART, b"", "malformed multipart"),
    "no boundary line at all": (MULTIPART, b'{"purpose": "batch-api"}', "malformed multipart"),
    "missing file part": (MULTIPART, multipart([FIELD_PURPOSE]), "no file part"),
    "two file parts": (
        MULTIPART,
        multipart([FIELD_PURPOSE, FILE_PART, FILE_PART]),
        "more than one file part",
    ),
    "JSON Content-Type": ("application/json", b'{"purpose": "batch-api"}', "multipart/form-data"),
    "no Content-Type": (None, multipart([FIELD_PURPOSE, FILE_PART]), "multipart/form-data"),
    "multipart/mixed": (
        "multipart/mixed; boundary=XX",
        multipart([FIELD_PURPOSE, FILE_PART]),
        "multipart/form-data",
    ),
}


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"), BAD_UPLOADS.values(), ids=list(BAD_UPLOADS)
)
async def test_malformed_upload_is_400_and_stores_nothing(
    emulator: Emulator, content_type: str | None, body: bytes, fragment: str
) -> None:
    """A malformed multipart upload answers 400 with ErrorData and leaves no file behind."""
    before = await stored_files(emulator)
    headers = {"Content-Type": content_type} if content_type is not None else {}
    answer = await send(
        emulator.port, request_bytes("POST", "/v1/files/upload", headers=headers, body=body)
    )
    assert_file_error(answer)
    assert fragment in answer.json()["error"]["message"]
    assert await stored_files(emulator) == before


FIELD_FILE_NAME = part(b'Content-Disposition: form-data; name="file_name"', b"batch.jsonl")
REGISTRATION = [FIELD_PURPOSE, FIELD_FILE_NAME]


async def test_a_well_formed_raw_registration_is_accepted(emulator: Emulator) -> None:
    """The raw POST /files the bad cases below mutate is itself valid (302 to storage)."""
    answer = await send(
        emulator.port,
        request_bytes(
            "POST", "/v1/files", headers={"Content-Type": MULTIPART}, body=multipart(REGISTRATION)
        ),
    )
    assert answer.status == 302, answer.body


BAD_REGISTRATIONS: dict[str, tuple[str, bytes, str]] = {
    "no boundary": ("multipart/form-data", multipart(REGISTRATION), "boundary"),
    "100 kB boundary": (
        f"multipart/form-data; boundary={BIG_BOUNDARY}",
        multipart(REGISTRATION, boundary=BIG_BOUNDARY.encode()),
        "boundary is longer than 70",
    ),
    "garbage part header": (
        MULTIPART,
        multipart([part(b"garbage", b"x"), *REGISTRATION]),
        "malformed multipart",
    ),
    "unterminated quote in Content-Disposition": (
        MULTIPART,
        multipart([part(b'Content-Disposition: form-data; name="note', b"x"), *REGISTRATION]),
        "not a valid form-data header",
    ),
    "no closing boundary": (MULTIPART, multipart(REGISTRATION, close=False), "malformed multipart"),
    "non-UTF-8 part name": (
        MULTIPART,
        multipart([part(b'Content-Disposition: form-data; name="\xff"', b"\xff"), *REGISTRATION]),
        "not valid UTF-8",
    ),
    "unknown form charset": (
        "application/x-www-form-urlencoded; charset=no-such-charset",
        b"purpose=batch-api&file_name=batch.jsonl",
        "malformed form",
    ),
}


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"), BAD_REGISTRATIONS.values(), ids=list(BAD_REGISTRATIONS)
)
async def test_malformed_registration_form_is_400(
    emulator: Emulator, content_type: str, body: bytes, fragment: str
) -> None:
    """POST /files (the presigned flow's first step) answers a malformed form with 400."""
    before = await stored_files(emulator)
    answer = await send(
        emulator.port,
        request_bytes("POST", "/v1/files", headers={"Content-Type": content_type}, body=body),
    )
    assert_file_error(answer)
    assert fragment in answer.json()["error"]["message"]
    assert await stored_files(emulator) == before


@pytest.mark.parametrize(
    ("path", "content_type", "check"),
    [
        ("/v1/files/upload", MULTIPART, assert_file_error),
        ("/v1/files", MULTIPART, assert_file_error),
        ("/v1/batches", "application/json", assert_batch_error),
    ],
)
async def test_declared_body_over_the_limit_is_413_before_it_is_sent(
    make_emulator: Any, path: str, content_type: str, check: Any
) -> None:
    """A Content-Length over the route's limit answers 413 at once, with only the head sent."""
    emulator = await make_emulator(max_upload_bytes=10_000)
    data = request_bytes(
        "POST", path, headers={"Content-Type": content_type}, content_length=2_000_000_000
    )
    answer = await send(emulator.port, data)
    check(answer, 413)
    assert await stored_files(emulator) == []


async def test_upload_cut_short_by_the_client_leaves_no_file(make_emulator: Any) -> None:
    """A client that closes mid-file (Content-Length larger than sent) leaves no partial file."""
    emulator = await make_emulator()
    start = multipart([FIELD_PURPOSE], close=False) + b"--XX\r\n" + FILE_PART[0] + b"\r\n\r\n"
    sent = start + b"x" * (3 * 1024 * 1024)
    data = request_bytes(
        "POST",
        "/v1/files/upload",
        headers={"Content-Type": MULTIPART},
        body=sent,
        content_length=len(sent) + 1_000_000,
    )
    _, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    storage = emulator.storage
    # Closing waits for the request handlers to finish, the aborted upload's included.
    await emulator.close()
    assert await asyncio.to_thread(lambda: list(storage.incoming_dir.iterdir())) == []
    assert await asyncio.to_thread(lambda: list(storage.files_dir.iterdir())) == []


# -- POST /batches -------------------------------------------------------------------------------


BAD_BATCH_BODIES: dict[str, bytes] = {
    "invalid JSON": b'{"input_file_id": ',
    "not UTF-8": b'{"input_file_id": "\xff"}',
    "empty body": b"",
    "array": b"[1, 2]",
    "string": b'"file-1"',
    "null": b"null",
    "deeply nested": b"[" * 10_000,
    "lone surrogate": b'{"input_file_id": "\\ud800", "endpoint": "/v1/chat/completions"}',
}


@pytest.mark.parametrize("body", BAD_BATCH_BODIES.values(), ids=list(BAD_BATCH_BODIES))
async def test_create_batch_with_a_body_that_is_not_a_json_object_is_400(
    emulator: Emulator, body: bytes
) -> None:
    """POST /batches with a body that is not a JSON object answers 400 `{"error": ...}`."""
    answer = await send(
        emulator.port,
        request_bytes(
            "POST", "/v1/batches", headers={"Content-Type": "application/json"}, body=body
        ),
    )
    assert_batch_error(answer)


BAD_BATCH_FIELDS: dict[str, dict[str, Any]] = {
    "input_file_id a number": {"input_file_id": 5},
    "endpoint a list": {"endpoint": ["/v1/chat/completions"]},
    "completion_window a number": {"completion_window": 24},
    "completion_window infinite": {"completion_window": "infh"},
    "completion_window past any date": {"completion_window": "1e10h"},
    "completion_window overflowing": {"completion_window": "1e400h"},
    "priority a string": {"priority": "high"},
    "priority a boolean": {"priority": True},
    "priority a float": {"priority": 1.5},
    "priority past 64 bits": {"priority": 2**63},
    "priority below 64 bits": {"priority": -(2**63) - 1},
    "model_id a number": {"model_id": 7},
    "unknown input file id with odd characters": {"input_file_id": "file-\x00/../\u202e"},
}


@pytest.mark.parametrize("fields", BAD_BATCH_FIELDS.values(), ids=list(BAD_BATCH_FIELDS))
async def test_create_batch_with_a_bad_field_is_400_and_makes_no_job(
    emulator: Emulator, api: RawAPI, fields: dict[str, Any]
) -> None:
    """A wrong type or out-of-range value answers 400, creates no job, keeps the list readable."""
    uploaded = await api.upload(chat_file(1))
    payload = {"input_file_id": uploaded["id"], "endpoint": CHAT, **fields}
    # The standard library, not orjson: it writes integers past 64 bits, as JSON allows.
    body = json.dumps(payload).encode()
    answer = await send(
        emulator.port,
        request_bytes(
            "POST", "/v1/batches", headers={"Content-Type": "application/json"}, body=body
        ),
    )
    assert_batch_error(answer)
    assert await emulator.storage.list_jobs() == []
    status, jobs = await api.call("GET", "/batches")
    assert (status, jobs) == (200, [])


# -- odd ids -------------------------------------------------------------------------------------


ODD_IDS = {
    "NUL": "%00",
    "not UTF-8": "%ff%fe",
    "encoded surrogate": "%ED%A0%80",
    "encoded slashes": "..%2F..%2Fetc%2Fpasswd",
    "bad percent escape": "%zz",
    "emoji": "%F0%9F%98%80",
    "spaces": "file%20one",
    "5000 characters": "f" * 5000,
    "almost a file id": "file-00000000-0000-0000-0000-00000000000g",
}
FILE_ROUTES = [
    ("GET", "/v1/files/{}"),
    ("DELETE", "/v1/files/{}"),
    ("GET", "/v1/files/{}/content"),
    ("POST", "/v1/files/{}/preprocess"),
]
BATCH_ROUTES = [("GET", "/v1/batches/{}"), ("POST", "/v1/batches/{}/cancel")]


@pytest.mark.parametrize("odd_id", ODD_IDS.values(), ids=list(ODD_IDS))
@pytest.mark.parametrize(
    ("method", "template"), FILE_ROUTES + BATCH_ROUTES, ids=lambda value: str(value)
)
async def test_odd_id_is_404_in_the_route_shape(
    emulator: Emulator, method: str, template: str, odd_id: str
) -> None:
    """An id with odd characters is a 404 in its route family's error shape."""
    answer = await send(emulator.port, request_bytes(method, template.format(odd_id)))
    check = assert_batch_error if "/batches/" in template else assert_file_error
    check(answer, 404)


async def test_key_that_is_not_utf8_is_401(emulator: Emulator) -> None:
    """An Authorization header with bytes that are not UTF-8 is a 401, not a crash."""
    answer = await send(
        emulator.port, request_bytes("GET", "/v1/files", authorization=b"Bearer \xff\xfe")
    )
    assert_file_error(answer, 401)


# -- Range on downloads --------------------------------------------------------------------------

CONTENT = b"0123456789"

# Ranges the emulator ignores, sending the whole file with 200, as RFC 9110 section 14.2
# allows: the client can tell from the status that it did not get a part.
IGNORED_RANGES = {
    "not a number": "bytes=abc",
    "last before first": "bytes=5-2",
    "several ranges": "bytes=0-1,3-4",
    "another unit": "items=0-1",
    "no positions": "bytes=-",
    "empty": "bytes=",
    "three positions": "bytes=1-2-3",
}
PARTIAL_RANGES = {
    "from a position": ("bytes=4-", 4, 10),
    "closed": ("bytes=2-5", 2, 6),
    "last past the end": ("bytes=2-" + "9" * 40, 2, 10),
    "suffix": ("bytes=-3", 7, 10),
    "suffix longer than the file": ("bytes=-50", 0, 10),
    "unit in capitals, spaces": ("Bytes = 1 - 2", 1, 3),
}
UNSATISFIABLE_RANGES = {
    "at the end": "bytes=10-",
    "past the end": "bytes=11-20",
    "thousands of digits": "bytes=" + "9" * 5000 + "-",
    "empty suffix": "bytes=-0",
}


@pytest.fixture
async def content_id(api: RawAPI) -> str:
    """A stored file holding CONTENT."""
    uploaded = await api.upload(CONTENT, purpose="fine-tune", file_name="digits.jsonl")
    return str(uploaded["id"])


def content_request(file_id: str, range_header: str) -> bytes:
    path = f"/v1/files/{file_id}/content"
    return request_bytes("GET", path, headers={"Range": range_header})


@pytest.mark.parametrize("range_header", IGNORED_RANGES.values(), ids=list(IGNORED_RANGES))
async def test_unusable_range_is_ignored(
    emulator: Emulator, content_id: str, range_header: str
) -> None:
    """A malformed, reversed or multiple Range is ignored: 200 with the whole file."""
    answer = await send(emulator.port, content_request(content_id, range_header))
    assert (answer.status, answer.body) == (200, CONTENT)
    assert "content-range" not in answer.headers


@pytest.mark.parametrize(
    ("range_header", "start", "end"), PARTIAL_RANGES.values(), ids=list(PARTIAL_RANGES)
)
async def test_single_range_is_206(
    emulator: Emulator, content_id: str, range_header: str, start: int, end: int
) -> None:
    """One satisfiable range answers 206 with those bytes and their Content-Range."""
    answer = await send(emulator.port, content_request(content_id, range_header))
    assert (answer.status, answer.body) == (206, CONTENT[start:end])
    assert answer.headers["content-range"] == f"bytes {start}-{end - 1}/{len(CONTENT)}"


@pytest.mark.parametrize(
    "range_header", UNSATISFIABLE_RANGES.values(), ids=list(UNSATISFIABLE_RANGES)
)
async def test_unsatisfiable_range_is_416(
    emulator: Emulator, content_id: str, range_header: str
) -> None:
    """A range past the end or an empty suffix is 416 with ErrorData and `bytes */size`."""
    answer = await send(emulator.port, content_request(content_id, range_header))
    assert_file_error(answer, 416)
    assert answer.headers["content-range"] == f"bytes */{len(CONTENT)}"


# -- fuzz ----------------------------------------------------------------------------------------

_HEADER_LINES = st.sampled_from(
    [
        b'Content-Disposition: form-data; name="purpose"',
        b'Content-Disposition: form-data; name="file"; filename="a.jsonl"',
        b'Content-Disposition: form-data; name="file_name"',
        b"Content-Disposition: form-data",
        b'Content-Disposition: form-data; name="\xff"',
        b"Content-Type: multipart/mixed",
        b"Content-Transfer-Encoding: quoted-printable",
        b"no colon",
        b"",
    ]
)
_PARTS = st.lists(
    st.tuples(
        st.lists(_HEADER_LINES | st.binary(max_size=40), max_size=3),
        st.sampled_from([b"batch-api", b"", b"{}\n", b"\r\n--XX\r\n"]) | st.binary(max_size=60),
    ),
    max_size=4,
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(parts=_PARTS, cut=st.none() | st.integers(min_value=0, max_value=400))
async def test_fuzzed_multipart_never_500_and_a_refusal_stores_nothing(
    emulator: Emulator, parts: list[tuple[list[bytes], bytes]], cut: int | None
) -> None:
    """Random part headers and contents get 200 or a 4xx with ErrorData, never a 500."""
    before = await stored_files(emulator)
    body = multipart((b"\r\n".join(headers), content) for headers, content in parts)
    if cut is not None:
        body = body[:cut]
    answer = await send(
        emulator.port,
        request_bytes("POST", "/v1/files/upload", headers={"Content-Type": MULTIPART}, body=body),
    )
    if answer.status == 200:
        return
    assert 400 <= answer.status < 500, (answer.status, answer.body)
    assert_file_error(answer, answer.status)
    assert await stored_files(emulator) == before


async def test_presigned_put_cut_short_by_the_client_leaves_no_body(make_emulator: Any) -> None:
    """A storage PUT closed before its Content-Length leaves the file pending and no bytes."""
    emulator = await make_emulator()
    registration = multipart(REGISTRATION)
    answer = await send(
        emulator.port,
        request_bytes("POST", "/v1/files", headers={"Content-Type": MULTIPART}, body=registration),
    )
    assert answer.status == 302
    location = answer.headers["location"]
    file_id = answer.headers["x-together-file-id"]
    path = "/" + location.split("/", 3)[3]
    sent = b"x" * (3 * 1024 * 1024)
    _, writer = await asyncio.open_connection("127.0.0.1", emulator.storage_port)
    writer.write(request_bytes("PUT", path, body=sent, content_length=len(sent) + 1))
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    storage = emulator.storage
    # Closing waits for the request handlers to finish, the aborted PUT's included.
    await emulator.close()
    assert await asyncio.to_thread(lambda: list(storage.incoming_dir.iterdir())) == []
    assert not await asyncio.to_thread(storage.body_path(file_id).exists)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["24h", "1e10h", "infh", "-1h", "0h", "90m", CHAT, "/v1/completions"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
_BATCH_FIELDS = st.dictionaries(
    st.sampled_from(["input_file_id", "endpoint", "completion_window", "priority", "model_id"]),
    _JSON_VALUES,
)


@pytest.fixture
async def batch_input_id(api: RawAPI) -> str:
    """A stored batch-api input file of one chat request."""
    uploaded = await api.upload(chat_file(1))
    return str(uploaded["id"])


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fields=_BATCH_FIELDS, real_file=st.booleans(), real_endpoint=st.booleans())
async def test_fuzzed_create_batch_is_201_or_400_and_the_list_stays_readable(
    emulator: Emulator,
    batch_input_id: str,
    fields: dict[str, Any],
    real_file: bool,
    real_endpoint: bool,
) -> None:
    """Random JSON field values get 201 or a 400 `{"error": ...}`; GET /batches stays 200."""
    payload = dict(fields)
    if real_file:
        payload["input_file_id"] = batch_input_id
    if real_endpoint:
        payload["endpoint"] = CHAT
    answer = await send(
        emulator.port,
        request_bytes(
            "POST",
            "/v1/batches",
            headers={"Content-Type": "application/json"},
            body=json.dumps(payload).encode(),
        ),
    )
    if answer.status != 201:
        assert_batch_error(answer)
    listing = await send(emulator.port, request_bytes("GET", "/v1/batches"))
    assert listing.status == 200, listing.body
