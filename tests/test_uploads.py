"""Uploads are verified: the file the API reports after the upload has the bytes that were
sent, and the bytes sent are the bytes that were checked (a file edited or cut short between
the check and the PUT is caught, promptly)."""

from __future__ import annotations

import io
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from http_fakes import FakeFiles, batch_lines

from together_async import APIResponseValidationError, AsyncTogether, TogetherError
from together_async.emulator import Emulator

pytestmark = pytest.mark.usefixtures("fast_retries")

Serve = Callable[[web.Application], Awaitable[TestServer]]
MakeClient = Callable[..., AsyncTogether]
DATA = batch_lines(50)


class LossyFiles(FakeFiles):
    """FakeFiles whose storage answers 200 but keeps only the first `keep` bytes of the next
    `lossy_puts` uploads, and whose POST /files runs `on_create` (after the client's check,
    before its PUT)."""

    def __init__(self) -> None:
        super().__init__()
        self.lossy_puts = 0
        self.keep = 0
        self.on_create: Callable[[], None] | None = None

    async def _create(self, request: web.Request) -> web.StreamResponse:
        if self.on_create is not None:
            self.on_create()
        return await super()._create(request)

    async def _put(self, request: web.Request) -> web.StreamResponse:
        response = await super()._put(request)
        file_id = request.path.rsplit("/", 1)[-1]
        if self.lossy_puts > 0 and file_id in self.files:
            self.lossy_puts -= 1
            self.contents[file_id] = self.contents[file_id][: self.keep]
            self.files[file_id]["bytes"] = len(self.contents[file_id])
        return response

    async def _multipart_upload(self, request: web.Request) -> web.StreamResponse:
        response = await super()._multipart_upload(request)
        if self.lossy_puts > 0:
            self.lossy_puts -= 1
            file_id = f"file-{self._next_id}"
            self.files[file_id]["bytes"] = self.keep
            return web.json_response(self.files[file_id])
        return response


@pytest.fixture
async def fake(serve: Serve) -> LossyFiles:
    """A lossy files API and its storage host, both running."""
    fake = LossyFiles()
    storage = await serve(fake.storage_app())
    fake.storage_url = str(storage.make_url("")).rstrip("/")
    fake.api_server = await serve(fake.api_app())
    return fake


@pytest.fixture
def batch_file(tmp_path: Path) -> Path:
    """A valid 50-line batch input file on disk."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(DATA)
    return path


def puts(fake: FakeFiles) -> int:
    return sum(seen.method == "PUT" for seen in fake.storage.requests)


async def test_storage_that_kept_nothing_is_put_again(
    fake: LossyFiles, make_client: MakeClient
) -> None:
    """A storage that answered 200 and stored nothing is found out from the file the API
    reports, and the PUT is sent again; the upload then succeeds with every byte."""
    fake.lossy_puts = 1
    client = make_client(fake.api_server)
    uploaded = await client.files.upload(DATA)
    assert uploaded.bytes == len(DATA) and fake.contents[uploaded.id] == DATA
    assert puts(fake) == 2


async def test_storage_that_keeps_a_truncated_copy_is_a_clear_error(
    fake: LossyFiles, make_client: MakeClient
) -> None:
    """A storage that keeps a truncated copy every time gives APIResponseValidationError naming
    the file and both sizes, after max_retries + 1 PUTs; never a FileObject."""
    fake.lossy_puts = 100
    fake.keep = 10
    client = make_client(fake.api_server, max_retries=2)
    with pytest.raises(APIResponseValidationError, match=rf"file-1 holds 10 of its {len(DATA)}"):
        await client.files.upload(DATA)
    assert puts(fake) == 3


async def test_multipart_upload_that_kept_less_is_a_clear_error(
    fake: LossyFiles, make_client: MakeClient
) -> None:
    """The multipart fallback's answer is checked too (not retried: each POST makes a file)."""
    fake.upload_mode = "missing"
    fake.lossy_puts = 1
    client = make_client(fake.api_server)
    with pytest.raises(APIResponseValidationError, match=rf"of 0 bytes, not {len(DATA)}"):
        await client.files.upload(DATA)


async def test_file_truncated_after_the_check_is_not_uploaded(
    fake: LossyFiles, make_client: MakeClient, batch_file: Path
) -> None:
    """A file cut short between the check and the PUT raises a TogetherError naming it at
    once (the body stops; the storage is not left waiting for the promised length), and is
    not sent again."""
    fake.on_create = lambda: batch_file.write_bytes(DATA[:100])
    client = make_client(fake.api_server, max_retries=3)
    with anyio.fail_after(10):
        with pytest.raises(TogetherError, match=r"requests.jsonl changed after it was checked"):
            await client.files.upload(batch_file)
    assert fake.contents["file-1"] == b"" and "preprocess" not in str(fake.api.paths())
    assert puts(fake) <= 1


async def test_file_edited_after_the_check_is_not_uploaded(
    fake: LossyFiles, make_client: MakeClient, batch_file: Path
) -> None:
    """A file edited in place (same size) between the check and the PUT is caught by the
    sha256 of what is streamed, before its last chunk is sent: storage never gets a whole
    body that was not the one checked."""
    edited = DATA.replace(b'"hi 7"', b'"HI 7"')
    fake.on_create = lambda: batch_file.write_bytes(edited)
    client = make_client(fake.api_server)
    with pytest.raises(TogetherError, match="its content is not the content that was checked"):
        await client.files.upload(batch_file)
    assert fake.storage.requests == [] and fake.contents["file-1"] == b""


async def test_file_grown_after_the_check_uploads_the_checked_bytes(
    fake: LossyFiles, make_client: MakeClient, batch_file: Path
) -> None:
    """Bytes appended after the check are not sent: the upload is exactly what was checked."""
    fake.on_create = lambda: batch_file.write_bytes(DATA + b"not json\n")
    client = make_client(fake.api_server)
    uploaded = await client.files.upload(batch_file)
    assert fake.contents[uploaded.id] == DATA


# ---- a cancelled upload of a non-seekable stream leaves no spool ---------------------------


class Stream(io.RawIOBase):
    """A non-seekable binary stream (a pipe, say) whose second read waits for `release`."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.first_read = threading.Event()
        self.release = threading.Event()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        if self.first_read.is_set():
            self.release.wait(10)
        chunk = self._data.read(size)
        self.first_read.set()
        return chunk


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR for this test: where a non-seekable upload is spooled."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def names_in(directory: Path) -> list[str]:
    """The sorted names in a directory (a plain function: blocking is fine in a test helper)."""
    return sorted(path.name for path in directory.iterdir())


async def test_upload_cancelled_while_sending_removes_its_spool(
    serve: Serve, make_client: MakeClient, spool_dir: Path
) -> None:
    """A non-seekable stream is spooled to TMPDIR; cancelling the upload while the API has not
    answered removes the spool."""
    arrived = anyio.Event()
    spooled_then: list[list[str]] = []

    async def stall(request: web.Request) -> web.StreamResponse:
        await request.read()
        spooled_then.append(names_in(spool_dir))
        arrived.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v1/files", stall)
    client = make_client(await serve(app))
    stream = Stream(DATA)
    stream.release.set()
    async with anyio.create_task_group() as group:
        group.start_soon(client.files.upload, stream)
        await arrived.wait()
        group.cancel_scope.cancel()
    assert len(spooled_then[0]) == 1 and spooled_then[0][0].startswith("together-upload-")
    assert names_in(spool_dir) == []


async def test_upload_cancelled_while_spooling_removes_its_spool(
    fake: LossyFiles, make_client: MakeClient, spool_dir: Path
) -> None:
    """Cancelling while the stream is still being copied to TMPDIR stops the copy and removes
    the partial spool; nothing is sent."""
    client = make_client(fake.api_server)
    stream = Stream(batch_lines(30_000))
    async with anyio.create_task_group() as group:
        group.start_soon(client.files.upload, stream)
        await anyio.to_thread.run_sync(stream.first_read.wait, 10)
        spooling = names_in(spool_dir)
        group.cancel_scope.cancel()
        stream.release.set()
    assert len(spooling) == 1
    assert names_in(spool_dir) == []
    assert fake.api.requests == []


async def test_on_file_id_is_awaited_before_the_bytes_are_sent(emulator: Emulator) -> None:
    """upload(on_file_id=...) is awaited with the API's id for the file before its PUT, so a
    process killed mid-upload leaves a record of the incomplete file."""
    seen: list[tuple[str, int]] = []

    async def remember(file_id: str) -> None:
        seen.append((file_id, emulator.stats["PUT", "/upload/{token}"]))

    async with AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url) as client:
        uploaded = await client.files.upload(DATA, on_file_id=remember)
    assert seen == [(uploaded.id, 0)]
    assert emulator.stats["PUT", "/upload/{token}"] == 1


def lying_api(answer: str) -> web.Application:
    """An API whose POST /files names a file that cannot be the one sent: a 409 pointing at
    a 5-byte file, or a 200 file object of 3 bytes with no upload step."""

    async def create(request: web.Request) -> web.Response:
        await request.read()
        if answer == "409":
            return web.json_response({"file_id": "file-other"}, status=409)
        return web.json_response({"id": "file-short", "object": "file", "bytes": 3})

    async def retrieve(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "object": "file", "bytes": 5})

    app = web.Application()
    app.router.add_post("/v1/files", create)
    app.router.add_get("/v1/files/{id}", retrieve)
    return app


@pytest.mark.parametrize("answer", ["409", "200"])
async def test_an_answer_naming_a_file_of_another_size_is_refused(
    serve: Serve, make_client: MakeClient, answer: str
) -> None:
    """A 409 "already exists" naming a file of another size, or a file object answered with
    no upload step whose size differs, is APIResponseValidationError, not a success."""
    client = make_client(await serve(lying_api(answer)))
    with pytest.raises(APIResponseValidationError, match=f"{len(DATA):,}"):
        await client.files.upload(DATA)
