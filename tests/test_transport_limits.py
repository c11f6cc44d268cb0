"""The transport's limits against misbehaving peers on loopback: inactivity timeouts that let a
slow but moving transfer finish and stop a stalled one (reads and request-body writes), the
optional overall deadline, the cap on answers read into memory (gzip bombs included), and what
a failed request leaves behind: no key in its frames, no presigned query string in its text."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import traceback
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import stamina
from http_fakes import SECRET_KEY, batch_lines, file_json, job_json
from raw_server import RawConnection, RawRequest, RawServer, http_response

from together_async import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncTogether,
    ClientConfig,
    InternalServerError,
    InvalidArgumentError,
    ResponseTooLargeError,
)
from together_async._config import DEFAULT_MAX_RESPONSE_BYTES

pytestmark = pytest.mark.usefixtures("fast_retries")

TESTS = Path(__file__).resolve().parent
JOB = json.dumps(job_json("batch-1")).encode()
CONTENT = batch_lines(200)
FILE_ID = "file-raw"
SIGNATURE = "secret-signature-0123456789"
JSON = {"Content-Type": "application/json"}


async def forever() -> None:
    """A peer that goes quiet: waits until the server shuts the connection down."""
    await asyncio.Event().wait()


@asynccontextmanager
async def raw_client(server: RawServer, **options: Any) -> AsyncIterator[AsyncTogether]:
    options.setdefault("api_key", SECRET_KEY)
    async with AsyncTogether(base_url=f"{server.url}/v1", **options) as client:
        yield client


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@cache
def gzip_bomb(size: int = 200 * 1024 * 1024) -> bytes:
    """A valid gzip stream of `size` zero bytes, about a thousandth of that long: one
    full-flushed block of compressed zeros repeated (each block is independent)."""
    block = bytes(1 << 20)
    assert size % len(block) == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    final_empty_block = b"\x03\x00"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return first + again * (size // len(block) - 1) + final_empty_block + trailer


def test_gzip_bomb_helper_is_a_valid_gzip_stream() -> None:
    """The bomb the tests use decompresses to exactly its size (so its refusal is ours)."""
    assert gzip.decompress(gzip_bomb(4 << 20)) == bytes(4 << 20)


# -- item 5: slow links work, stalled ones time out -----------------------------------------


async def test_trickling_answer_slower_than_the_timeout_in_all_succeeds() -> None:
    """A JSON answer sent a piece every 0.1 s for longer than the timeout in all is read:
    the timeout is for silence, not for the whole answer."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(200, headers=JSON, content_length=len(JOB)))
        await conn.trickle(JOB, chunk=max(1, len(JOB) // 8), interval=0.1)

    async with RawServer(script) as server, raw_client(server, timeout=0.4) as client:
        started = asyncio.get_running_loop().time()
        job = await client.batches.get_batch("batch-1", max_retries=0)
        assert asyncio.get_running_loop().time() - started > 0.4
    assert job.id == "batch-1"


async def test_trickling_download_slower_than_the_timeout_in_all_succeeds() -> None:
    """A file download trickled a piece every 0.1 s, longer than the timeout in all, is
    complete and needed one request."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        if request.path.endswith("/content"):
            await conn.write(http_response(200, content_length=len(CONTENT)))
            await conn.trickle(CONTENT, chunk=len(CONTENT) // 8 + 1, interval=0.1)
        else:
            body = json.dumps(file_json(FILE_ID, bytes=len(CONTENT))).encode()
            await conn.write(http_response(200, body, headers=JSON))

    async with RawServer(script) as server, raw_client(server, timeout=0.4) as client:
        chunks = [piece async for piece in client.files.iter_bytes(FILE_ID, max_retries=0)]
    assert b"".join(chunks) == CONTENT
    assert [request.path for request in server.requests] == [f"/v1/files/{FILE_ID}/content"]


async def test_answer_that_stops_mid_body_times_out() -> None:
    """A peer that sends half an answer and then nothing for the timeout gives
    APITimeoutError saying no data came."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(200, JOB[: len(JOB) // 2], content_length=len(JOB)))
        await forever()

    async with RawServer(script) as server, raw_client(server, timeout=0.3) as client:
        with pytest.raises(APITimeoutError, match=r"no data for 0\.3 s"):
            await client.batches.get_batch("batch-1", max_retries=0)


async def test_download_that_stops_mid_body_times_out() -> None:
    """A download whose peer stops sending (and sends nothing when resumed) ends in
    APITimeoutError instead of hanging."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        if "range" not in request.headers:
            await conn.write(http_response(200, CONTENT[:1000], content_length=len(CONTENT)))
        await forever()

    async with RawServer(script) as server, raw_client(server, timeout=0.3) as client:
        with pytest.raises(APITimeoutError):
            async for _ in client.files.iter_bytes(FILE_ID, max_retries=0):
                pass


@asynccontextmanager
async def storage(
    put: Any, *, receive_buffer: int | None = None, multipart: bool = False
) -> AsyncIterator[RawServer]:
    """An API whose POST /files redirects to a presigned PUT on the same server, answered by
    `put(request, conn)` with the body unread (with `multipart`, POST /files answers 404 and
    POST /files/upload goes to `put`). Preprocess reports the file whole."""
    sizes: dict[str, int] = {}

    async def script(request: RawRequest, conn: RawConnection) -> None:
        if request.method == "POST" and request.path == "/v1/files":
            await conn.reader.readexactly(int(request.headers["content-length"]))
            if multipart:
                await conn.write(http_response(404, b"{}", headers=JSON))
                return
            location = f"{server.url}/storage/{FILE_ID}?X-Amz-Signature={SIGNATURE}"
            headers = {"Location": location, "X-Together-File-Id": FILE_ID}
            await conn.write(http_response(302, headers=headers))
        elif request.method == "PUT" or request.path == "/v1/files/upload":
            sizes["put"] = await put(request, conn)
        else:
            size = sizes.get("put", 0)
            body = json.dumps(file_json(FILE_ID, bytes=size)).encode()
            await conn.write(http_response(200, body, headers=JSON))

    async with RawServer(script, read_bodies=False, receive_buffer=receive_buffer) as server:
        yield server


def big_file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * size)
    return path


async def stall(request: RawRequest, conn: RawConnection) -> int:
    await forever()
    return 0


async def test_upload_to_a_peer_that_stops_reading_times_out(tmp_path: Path) -> None:
    """A presigned PUT of 32 MB whose peer reads nothing ends in APITimeoutError once the
    body has not moved for the timeout (aiohttp has no write timeout of its own)."""
    path = big_file(tmp_path, 32 * 1024 * 1024)
    async with storage(stall) as server, raw_client(server, timeout=0.4) as client:
        with pytest.raises(APITimeoutError, match="took no part of the request body"):
            await client.files.upload(path, check=False, max_retries=0)


async def test_multipart_upload_to_a_peer_that_stops_reading_times_out(tmp_path: Path) -> None:
    """The multipart upload (POST /files/upload) of a file its peer does not read times out
    the same way."""
    path = big_file(tmp_path, 32 * 1024 * 1024)
    async with (
        storage(stall, multipart=True) as server,
        raw_client(server, timeout=0.4) as client,
    ):
        with pytest.raises(APITimeoutError, match="took no part of the request body"):
            await client.files.upload(path, check=False, max_retries=0)


@pytest.mark.parametrize("receive_buffer", [64 * 1024, None], ids=["small-buffer", "default"])
async def test_upload_to_a_slow_but_steady_reader_succeeds(
    tmp_path: Path, receive_buffer: int | None
) -> None:
    """A PUT that the peer reads 64 KiB every 20 ms (taking longer than the timeout in all)
    succeeds: each piece moves well within the timeout, and so does the tail the kernels
    hold (with a default buffer, most of the body is taken at once and read from there)."""
    size = 4 * 1024 * 1024

    async def slow_reader(request: RawRequest, conn: RawConnection) -> int:
        left = int(request.headers["content-length"])
        while left:
            left -= len(await conn.reader.readexactly(min(left, 64 * 1024)))
            await asyncio.sleep(0.02)
        await conn.write(http_response(200))
        return size

    path = big_file(tmp_path, size)
    async with (
        storage(slow_reader, receive_buffer=receive_buffer) as server,
        raw_client(server, timeout=0.4) as client,
    ):
        started = asyncio.get_running_loop().time()
        uploaded = await client.files.upload(path, check=False, max_retries=0)
        assert asyncio.get_running_loop().time() - started > 0.4
    assert uploaded.id == FILE_ID


async def test_deadline_ends_a_trickling_answer() -> None:
    """With `deadline`, an answer that keeps trickling (never silent for the timeout) ends in
    APITimeoutError at the deadline, and is not retried past it."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(200, headers=JSON, content_length=1_000_000))
        await conn.trickle(b" " * 10_000, chunk=1, interval=0.02)

    async with RawServer(script) as server, raw_client(server, deadline=0.5) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(APITimeoutError, match=r"deadline of 0\.5 s passed"):
            await client.batches.get_batch("batch-1")
        assert asyncio.get_running_loop().time() - started < 2.0
    assert len(server.requests) == 1


async def test_deadline_ends_a_trickling_download_across_resumes() -> None:
    """A download trickled so that every resume makes progress still ends at the deadline:
    its resumes share one deadline."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        if request.path.endswith("/content"):
            await conn.write(http_response(200, content_length=len(CONTENT)))
            await conn.trickle(CONTENT, chunk=10, interval=0.02)
        else:
            body = json.dumps(file_json(FILE_ID, bytes=len(CONTENT))).encode()
            await conn.write(http_response(200, body, headers=JSON))

    async with RawServer(script) as server, raw_client(server, deadline=0.5) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(APITimeoutError, match=r"deadline of 0\.5 s passed"):
            async for _ in client.files.iter_bytes(FILE_ID):
                pass
        assert asyncio.get_running_loop().time() - started < 2.0


async def test_deadline_skips_a_retry_wait_it_would_outlast() -> None:
    """A retry wait (here a 30 s Retry-After) that would end past the deadline is not waited
    for: the failure is raised at once, after one request."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(503, b"{}", headers={**JSON, "Retry-After": "30"}))

    with stamina.set_testing(False):
        async with RawServer(script) as server, raw_client(server, deadline=5) as client:
            started = asyncio.get_running_loop().time()
            with pytest.raises(InternalServerError):
                await client.batches.get_batch("batch-1")
            assert asyncio.get_running_loop().time() - started < 5
    assert len(server.requests) == 1


async def test_deadline_leaves_time_for_short_retries() -> None:
    """Within the deadline, retries go on as usual: two 503s, then the answer."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        if len(server.requests) < 3:
            await conn.write(http_response(503, b"{}", headers={**JSON, "Retry-After": "0"}))
        else:
            await conn.write(http_response(200, JOB, headers=JSON))

    async with RawServer(script) as server, raw_client(server, deadline=5) as client:
        job = await client.batches.get_batch("batch-1")
    assert job.id == "batch-1"
    assert len(server.requests) == 3


def test_no_deadline_and_an_inactivity_timeout_by_default() -> None:
    """By default there is no deadline (a long upload over a slow link may take what it
    needs) and answers are capped at 8 MiB."""
    config = ClientConfig.from_arguments("k", environ={})
    assert config.deadline is None
    assert config.timeout == 60.0
    assert config.max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES == 8 * 1024 * 1024


@pytest.mark.parametrize(
    "options",
    [
        {"deadline": 0},
        {"deadline": -1.0},
        {"deadline": float("inf")},
        {"deadline": "5"},
        {"max_response_bytes": 0},
        {"max_response_bytes": 1.5},
        {"max_response_bytes": True},
    ],
)
def test_bad_deadline_or_cap_is_rejected(options: dict[str, Any]) -> None:
    """A deadline that is not a positive number of seconds, or a cap that is not an int >= 1,
    is InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError):
        AsyncTogether("k", **options)


# -- item 6: bounded answers -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 500])
async def test_huge_content_length_is_refused_at_once(status: int) -> None:
    """An answer declaring 2,000,000,000 bytes is ResponseTooLargeError before its body is
    read (2xx and error answers alike), and is not retried."""
    sent_body = asyncio.Event()

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(status, b"{", headers=JSON, content_length=2_000_000_000))
        sent_body.set()
        await forever()

    async with RawServer(script) as server, raw_client(server, timeout=30) as client:
        with pytest.raises(ResponseTooLargeError, match="2000000000 bytes") as caught:
            await client.batches.get_batch("batch-1")
    assert caught.value.status_code == status
    assert caught.value.limit == DEFAULT_MAX_RESPONSE_BYTES
    assert len(server.requests) == 1


async def test_body_streaming_past_the_cap_is_stopped_at_the_cap() -> None:
    """A chunked answer with no length that keeps coming is stopped once it passes the cap;
    the connection is dropped, so the server's writes then fail."""
    write_failed = asyncio.Event()

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(
            http_response(
                200, headers={**JSON, "Transfer-Encoding": "chunked"}, content_length=False
            )
        )
        try:
            while True:
                await conn.write(chunk(b" " * 4096))
        except ConnectionError:
            write_failed.set()
            raise

    async with RawServer(script) as server, raw_client(server, max_response_bytes=100_000) as c:
        with pytest.raises(ResponseTooLargeError, match="more than max_response_bytes"):
            await c.batches.get_batch("batch-1", max_retries=0)
        await write_failed.wait()


async def test_answer_at_the_cap_is_read_and_one_byte_more_is_not() -> None:
    """The cap is inclusive: an answer of exactly max_response_bytes is read, one byte more
    (with no Content-Length to tell in advance) is refused."""
    body = JOB + b" " * (2000 - len(JOB))

    async def script(request: RawRequest, conn: RawConnection) -> None:
        payload = body if request.path.endswith("/fits") else body + b" "
        await conn.write(http_response(200, payload, headers=JSON, content_length=False))
        conn.close()

    async with RawServer(script) as server, raw_client(server, max_response_bytes=2000) as c:
        job = await c.batches.get_batch("fits", max_retries=0)
        with pytest.raises(ResponseTooLargeError):
            await c.batches.get_batch("too-long", max_retries=0)
    assert job.id == "batch-1"


@pytest.mark.parametrize("status", [200, 502])
async def test_gzip_bomb_is_stopped_at_the_cap(status: int) -> None:
    """A 200 KB gzip answer that decompresses to 200 MB is ResponseTooLargeError once the
    decoded bytes pass the cap, for 2xx and error answers alike."""
    bomb = gzip_bomb()

    async def script(request: RawRequest, conn: RawConnection) -> None:
        headers = {**JSON, "Content-Encoding": "gzip"}
        await conn.write(http_response(status, bomb, headers=headers))

    async with RawServer(script) as server, raw_client(server) as client:
        with pytest.raises(ResponseTooLargeError) as caught:
            await client.batches.get_batch("batch-1", max_retries=0)
    assert caught.value.status_code == status


async def test_downloads_are_not_capped() -> None:
    """File content streams to the caller whatever its size: the cap is only for answers
    read into memory."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(200, CONTENT))

    async with RawServer(script) as server, raw_client(server, max_response_bytes=1000) as c:
        chunks = [piece async for piece in c.files.iter_bytes(FILE_ID, max_retries=0)]
    assert b"".join(chunks) == CONTENT


RSS_CHILD = """
import asyncio, json, resource, sys
sys.path.insert(0, sys.argv[1])
from raw_server import RawServer, http_response
from test_transport_limits import JOB, JSON, gzip_bomb
from together_async import AsyncTogether, ResponseTooLargeError

bomb = gzip_bomb()

async def script(request, conn):
    if request.path.endswith("/bomb"):
        await conn.write(http_response(200, bomb, headers={**JSON, "Content-Encoding": "gzip"}))
    else:
        await conn.write(http_response(200, JOB, headers=JSON))

async def main():
    async with RawServer(script) as server:
        async with AsyncTogether("k", base_url=server.url + "/v1") as client:
            await client.batches.get_batch("warm-up")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                await client.batches.get_batch("bomb", max_retries=0)
            except ResponseTooLargeError:
                pass
            else:
                raise SystemExit("the bomb was accepted")
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))

asyncio.run(main())
"""


def test_gzip_bomb_does_not_grow_rss_past_the_cap() -> None:
    """Refusing a 200 MB gzip bomb raises the peak RSS of a fresh process by less than the
    8 MiB cap plus 16 MiB of slack (measured in a child, whose peak starts low)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    growth_mib = (figures["after_kib"] - figures["before_kib"]) / 1024
    assert growth_mib < 8 + 16, figures


# -- item 13: a failed request's leftovers --------------------------------------------------


def values_in(value: Any, depth: int = 0) -> Iterator[str]:
    """Every string in `value`, looking into dicts, lists, tuples and sets two levels deep."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif depth < 2 and isinstance(value, dict):
        for key, item in value.items():
            yield from values_in(key, depth + 1)
            yield from values_in(item, depth + 1)
    elif depth < 2 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from values_in(item, depth + 1)


def frames_of(exc: BaseException) -> Iterator[Any]:
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def chain_of(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@pytest.mark.parametrize("failure", ["refused", "status"])
async def test_failed_request_frames_hold_no_key(failure: str) -> None:
    """No local of any frame a failed request's exception went through holds the API key in
    a string, dict, list or tuple (a refused connection, and a 401 answer)."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(401, b'{"error": {"message": "no"}}', headers=JSON))

    async with RawServer(script) as server:
        base_url = f"{server.url}/v1"
        if failure == "refused":
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                base_url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
        async with AsyncTogether(SECRET_KEY, base_url=base_url) as client:
            with pytest.raises(APIError) as c:
                await client.batches.get_batch("batch-1", max_retries=0)
    leaks = [
        (frame.f_code.co_name, name)
        for exc in chain_of(c.value)
        for frame in frames_of(exc)
        if frame.f_code.co_filename.startswith(str(TESTS.parent / "together_async"))
        for name, value in frame.f_locals.items()
        if any(SECRET_KEY in text for text in values_in(value))
    ]
    assert leaks == []


async def signed_put_failure(kind: str, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> Any:
    """The exception of an upload whose presigned PUT (query `X-Amz-Signature=...`) is
    refused, reset or timed out."""

    async def reset(request: RawRequest, conn: RawConnection) -> int:
        conn.abort()
        return 0

    put = {"refused": stall, "reset": reset, "timeout": stall}[kind]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(CONTENT)
    caplog.set_level(logging.DEBUG)
    async with storage(put) as server:
        if kind == "refused":
            # The redirect points at a port nobody listens on.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                dead = probe.getsockname()[1]
            original = server._script

            async def redirect_to_dead(request: RawRequest, conn: RawConnection) -> None:
                if request.method == "POST" and request.path == "/v1/files":
                    await conn.reader.readexactly(int(request.headers["content-length"]))
                    location = (
                        f"http://127.0.0.1:{dead}/storage/{FILE_ID}?X-Amz-Signature={SIGNATURE}"
                    )
                    headers = {"Location": location, "X-Together-File-Id": FILE_ID}
                    await conn.write(http_response(302, headers=headers))
                else:
                    await original(request, conn)

            server._script = redirect_to_dead
        async with raw_client(server, timeout=0.3) as client:
            with pytest.raises(APIConnectionError) as caught:
                await client.files.upload(path, max_retries=1)
    return caught.value


@pytest.mark.parametrize("kind", ["refused", "reset", "timeout"])
async def test_presigned_signature_never_in_error_text_or_logs(
    kind: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A presigned PUT that fails (refused, reset, timed out) leaves its query string out of
    the error's str, repr and args, of every exception chained to it and of the log."""
    exc = await signed_put_failure(kind, caplog, tmp_path)
    texts = [str(exc), repr(exc), *map(str, exc.args)]
    texts += ["".join(traceback.format_exception(exc))]
    texts += [repr(linked) for linked in chain_of(exc)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_text or "") for record in caplog.records]
    assert [text for text in texts if SIGNATURE in text or "X-Amz" in text] == []
    assert "/storage/" in str(exc)  # the host and path are still named


async def test_error_answer_to_a_download_is_capped_too() -> None:
    """A download answered by an error status with a huge Content-Length is
    ResponseTooLargeError: only the file content itself streams uncapped."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(500, b"{", headers=JSON, content_length=2_000_000_000))
        await forever()

    async with RawServer(script) as server, raw_client(server) as client:
        with pytest.raises(ResponseTooLargeError) as caught:
            async for _ in client.files.iter_bytes(FILE_ID, max_retries=0):
                pass
    assert caught.value.status_code == 500


async def test_storage_error_echoing_the_signature_does_not_carry_it(tmp_path: Path) -> None:
    """A storage 403 whose body echoes the presigned query (as S3's SignatureDoesNotMatch
    does) gives an error whose text and body hold none of the query's values."""

    async def refuse(request: RawRequest, conn: RawConnection) -> int:
        await conn.reader.readexactly(int(request.headers["content-length"]))
        body = (
            "<Error><Code>SignatureDoesNotMatch</Code><Message>no</Message>"
            f"<SignatureProvided>{SIGNATURE}</SignatureProvided>"
            f"<CanonicalRequest>PUT /storage X-Amz-Signature={SIGNATURE}</CanonicalRequest>"
            "</Error>"
        ).encode()
        await conn.write(http_response(403, body, headers={"Content-Type": "application/xml"}))
        return 0

    path = tmp_path / "requests.jsonl"
    path.write_bytes(CONTENT)
    async with storage(refuse) as server, raw_client(server) as client:
        with pytest.raises(APIError) as caught:
            await client.files.upload(path, max_retries=0)
    exc = caught.value
    texts = [str(exc), repr(exc), *map(str, exc.args), repr(getattr(exc, "body", None))]
    assert [text for text in texts if SIGNATURE in text] == []
    assert "SignatureDoesNotMatch" in repr(getattr(exc, "body", None))


async def test_multipart_upload_to_a_slow_but_steady_reader_succeeds(tmp_path: Path) -> None:
    """The multipart upload (sent with a Content-Length) to a peer reading 64 KiB every
    20 ms, longer than the timeout in all, succeeds."""
    size = 4 * 1024 * 1024

    async def slow_reader(request: RawRequest, conn: RawConnection) -> int:
        left = int(request.headers["content-length"])
        while left:
            left -= len(await conn.reader.readexactly(min(left, 64 * 1024)))
            await asyncio.sleep(0.02)
        body = json.dumps(file_json(FILE_ID, bytes=size)).encode()
        await conn.write(http_response(200, body, headers=JSON))
        return size

    path = big_file(tmp_path, size)
    async with (
        storage(slow_reader, multipart=True, receive_buffer=64 * 1024) as server,
        raw_client(server, timeout=0.4) as client,
    ):
        started = asyncio.get_running_loop().time()
        uploaded = await client.files.upload(path, check=False, max_retries=0)
        assert asyncio.get_running_loop().time() - started > 0.4
    assert uploaded.id == FILE_ID
    assert "chunked" not in server.requests[-1].headers.get("transfer-encoding", "")
