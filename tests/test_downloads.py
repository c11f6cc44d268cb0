"""Downloads are verified: complete only at the length the server declared, against raw servers
that cut bodies short, drop after the last byte, answer 416 at the end or 206 unasked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from http_fakes import SECRET_KEY, batch_lines, file_json
from raw_server import RawConnection, RawRequest, RawServer, http_response

from together_async import APIConnectionError, APIResponseValidationError, AsyncTogether

pytestmark = pytest.mark.usefixtures("fast_retries")

CONTENT = batch_lines(400)
FILE_ID = "file-raw"
CONTENT_PATH = f"/v1/files/{FILE_ID}/content"
Answer = Callable[[RawRequest, RawConnection, int], Awaitable[None]]


def range_start(request: RawRequest) -> int:
    """Where a request's `Range: bytes=N-` starts (0 without one)."""
    value = request.headers.get("range")
    return int(value.removeprefix("bytes=").rstrip("-")) if value else 0


def chunked(body: bytes) -> bytes:
    """`body` as one chunk of a chunked body, without the terminating zero-length chunk."""
    return b"%x\r\n%s\r\n" % (len(body), body)


@asynccontextmanager
async def raw_files(
    answer: Answer, *, file_bytes: int | None = len(CONTENT)
) -> AsyncIterator[tuple[RawServer, AsyncTogether]]:
    """A raw server whose content route is `answer(request, conn, n)` (n: the content request's
    number, from 0) and whose file object reports `file_bytes`; and a client for it."""
    content_requests = 0

    async def script(request: RawRequest, conn: RawConnection) -> None:
        nonlocal content_requests
        if request.path == CONTENT_PATH:
            content_requests += 1
            await answer(request, conn, content_requests - 1)
            return
        body = json.dumps(file_json(FILE_ID, bytes=file_bytes)).encode()
        await conn.write(http_response(200, body, headers={"Content-Type": "application/json"}))

    async with RawServer(script) as server:
        async with AsyncTogether(api_key=SECRET_KEY, base_url=f"{server.url}/v1") as client:
            yield server, client


def names_in(directory: Path) -> list[str]:
    """The sorted names in a directory (a plain function: blocking is fine in a test helper)."""
    return sorted(path.name for path in directory.iterdir())


def paths(server: RawServer) -> list[str]:
    return [
        f"{request.method} {request.path} {request.headers.get('range', '')}".strip()
        for request in server.requests
    ]


async def whole_rest(request: RawRequest, conn: RawConnection) -> None:
    """A correct 206 from the requested start to the end."""
    start = range_start(request)
    headers = {"Content-Range": f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"}
    await conn.write(http_response(206, CONTENT[start:], headers=headers))


async def test_close_delimited_body_cut_short_is_resumed(tmp_path: Path) -> None:
    """A body with no length that ends early (the connection closes) is measured against the
    file's bytes and resumed with Range, not accepted as the whole file."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        if n == 0:
            await conn.write(http_response(200, CONTENT[:1000], content_length=False))
            conn.close()
        else:
            await whole_rest(request, conn)

    async with raw_files(answer) as (server, client):
        downloaded = await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == CONTENT and downloaded.bytes == len(CONTENT)
    assert paths(server) == [
        f"GET {CONTENT_PATH}",
        f"GET /v1/files/{FILE_ID}",
        f"GET {CONTENT_PATH} bytes=1000-",
    ]


async def test_content_length_is_trusted_without_asking_for_the_file(tmp_path: Path) -> None:
    """A 200 with Content-Length that arrives whole needs no other request."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        await conn.write(http_response(200, CONTENT))

    async with raw_files(answer) as (server, client):
        await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")
    assert paths(server) == [f"GET {CONTENT_PATH}"]


async def test_close_delimited_body_that_stays_short_fails(tmp_path: Path) -> None:
    """A server that keeps ending the body early (no progress) gives APIConnectionError naming
    the byte reached and the size declared, and leaves no file."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        if n == 0:
            await conn.write(http_response(200, CONTENT[:1000], content_length=False))
        else:
            start = range_start(request)
            headers = {"Content-Range": f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"}
            await conn.write(http_response(206, b"", headers=headers, content_length=False))
        conn.close()

    async with raw_files(answer) as (_server, client):
        with pytest.raises(APIConnectionError, match=rf"byte 1000 of {len(CONTENT)}"):
            await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")
    assert names_in(tmp_path) == []


async def test_drop_after_the_last_byte_is_not_a_failure(tmp_path: Path) -> None:
    """A chunked body whose connection drops after every byte arrived, before the final chunk,
    is complete once the file object's size matches: no Range request follows."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        await conn.write(head + chunked(CONTENT))
        conn.abort()

    async with raw_files(answer) as (server, client):
        lines = [line async for line in client.files.iter_lines(FILE_ID)]
    assert len(lines) == 400
    assert paths(server) == [f"GET {CONTENT_PATH}", f"GET /v1/files/{FILE_ID}"]


async def test_416_at_the_end_means_done(tmp_path: Path) -> None:
    """A drop with no length known anywhere (not even the file object's bytes) is resumed; a
    416 saying the file has exactly the bytes on disk (`bytes */N`) completes the download."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        if n == 0:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            await conn.write(head + chunked(CONTENT))
            conn.abort()
        else:
            headers = {"Content-Range": f"bytes */{len(CONTENT)}"}
            await conn.write(http_response(416, b"", headers=headers))

    async with raw_files(answer, file_bytes=None) as (server, client):
        downloaded = await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")
    assert downloaded.bytes == len(CONTENT)
    assert (tmp_path / "out").read_bytes() == CONTENT
    assert paths(server) == [
        f"GET {CONTENT_PATH}",
        f"GET /v1/files/{FILE_ID}",
        f"GET {CONTENT_PATH} bytes={len(CONTENT)}-",
    ]


async def test_416_before_the_end_is_an_error(tmp_path: Path) -> None:
    """A 416 to a Range that starts before the declared end is APIResponseValidationError."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        if n == 0:
            await conn.write(http_response(200, CONTENT[:1000], content_length=False))
            conn.close()
        else:
            await conn.write(http_response(416, b""))

    async with raw_files(answer) as (_server, client):
        with pytest.raises(APIResponseValidationError, match="416"):
            await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")


async def test_206_to_a_request_without_range_is_refused(tmp_path: Path) -> None:
    """A 206 to the first request (no Range sent) is APIResponseValidationError, even when its
    Content-Range covers the whole file."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        await whole_rest(request, conn)

    async with raw_files(answer) as (_server, client):
        with pytest.raises(APIResponseValidationError, match="206"):
            await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")
    assert names_in(tmp_path) == []


async def test_more_bytes_than_declared_is_refused(tmp_path: Path) -> None:
    """A close-delimited body longer than the file object's size is refused."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        await conn.write(http_response(200, CONTENT + b"extra\n", content_length=False))
        conn.close()

    async with raw_files(answer) as (_server, client):
        with pytest.raises(APIResponseValidationError, match=f"declared {len(CONTENT)}"):
            await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")


async def test_file_that_changes_size_mid_download_is_refused(tmp_path: Path) -> None:
    """A resumed 206 whose total differs from the first answer's length is refused."""

    async def answer(request: RawRequest, conn: RawConnection, n: int) -> None:
        if n == 0:
            await conn.write(http_response(200, CONTENT[:1000], content_length=len(CONTENT)))
            conn.close()
        else:
            start = range_start(request)
            headers = {"Content-Range": f"bytes {start}-{len(CONTENT)}/{len(CONTENT) + 1}"}
            await conn.write(http_response(206, CONTENT[start:] + b"\n", headers=headers))

    async with raw_files(answer) as (_server, client):
        with pytest.raises(APIResponseValidationError, match="changed during the download"):
            await client.files.retrieve_content(FILE_ID, output=tmp_path / "out")
