"""The scripted raw server the misbehaving-peer tests are built on."""

from __future__ import annotations

import aiohttp
from raw_server import RawConnection, RawRequest, RawServer, http_response


async def test_raw_server_parses_a_request_and_sends_the_scripted_bytes() -> None:
    """A request's method, path, headers and body reach the script; its bytes reach the client."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(201, request.body[::-1], headers={"X-Path": request.path}))

    async with RawServer(script) as server, aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/a/b?q=1", data=b"hello") as response:
            assert response.status == 201
            assert response.headers["X-Path"] == "/a/b"
            assert await response.read() == b"olleh"
    assert server.requests[0].target == "/a/b?q=1"
    assert server.requests[0].method == "POST"


async def test_raw_server_can_lie_about_the_length() -> None:
    """A Content-Length longer than the body, then a close, is a payload error for aiohttp."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(200, b"short", content_length=100))
        conn.close()

    async with RawServer(script) as server, aiohttp.ClientSession() as session:
        async with session.get(server.url) as response:
            try:
                await response.read()
            except aiohttp.ClientPayloadError:
                pass
            else:
                raise AssertionError("a short body was accepted")
