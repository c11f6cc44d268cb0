"""The emulator's files routes over real loopback HTTP: the presigned upload flow, the storage
port, multipart upload, list/retrieve/delete, content with Range, size caps and path safety."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import MakeEmulator
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_file
from yarl import URL

from together_async.emulator import Emulator

pytestmark = pytest.mark.timeout(60)


async def test_post_files_redirects_to_the_storage_port(emulator: Emulator, api: RawAPI) -> None:
    """POST /files answers 302 with a Location on the other port and X-Together-File-Id."""
    response = await api.start_upload(b"{}\n")
    assert response.status == 302
    location = URL(response.headers["Location"])
    assert location.port == emulator.storage_port != emulator.port
    assert response.headers["X-Together-File-Id"].startswith("file-")


async def test_presigned_flow_stores_the_file(api: RawAPI) -> None:
    """POST /files, PUT the bytes, POST preprocess: the FileResponse has the real keys."""
    data = chat_file(3)
    uploaded = await api.upload(data, file_name="my batch.jsonl")
    assert uploaded["object"] == "file"
    assert uploaded["bytes"] == len(data)
    assert uploaded["filename"] == "my batch.jsonl"
    assert uploaded["purpose"] == "batch-api"
    assert uploaded["FileType"] == "jsonl"
    assert uploaded["Processed"] is True
    assert isinstance(uploaded["created_at"], int)
    assert await api.content(uploaded["id"]) == data


async def test_storage_put_needs_no_authorization(emulator: Emulator, api: RawAPI) -> None:
    """The PUT carries no Authorization header and is accepted; the stats show none was sent."""
    response = await api.start_upload(b"{}\n")
    put = await api.put(response.headers["Location"], b"{}\n")
    assert put.status == 200
    assert emulator.stats.storage_authorization_headers == 0
    assert emulator.stats["PUT", "/upload/{token}"] == 1


async def test_storage_put_with_an_authorization_header_is_counted(
    emulator: Emulator, api: RawAPI
) -> None:
    """A client that leaks its key to storage is visible in the stats (and not refused)."""
    response = await api.start_upload(b"{}\n")
    put = await api.put(
        response.headers["Location"], b"{}\n", Authorization=f"Bearer {EMULATOR_KEY}"
    )
    assert put.status == 200
    assert emulator.stats.storage_authorization_headers == 1


async def test_storage_put_with_an_unknown_token_is_refused(
    emulator: Emulator, api: RawAPI
) -> None:
    """A made-up upload URL gets 403."""
    put = await api.put(f"{emulator.storage_url}/upload/not-a-real-token", b"{}\n")
    assert put.status == 403


async def test_upload_url_stops_working_after_preprocess(api: RawAPI) -> None:
    """Once the file is processed, its upload URL is dead (403)."""
    response = await api.start_upload(b"{}\n")
    location = response.headers["Location"]
    assert (await api.put(location, b"{}\n")).status == 200
    await api.json("POST", f"/files/{response.headers['X-Together-File-Id']}/preprocess")
    assert (await api.put(location, b"{}\n")).status == 403


async def test_second_put_before_preprocess_replaces_the_body(api: RawAPI) -> None:
    """A retried PUT (same URL) is accepted and its bytes win, as with object storage."""
    response = await api.start_upload(b"", checksum="")
    location = response.headers["Location"]
    assert (await api.put(location, b"first\n")).status == 200
    assert (await api.put(location, b"second\n")).status == 200
    file_id = response.headers["X-Together-File-Id"]
    await api.json("POST", f"/files/{file_id}/preprocess")
    assert await api.content(file_id) == b"second\n"


async def test_put_that_does_not_match_the_checksum_is_refused(api: RawAPI) -> None:
    """The sha256 sent with POST /files is checked against the PUT body (400 BadDigest)."""
    response = await api.start_upload(b"the announced bytes\n")
    put = await api.put(response.headers["Location"], b"other bytes\n")
    assert put.status == 400


async def test_put_without_content_length_is_refused(api: RawAPI) -> None:
    """A chunked PUT (no Content-Length) gets 411."""
    response = await api.start_upload(b"{}\n")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}\n"

    async with (
        aiohttp.ClientSession() as storage,
        storage.put(response.headers["Location"], data=chunks()) as put,
    ):
        assert put.status == 411


async def test_put_over_the_size_cap_gets_413(make_emulator: MakeEmulator) -> None:
    """A body larger than max_upload_bytes is refused with 413 and nothing is stored."""
    emulator = await make_emulator(max_upload_bytes=1000)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as session:
        api = RawAPI(session, emulator.base_url)
        data = b"x" * 1001
        response = await api.start_upload(data)
        put = await api.put(response.headers["Location"], data)
        assert put.status == 413
        file_id = response.headers["X-Together-File-Id"]
        status, _ = await api.call("POST", f"/files/{file_id}/preprocess")
        assert status == 400
    assert list((emulator.data_dir / "files").iterdir()) == []
    assert list((emulator.data_dir / "incoming").iterdir()) == []


async def test_preprocess_before_the_put_is_refused(api: RawAPI) -> None:
    """Preprocessing a file whose bytes never arrived is a 400 in the files error shape."""
    response = await api.start_upload(b"{}\n")
    status, body = await api.call(
        "POST", f"/files/{response.headers['X-Together-File-Id']}/preprocess"
    )
    assert status == 400
    assert isinstance(body["error"]["message"], str)


async def test_same_checksum_and_purpose_answers_409_with_the_file_id(api: RawAPI) -> None:
    """Uploading identical bytes again answers 409 {"file_id": <the first file>}."""
    data = chat_file(2)
    first = await api.upload(data)
    again = await api.start_upload(data)
    assert again.status == 409
    status, body = await api.call(
        "POST",
        "/files",
        data={
            "purpose": "batch-api",
            "file_name": "x.jsonl",
            "file_type": "jsonl",
            "checksum": hashlib.sha256(data).hexdigest(),
        },
        allow_redirects=False,
    )
    assert (status, body["file_id"]) == (409, first["id"])


async def test_same_checksum_with_another_purpose_is_a_new_file(api: RawAPI) -> None:
    """The 409 needs the same purpose: the same bytes as fine-tune data are a new file."""
    data = chat_file(2)
    await api.upload(data)
    response = await api.start_upload(data, purpose="fine-tune")
    assert response.status == 302


async def test_unknown_purpose_is_refused(api: RawAPI) -> None:
    """POST /files with a purpose the API does not know is a 400."""
    response = await api.start_upload(b"{}\n", purpose="homework")
    assert response.status == 400


async def test_multipart_upload_streams_the_file(api: RawAPI) -> None:
    """POST /files/upload takes the form fields and the file in one multipart request."""
    data = chat_file(5)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch-api")
    form.add_field("file_name", "multi.jsonl")
    form.add_field("file", data, filename="multi.jsonl", content_type="application/jsonl")
    uploaded = await api.json("POST", "/files/upload", data=form)
    assert uploaded["bytes"] == len(data)
    assert uploaded["filename"] == "multi.jsonl"
    assert uploaded["Processed"] is True
    assert await api.content(uploaded["id"]) == data


async def test_multipart_upload_over_the_cap_gets_413(make_emulator: MakeEmulator) -> None:
    """A multipart file part past max_upload_bytes is refused with 413."""
    emulator = await make_emulator(max_upload_bytes=1000)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch-api")
    form.add_field("file_name", "big.jsonl")
    form.add_field("file", b"x" * 5000, filename="big.jsonl")
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as session:
        status, body = await RawAPI(session, emulator.base_url).call(
            "POST", "/files/upload", data=form
        )
    assert status == 413
    assert "limit" in body["error"]["message"]


async def test_list_shows_uploaded_files_only(api: RawAPI) -> None:
    """GET /files lists files with content, not ones still waiting for their PUT."""
    uploaded = await api.upload(chat_file(1))
    await api.start_upload(b"pending\n")
    listing = await api.json("GET", "/files")
    assert [item["id"] for item in listing["data"]] == [uploaded["id"]]


async def test_retrieve_returns_the_file(api: RawAPI) -> None:
    """GET /files/{id} gives the same FileResponse as the upload."""
    uploaded = await api.upload(chat_file(1))
    assert await api.json("GET", f"/files/{uploaded['id']}") == uploaded


async def test_delete_removes_the_file_and_its_body(emulator: Emulator, api: RawAPI) -> None:
    """DELETE answers {"id", "deleted": true}; afterwards the file is 404 and its bytes gone."""
    uploaded = await api.upload(chat_file(1))
    answer = await api.json("DELETE", f"/files/{uploaded['id']}")
    assert answer == {"id": uploaded["id"], "deleted": True}
    status, body = await api.call("GET", f"/files/{uploaded['id']}")
    assert status == 404
    assert isinstance(body["error"]["message"], str)
    assert not (emulator.data_dir / "files" / uploaded["id"]).exists()


async def test_unknown_file_is_404(api: RawAPI) -> None:
    """Retrieve, content and delete of an unknown id all answer 404."""
    missing = "file-00000000-0000-4000-8000-000000000000"
    for method, path in (
        ("GET", f"/files/{missing}"),
        ("GET", f"/files/{missing}/content"),
        ("DELETE", f"/files/{missing}"),
    ):
        status, _ = await api.call(method, path)
        assert status == 404, (method, path)


async def test_range_request_returns_the_tail(api: RawAPI) -> None:
    """`Range: bytes=N-` answers 206 with Content-Range and the bytes from N on."""
    data = chat_file(50)
    file_id = (await api.upload(data))["id"]
    async with api.session.get(
        f"{api.base_url}/files/{file_id}/content", headers={"Range": "bytes=100-"}
    ) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert await response.read() == data[100:]


async def test_bounded_range_returns_the_slice(api: RawAPI) -> None:
    """`Range: bytes=N-M` answers exactly bytes N..M."""
    data = chat_file(5)
    file_id = (await api.upload(data))["id"]
    assert await api.content(file_id, Range="bytes=3-9") == data[3:10]


async def test_range_past_the_end_is_416(api: RawAPI) -> None:
    """A Range starting at or after the end answers 416 with `Content-Range: bytes */size`."""
    data = chat_file(1)
    file_id = (await api.upload(data))["id"]
    async with api.session.get(
        f"{api.base_url}/files/{file_id}/content", headers={"Range": f"bytes={len(data)}-"}
    ) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_content_of_a_large_file_streams_in_full(api: RawAPI) -> None:
    """A file of several MiB comes back byte for byte (read from disk in chunks)."""
    data = chat_file(40_000)
    assert len(data) > 3 * 1024 * 1024
    file_id = (await api.upload(data))["id"]
    assert hashlib.sha256(await api.content(file_id)).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    "file_id",
    [
        "..%2F..%2Femulator.sqlite3",
        "%2E%2E",
        "file-..",
        "file-00000000-0000-4000-8000-00000000000/",
    ],
)
async def test_ids_that_could_escape_the_data_dir_are_404(api: RawAPI, file_id: str) -> None:
    """Ids that are not the emulator's own are refused before any path is built."""
    async with api.session.get(
        URL(f"{api.base_url}/files/{file_id}/content", encoded=True)
    ) as response:
        assert response.status == 404


async def test_file_name_never_becomes_a_path(emulator: Emulator, api: RawAPI) -> None:
    """A hostile file_name is kept as metadata only; the body is stored under the file id."""
    uploaded = await api.upload(b"{}\n", file_name="../../../../tmp/evil.jsonl")
    assert uploaded["filename"] == "../../../../tmp/evil.jsonl"
    stored = sorted(path.name for path in (emulator.data_dir / "files").iterdir())
    assert stored == [uploaded["id"]]
