"""client.files over real loopback HTTP: the presigned upload flow against a storage host on a
second server, its fallbacks and safety checks, and streamed downloads with Range resume."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio.to_thread
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from http_fakes import SECRET_KEY, FakeFiles, batch_lines

from together_async import (
    APIConnectionError,
    APIResponseValidationError,
    AsyncTogether,
    BatchFileError,
    DownloadedFile,
    FileObject,
    InternalServerError,
    InvalidArgumentError,
    NotFoundError,
    UnsafeURLError,
)
from together_async.files import _UploadSource

pytestmark = pytest.mark.usefixtures("fast_retries")

Serve = Callable[[web.Application], Awaitable[TestServer]]
MakeClient = Callable[..., AsyncTogether]
DATA = batch_lines(50)


@pytest.fixture
async def fake(serve: Serve) -> FakeFiles:
    """A fake files API and its storage host, both running."""
    fake = FakeFiles()
    storage = await serve(fake.storage_app())
    fake.storage_url = str(storage.make_url("")).rstrip("/")
    fake.api_server = await serve(fake.api_app())
    return fake


@pytest.fixture
def client(fake: FakeFiles, make_client: MakeClient) -> AsyncTogether:
    """A client pointed at the fake API."""
    return make_client(fake.api_server)


def names_in(directory: Path) -> list[str]:
    """The sorted names in a directory (a plain function: blocking is fine in a test helper)."""
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture
def batch_file(tmp_path: Path) -> Path:
    """A valid 50-line batch input file on disk."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(DATA)
    return path


# ---- upload: the presigned flow -----------------------------------------------------------


async def test_upload_follows_the_presigned_flow(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """POST /files with the form, PUT to storage, then preprocess; returns the FileObject."""
    uploaded = await client.files.upload(batch_file)
    assert isinstance(uploaded, FileObject)
    assert uploaded.processed is True and uploaded.bytes == len(DATA)
    assert fake.api.paths() == ["POST /v1/files", f"POST /v1/files/{uploaded.id}/preprocess"]
    assert fake.forms[0] == {
        "purpose": "batch-api",
        "file_name": "requests.jsonl",
        "file_type": "jsonl",
        "checksum": hashlib.sha256(DATA).hexdigest(),
    }
    assert fake.contents[uploaded.id] == DATA


async def test_storage_put_has_length_and_no_authorization(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """The PUT carries Content-Length and the bytes, never the API key, to the other host."""
    await client.files.upload(batch_file)
    [put] = fake.storage.requests
    assert put.method == "PUT"
    assert put.headers["Content-Length"] == str(len(DATA))
    assert "Transfer-Encoding" not in put.headers
    assert "Authorization" not in put.headers
    assert all(SECRET_KEY not in value for value in put.headers.values())
    assert put.query == {"sig": "S3CRET"}
    assert put.body == DATA
    assert fake.api.requests[0].headers["Authorization"] == f"Bearer {SECRET_KEY}"


async def test_upload_bytes(fake: FakeFiles, client: AsyncTogether) -> None:
    """Bytes upload under the given filename."""
    uploaded = await client.files.upload(DATA, filename="mine.jsonl")
    assert fake.contents[uploaded.id] == DATA
    assert fake.forms[0]["file_name"] == "mine.jsonl"


async def test_upload_binary_file_object_from_its_position(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """A binary file object is read from its current position to the end."""
    with batch_file.open("rb") as handle:
        handle.read(0)
        uploaded = await client.files.upload(handle)
    assert fake.contents[uploaded.id] == DATA
    assert fake.forms[0]["file_name"] == "requests.jsonl"


async def test_upload_non_seekable_stream(fake: FakeFiles, client: AsyncTogether) -> None:
    """A stream that cannot seek is spooled once, then uploaded whole."""

    class OneWay(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
            return self._data.readinto(buffer)

    uploaded = await client.files.upload(io.BufferedReader(OneWay(DATA)))
    assert fake.contents[uploaded.id] == DATA


async def test_upload_text_mode_file_is_refused(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """A file opened in text mode raises InvalidArgumentError before any request."""
    with batch_file.open("r") as handle:
        with pytest.raises(InvalidArgumentError, match="binary"):
            await client.files.upload(handle)  # type: ignore[arg-type]
    assert fake.api.requests == []


async def test_invalid_batch_file_is_refused_before_sending(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """check=True lists the file's problems with line numbers and sends nothing."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(DATA + b'{"custom_id": "r1", "body": {}}\nnot json\n')
    with pytest.raises(BatchFileError) as caught:
        await client.files.upload(bad)
    text = str(caught.value)
    assert "bad.jsonl" in text and "line 51" in text and "line 52" in text
    assert fake.api.requests == [] and fake.storage.requests == []


async def test_endpoint_is_checked_against_line_urls(
    fake: FakeFiles, client: AsyncTogether
) -> None:
    """With endpoint given, a line whose url names another endpoint is refused."""
    line = b'{"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}\n'
    with pytest.raises(BatchFileError, match="url"):
        await client.files.upload(line, endpoint="/v1/chat/completions")
    assert fake.api.requests == []


async def test_check_false_uploads_anything(fake: FakeFiles, client: AsyncTogether) -> None:
    """check=False skips validation."""
    uploaded = await client.files.upload(b"not a batch file\n", check=False)
    assert fake.contents[uploaded.id] == b"not a batch file\n"


async def test_other_purposes_are_not_validated(fake: FakeFiles, client: AsyncTogether) -> None:
    """Only batch-api files go through the batch-file check."""
    uploaded = await client.files.upload(b"free text\n", purpose="fine-tune")
    assert fake.forms[0]["purpose"] == "fine-tune"
    assert fake.contents[uploaded.id] == b"free text\n"


async def test_missing_path_is_a_clear_error(client: AsyncTogether, tmp_path: Path) -> None:
    """A path that does not exist raises InvalidArgumentError naming it."""
    with pytest.raises(InvalidArgumentError, match=r"nope\.jsonl"):
        await client.files.upload(tmp_path / "nope.jsonl")


async def test_path_with_a_nul_is_a_clear_error(client: AsyncTogether) -> None:
    """A path holding a NUL byte raises InvalidArgumentError naming it, not ValueError."""
    with pytest.raises(InvalidArgumentError, match=r"cannot read 'in\\x00\.jsonl'.*null"):
        await client.files.upload("in\x00.jsonl")


# ---- upload: variants of the server ------------------------------------------------------


async def test_existing_checksum_reuses_the_file(fake: FakeFiles, client: AsyncTogether) -> None:
    """A 409 with a file id returns that file; nothing goes to storage."""
    fake.upload_mode = "exists"
    uploaded = await client.files.upload(DATA)
    assert uploaded.id == "file-1"
    assert fake.api.paths() == ["POST /v1/files", "GET /v1/files/file-1"]
    assert fake.storage.requests == []


async def test_file_object_answer_is_accepted(fake: FakeFiles, client: AsyncTogether) -> None:
    """A server answering POST /files with the file object itself needs no further step."""
    fake.upload_mode = "direct"
    uploaded = await client.files.upload(DATA)
    assert uploaded.id == "file-1"
    assert fake.storage.requests == []


async def test_multipart_fallback_when_there_is_no_presigned_flow(
    fake: FakeFiles, client: AsyncTogether
) -> None:
    """A 404 on POST /files falls back to the multipart POST /files/upload."""
    fake.upload_mode = "missing"
    uploaded = await client.files.upload(DATA, filename="fallback.jsonl")
    assert fake.api.paths() == ["POST /v1/files", "POST /v1/files/upload"]
    assert fake.contents[uploaded.id] == DATA
    assert fake.forms[1]["purpose"] == "batch-api"
    assert fake.forms[1]["file_name"] == "fallback.jsonl"


# ---- upload: storage behaviour and safety ---------------------------------------------------


async def test_storage_failure_is_retried_with_the_whole_body(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """A 503 from storage is retried, re-streaming the file from its start."""
    fake.storage_failures = 1
    uploaded = await client.files.upload(batch_file)
    assert [put.body for put in fake.storage.requests] == [DATA, DATA]
    assert fake.contents[uploaded.id] == DATA


async def test_failed_put_names_the_half_uploaded_file(
    fake: FakeFiles, make_client: MakeClient, batch_file: Path
) -> None:
    """When storage keeps failing, the error names the file id left without content."""
    fake.storage_failures = 100
    client = make_client(fake.api_server, max_retries=1)
    with pytest.raises(InternalServerError) as caught:
        await client.files.upload(batch_file)
    assert "file-1" in str(caught.value)
    assert caught.value.status_code == 503
    assert len(fake.storage.requests) == 2
    assert "S3CRET" not in str(caught.value)


async def test_storage_redirect_is_followed_and_restreamed(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """A redirect from storage is followed with the whole body sent again, still no key."""
    fake.storage_redirects["/upload/file-1"] = f"{fake.storage_url}/upload/moved/file-1"
    uploaded = await client.files.upload(batch_file)
    assert [put.path for put in fake.storage.requests] == ["/upload/file-1", "/upload/moved/file-1"]
    assert all(put.body == DATA for put in fake.storage.requests)
    assert all("Authorization" not in put.headers for put in fake.storage.requests)
    assert fake.contents[uploaded.id] == DATA


async def test_unsafe_location_is_refused_before_sending(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """A Location at a metadata address is refused; nothing is sent; the file id is named."""
    fake.location_override = "http://169.254.169.254/latest/upload"
    with pytest.raises(UnsafeURLError) as caught:
        await client.files.upload(batch_file)
    assert "file-1" in str(caught.value)
    assert fake.storage.requests == []


async def test_unsafe_storage_redirect_is_refused(
    fake: FakeFiles, client: AsyncTogether, batch_file: Path
) -> None:
    """A storage redirect towards a metadata host is refused before the second PUT."""
    fake.storage_redirects["/upload/file-1"] = "http://metadata.google.internal/x"
    with pytest.raises(UnsafeURLError):
        await client.files.upload(batch_file)
    assert len(fake.storage.requests) == 1


# ---- metadata calls -------------------------------------------------------------------------


async def test_retrieve_list_delete(fake: FakeFiles, client: AsyncTogether) -> None:
    """retrieve, list and delete hit their routes and return models."""
    file_id = fake.add_file(DATA)
    assert (await client.files.retrieve(file_id)).file_type == "jsonl"
    listed = await client.files.list()
    assert [item.id for item in listed] == [file_id]
    deleted = await client.files.delete(file_id)
    assert (deleted.id, deleted.deleted) == (file_id, True)
    assert fake.api.paths() == [
        f"GET /v1/files/{file_id}",
        "GET /v1/files",
        f"DELETE /v1/files/{file_id}",
    ]


async def test_list_accepts_a_bare_array(serve: Serve, make_client: MakeClient) -> None:
    """GET /files answering a bare array still gives a FileList."""

    async def bare_array(request: web.Request) -> web.Response:
        return web.json_response([{"id": "f1"}, {"id": "f2"}])

    app = web.Application()
    app.router.add_get("/v1/files", bare_array)
    client = make_client(await serve(app))
    assert [item.id for item in await client.files.list()] == ["f1", "f2"]


@pytest.mark.parametrize("bad", ["", None, 7])
async def test_bad_ids_are_refused_before_any_request(
    fake: FakeFiles, client: AsyncTogether, bad: object
) -> None:
    """Empty or non-string ids raise InvalidArgumentError and send nothing."""
    with pytest.raises(InvalidArgumentError):
        await client.files.retrieve(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await client.files.delete(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await client.files.retrieve_content(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        client.files.iter_lines(bad)  # type: ignore[arg-type]
    assert fake.api.requests == []


async def test_not_found_is_mapped(fake: FakeFiles, client: AsyncTogether) -> None:
    """An unknown id gives NotFoundError with the server's message."""
    with pytest.raises(NotFoundError, match="file not found"):
        await client.files.retrieve("file-404")


# ---- downloads ------------------------------------------------------------------------------


async def test_retrieve_content_defaults_to_id_jsonl(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no output, the file lands in ./<id>.jsonl and nothing else is left behind."""
    monkeypatch.chdir(tmp_path)
    file_id = fake.add_file(DATA)
    downloaded = await client.files.retrieve_content(file_id)
    assert downloaded == DownloadedFile(id=file_id, path=Path(f"{file_id}.jsonl"), bytes=len(DATA))
    assert (tmp_path / f"{file_id}.jsonl").read_bytes() == DATA
    assert names_in(tmp_path) == [f"{file_id}.jsonl"]
    assert fake.api.requests[0].headers["Accept-Encoding"] == "identity"


async def test_retrieve_content_into_a_directory(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """An existing directory as output means <dir>/<id>.jsonl."""
    file_id = fake.add_file(DATA)
    downloaded = await client.files.retrieve_content(file_id, output=tmp_path)
    assert downloaded.path == tmp_path / f"{file_id}.jsonl"
    assert downloaded.path.read_bytes() == DATA


async def test_download_resumes_with_range_after_a_drop(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """A connection dropped mid-body is resumed with Range; the file is whole and exact."""
    content = batch_lines(5000)
    file_id = fake.add_file(content)
    fake.drop_after = [len(content) // 3]
    target = tmp_path / "out.jsonl"
    downloaded = await client.files.retrieve_content(file_id, output=target)
    assert target.read_bytes() == content
    assert downloaded.bytes == len(content)
    first, second = fake.api.requests
    assert "Range" not in first.headers
    start = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(content) // 3


async def test_download_restarts_cleanly_when_range_is_ignored(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """A server that answers a Range with the whole file again still gives an exact copy."""
    content = batch_lines(5000)
    file_id = fake.add_file(content)
    fake.drop_after = [len(content) // 2]
    fake.ignore_range = True
    target = tmp_path / "out.jsonl"
    await client.files.retrieve_content(file_id, output=target)
    assert target.read_bytes() == content


async def test_failed_download_leaves_nothing_behind(
    fake: FakeFiles, make_client: MakeClient, tmp_path: Path
) -> None:
    """When every attempt drops before a byte arrives, the error is raised and neither the
    output nor a temporary file is left."""
    file_id = fake.add_file(DATA)
    fake.drop_after = [0] * 10
    client = make_client(fake.api_server, max_retries=2)
    with pytest.raises(APIConnectionError):
        await client.files.retrieve_content(file_id, output=tmp_path / "out.jsonl")
    assert names_in(tmp_path) == []


async def test_download_open_is_retried(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """A 503 before the content starts is retried like any call."""
    file_id = fake.add_file(DATA)
    fake.content_failures = 2
    downloaded = await client.files.retrieve_content(file_id, output=tmp_path / "out.jsonl")
    assert downloaded.bytes == len(DATA)
    assert len(fake.api.requests) == 3


async def test_download_into_a_missing_directory_is_refused(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """An output whose directory does not exist raises InvalidArgumentError; nothing is sent."""
    file_id = fake.add_file(DATA)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        await client.files.retrieve_content(file_id, output=tmp_path / "no" / "out.jsonl")
    assert fake.api.requests == []


async def test_download_into_dev_null_writes_into_it(
    fake: FakeFiles, client: AsyncTogether
) -> None:
    """/dev/null as output is written into (not replaced by a renamed regular file)."""
    file_id = fake.add_file(DATA)
    downloaded = await client.files.retrieve_content(file_id, output="/dev/null")
    assert downloaded.bytes == len(DATA) and downloaded.path == Path("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


async def test_download_into_a_fifo_feeds_its_reader(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """A FIFO as output is opened and written into: its reader gets every byte, and the FIFO
    is still a FIFO afterwards."""
    content = batch_lines(3000)
    file_id = fake.add_file(content)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read_all() -> None:
        with open(fifo, "rb") as pipe:
            received.append(pipe.read())

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        downloaded = await client.files.retrieve_content(file_id, output=fifo)
    finally:
        await anyio.to_thread.run_sync(reader.join, 10)
    assert received == [content] and downloaded.bytes == len(content)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert names_in(tmp_path) == ["pipe"]


async def test_download_through_a_symlink_keeps_the_link(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path
) -> None:
    """A symlink as output gets its target written; the link itself is not replaced."""
    file_id = fake.add_file(DATA)
    real = tmp_path / "real.jsonl"
    real.write_bytes(b"old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    await client.files.retrieve_content(file_id, output=link)
    assert link.is_symlink() and real.read_bytes() == DATA
    assert names_in(tmp_path) == ["link.jsonl", "real.jsonl"]


@pytest.mark.parametrize("hostile", ["../evil", "/tmp/evil", "sub/evil", "..\\evil", "a\0b"])
async def test_hostile_id_never_escapes_the_output_directory(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path, hostile: str
) -> None:
    """An id with a path separator or NUL, used to name the file in a directory, is refused
    with InvalidArgumentError before any request; nothing is written anywhere."""
    fake.files[hostile] = {"id": hostile, "bytes": len(DATA)}
    fake.contents[hostile] = DATA
    inner = tmp_path / "out"
    inner.mkdir()
    with pytest.raises(InvalidArgumentError, match=r"cannot be used as a file name|NUL"):
        await client.files.retrieve_content(hostile, output=inner)
    assert fake.api.requests == []
    assert names_in(tmp_path) == ["out"] and names_in(inner) == []


async def test_hostile_id_is_refused_for_the_default_output(
    fake: FakeFiles, client: AsyncTogether, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no output (./<id>.jsonl) an id like ../x is refused too."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match="cannot be used as a file name"):
        await client.files.retrieve_content("../escape")
    assert fake.api.requests == []


async def test_dash_output_is_refused_in_the_library(
    fake: FakeFiles, client: AsyncTogether
) -> None:
    """output="-" is refused clearly (stdout is for iter_bytes), not written as a file '-'."""
    file_id = fake.add_file(DATA)
    with pytest.raises(InvalidArgumentError, match="iter_bytes"):
        await client.files.retrieve_content(file_id, output="-")
    assert fake.api.requests == []


async def test_iter_bytes_gives_the_exact_bytes(fake: FakeFiles, client: AsyncTogether) -> None:
    """iter_bytes yields the stored bytes unchanged (CRLF, no final newline)."""
    content = b"a\r\nbb\r\n\x00\xff" * 1000
    file_id = fake.add_file(content)
    fake.drop_after = [len(content) // 2]
    assert b"".join([chunk async for chunk in client.files.iter_bytes(file_id)]) == content


async def test_iter_lines_streams_the_remote_lines(fake: FakeFiles, client: AsyncTogether) -> None:
    """iter_lines gives each line of the remote file, without its newline."""
    file_id = fake.add_file(b"a\nbb\r\nccc")
    assert [line async for line in client.files.iter_lines(file_id)] == [b"a", b"bb", b"ccc"]


async def test_iter_json_decodes_and_resumes(fake: FakeFiles, client: AsyncTogether) -> None:
    """iter_json decodes each line, across a dropped connection."""
    content = b"".join(b'{"n": %d}\n' % i for i in range(3000))
    file_id = fake.add_file(content)
    fake.drop_after = [len(content) // 2]
    values = [value async for value in client.files.iter_json(file_id)]
    assert [value["n"] for value in values] == list(range(3000))


async def test_iter_json_names_the_bad_line(fake: FakeFiles, client: AsyncTogether) -> None:
    """A line that is not JSON raises APIResponseValidationError naming file and line."""
    file_id = fake.add_file(b'{"a": 1}\n{"b": \n')
    with pytest.raises(APIResponseValidationError, match=rf"file {file_id}: line 2"):
        [value async for value in client.files.iter_json(file_id)]


async def test_breaking_out_early_releases_the_connection(
    serve: Serve, make_client: MakeClient
) -> None:
    """Leaving iter_lines after one line closes the response: the server sees the disconnect."""
    disconnected = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(100_000):
                await response.write(b'{"line": "' + b"x" * 1000 + b'"}\n')
        except (ConnectionError, asyncio.CancelledError):
            # aiohttp cancels a handler whose client went away, or the write fails.
            disconnected.set()
            raise
        return response

    app = web.Application()
    app.router.add_get("/v1/files/{id}/content", endless)
    client = make_client(await serve(app))
    async for _line in client.files.iter_lines("file-big"):
        break
    await asyncio.wait_for(disconnected.wait(), timeout=10)


class _BlockingFile(io.RawIOBase):
    """A seekable binary file whose reads wait until the test releases them."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.release = threading.Event()
        self.reads_in_flight = 0
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = 10 * 1024 * 1024 if whence == io.SEEK_END else offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        self.reads_in_flight += 1
        self.reading.set()
        self.release.wait(10)
        self.reads_in_flight -= 1
        return b"x" * 1024


async def test_body_stream_cancelled_mid_read_closes_after_the_read() -> None:
    """A body stream cancelled while a read runs in a thread (aiohttp drops the body writer
    when storage answers early) is closed after that read, never beside it: that raised
    "generator already executing" and could crash CPython 3.11."""
    blocking = _BlockingFile()
    source = await _UploadSource.open(blocking, "batch.jsonl")
    chunks = source.chunks()

    async def send_body() -> None:
        async for _chunk in chunks:
            pass

    sender = asyncio.create_task(send_body())
    await anyio.to_thread.run_sync(blocking.reading.wait, 10)
    sender.cancel()
    # Let the cancelled stream try to close while the read is still blocked.
    await asyncio.wait({sender}, timeout=0.3)
    assert blocking.reads_in_flight == 1
    blocking.release.set()
    with pytest.raises(asyncio.CancelledError):
        await sender
