"""A raw asyncio HTTP/1.1 server scripted per test, for peers that misbehave in ways aiohttp's
server will not: truncated or trickled bodies, lying lengths, stalls, odd redirects.

A test passes a coroutine `script(request, conn)` that answers each request by writing bytes
itself; `RawServer` parses requests (Content-Length or chunked bodies) and counts them.

    async def script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\nshort")
        conn.close()

    async with RawServer(script) as server:
        client = AsyncTogether("key", base_url=server.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType

import attrs

__all__ = ["RawConnection", "RawRequest", "RawServer", "http_response"]


@attrs.frozen
class RawRequest:
    """One parsed request: method, target (path and query), lower-case headers and body."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class RawConnection:
    """The connection a request came on: write raw bytes, trickle, stall or close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, data: bytes, *, chunk: int, interval: float) -> None:
        """Send `data` `chunk` bytes at a time, `interval` seconds apart (a slow link)."""
        for start in range(0, len(data), chunk):
            await self.write(data[start : start + chunk])
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the connection (after whatever was written)."""
        self.closed = True
        self.writer.close()

    def abort(self) -> None:
        """Reset the connection at once (RST, nothing more flushed)."""
        self.closed = True
        transport = self.writer.transport
        transport.abort()


Script = Callable[[RawRequest, RawConnection], Awaitable[None]]


def http_response(
    status: int,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    reason: str = "X",
    content_length: int | bool | None = True,
) -> bytes:
    """The bytes of an answer. `content_length=True` sends the true length, an int sends that
    (a lie, if it differs), False/None sends none (the body then ends at close)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if content_length is True:
        lines.append(f"Content-Length: {len(body)}")
    elif isinstance(content_length, int) and content_length is not False:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_request(reader: asyncio.StreamReader, *, read_body: bool) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = b""
    try:
        if not read_body:
            pass  # the script reads (or refuses to read) the body from conn.reader itself
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return RawRequest(method=method, target=target, headers=headers, body=body)


class RawServer:
    """Serves `script` on 127.0.0.1 (a fresh port) until the `async with` block ends.

    `read_bodies=False` hands the script the request with its body unread (a peer that stops
    reading an upload reads nothing from `conn.reader`). `receive_buffer` sets SO_RCVBUF on
    the listening socket (inherited by each connection): a small one makes a slow reader
    hold the sender back at once, instead of after megabytes of loopback buffering."""

    def __init__(
        self, script: Script, *, read_bodies: bool = True, receive_buffer: int | None = None
    ) -> None:
        self._script = script
        self._read_bodies = read_bodies
        self._receive_buffer = receive_buffer
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.requests: list[RawRequest] = []
        self.connections = 0
        self.port = 0

    @property
    def url(self) -> str:
        """The server's root, e.g. `http://127.0.0.1:PORT`."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        if self._receive_buffer is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        else:
            # Set before listen(): the window scale is agreed at the handshake.
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
            listener.bind(("127.0.0.1", 0))
            self._server = await asyncio.start_server(self._serve, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        conn = RawConnection(reader, writer)
        try:
            while not conn.closed:
                request = await _read_request(reader, read_body=self._read_bodies)
                if request is None:
                    break
                self.requests.append(request)
                await self._script(request, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            if not conn.closed:
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
