"""The one place on the client side that touches aiohttp: open a session, send one request,
hand back plain values or a byte stream. Every aiohttp, OSError and timeout exception is
translated here into APIConnectionError / APITimeoutError, so none escapes the public API.

Limits enforced here:
- `timeout` is an inactivity limit: to connect, between two reads of an answer (aiohttp's
  `sock_read`, which starts once the request body is sent), and for each piece of a streamed
  request body to be taken by the peer (`_BodyWatch`; aiohttp has no write timeout). A
  transfer that keeps moving never times out, however long it takes.
- `deadline` (optional) bounds one request in all: aiohttp's `total`, which also covers
  reading a streamed body. The client sets `CALL_DEADLINE` so that the requests of one call
  (attempts, a download's resumes) share one deadline: each gets what is left.
- An answer read into memory is capped at `max_response_bytes` (decoded bytes: a gzip bomb is
  stopped at the cap); streamed downloads are not capped.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import re
import socket
import struct
import sys
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
import aiohttp.payload
import anyio
import attrs

if sys.platform != "win32":
    import fcntl
    import termios

from ._errors import APIConnectionError, APITimeoutError, ResponseTooLargeError
from ._protocol import secrets_of

__all__ = [
    "CALL_DEADLINE",
    "CallDeadline",
    "Content",
    "Credential",
    "FormField",
    "Response",
    "StreamingResponse",
    "Transport",
    "open_session",
]

logger = logging.getLogger("together_async.transport")

#: A request body: bytes, a stream of byte chunks, or nothing.
Content = bytes | AsyncIterable[bytes] | None

#: What is handed to aiohttp as a request body.
_Data = bytes | aiohttp.Payload | aiohttp.FormData | None

#: How to ask the kernel how much of what was sent is not acknowledged yet: SIOCOUTQ
#: (= TIOCOUTQ) on Linux, the SO_NWRITE option on macOS; elsewhere it is not asked.
_OUTQ: int | None = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
_SO_NWRITE: int | None = 0x1024 if sys.platform == "darwin" else None
#: TCP_INFO, read for when the peer last acknowledged something (Linux only).
_TCP_INFO: int | None = (
    getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
)

#: The most bytes of a streamed request body handed to aiohttp at once. Each piece must be
#: taken by the peer within the timeout, so this sets the slowest link that still counts as
#: moving: 128 KiB per 60 s is about 17 kbit/s.
_BODY_PIECE = 128 * 1024


@attrs.define(slots=True, eq=False)
class CallDeadline:
    """The deadline of one call (a request and its retries, a download and its resumes),
    shared by its requests. `end` is in event-loop time."""

    end: float
    seconds: float


#: Set by the client around a call that has a deadline; read by every request in it.
CALL_DEADLINE: contextvars.ContextVar[CallDeadline | None] = contextvars.ContextVar(
    "together_async_call_deadline", default=None
)


class Credential:
    """The API key, turned into the Authorization header only as a request is handed to
    aiohttp: no dict or string holding the key sits in a local of our frames while a request
    runs (a traceback's frames, a debugger or an error reporter see only this object)."""

    __slots__ = ("_authorization",)

    def __init__(self, api_key: str) -> None:
        self._authorization = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return "<Credential (hidden)>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Credential is not picklable")

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """`headers` with the Authorization header added."""
        return {**headers, "Authorization": self._authorization}


@attrs.frozen(kw_only=True)
class FormField:
    """One field of a multipart form; a `filename` makes it a file part."""

    name: str
    value: str | bytes | AsyncIterable[bytes]
    filename: str | None = None
    content_type: str | None = None
    #: The length of a streamed value, when known: a form whose parts all have one is sent
    #: with a Content-Length, and its end is then watched like a PUT body's.
    size: int | None = None


@attrs.frozen(kw_only=True)
class Response:
    """A complete answer: status, headers (lower-case names) and the body bytes."""

    status: int
    body: bytes
    url: str
    _raw_headers: Mapping[str, str] = attrs.field(alias="raw_headers", repr=False)

    @functools.cached_property
    def headers(self) -> Mapping[str, str]:
        """The headers with lower-case names, repeated ones joined; built on first use, as a
        successful JSON answer (most of them) is read without a look at its headers."""
        return _plain_headers(self._raw_headers)


def is_session(value: object) -> bool:
    """Whether `value` is an aiohttp session a caller may hand the client."""
    return isinstance(value, aiohttp.ClientSession)


def open_session() -> aiohttp.ClientSession:
    """A session for one client. Call it inside the running event loop.

    No cookie jar: an API client has no use for cookies, and a storage host's cookies
    should go nowhere.
    """
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())


def _shown(method: str, url: str) -> str:
    # Host and path only: a presigned URL's query string is a credential.
    parts = urlsplit(url)
    return f"{method.upper()} {parts.scheme}://{parts.netloc}{parts.path}"


#: A URL's query (and fragment) inside free text, e.g. aiohttp's "Connection timeout to host
#: http://h/p?X-Amz-Signature=..." or a yarl repr URL('...?...').
_URL_QUERY = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")


def _scrubbed(text: str, url: str) -> str:
    """`text` without any URL query string in it (the request's own, in whatever spelling)."""
    text = _URL_QUERY.sub(r"\1?<query hidden>", text)
    query = urlsplit(url).query
    if query and query in text:
        text = text.replace(query, "<query hidden>")
    return text


def _without_query_values(body: bytes, url: str) -> bytes:
    """An error answer from a URL with a query (a presigned URL), without the query's values:
    a storage host may echo them (S3's SignatureDoesNotMatch names the signature it got), and
    the error built from the body would then carry the credential."""
    for secret, shown in secrets_of(None, url):
        body = body.replace(secret.encode(), shown.encode())
    return body


def _plain_headers(raw: Mapping[str, str]) -> dict[str, str]:
    headers = {name.lower(): value for name, value in raw.items()}
    if len(headers) == len(raw):
        return headers
    # A repeated header: its values joined, as RFC 9110 allows for lists.
    headers = {}
    for name, value in raw.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


#: What aiohttp and the OS raise for a failed exchange (cancellation is not among them).
# UnicodeError: the resolver's IDNA encoding refusing a host (a label over 63 characters).
_TRANSLATED = (asyncio.TimeoutError, aiohttp.ClientError, OSError, UnicodeError)


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _translation(
    exc: BaseException, method: str, url: str, *, timeout: float, deadline: float | None
) -> APIConnectionError:
    """Our exception for one of _TRANSLATED; raise it `from exc` unless `__cause__` was
    cleared (the original named the URL with its query, a credential for presigned URLs)."""
    shown = _shown(method, url)
    # TimeoutError first: on 3.11+ it is a subclass of OSError.
    if isinstance(exc, asyncio.TimeoutError):
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            what = f"no connection within {_seconds(timeout)}"
        elif isinstance(exc, aiohttp.ServerTimeoutError):
            what = f"no data for {_seconds(timeout)}"
        elif deadline is not None:
            what = f"the deadline of {_seconds(deadline)} passed"
        else:
            what = "no answer"
        translated: APIConnectionError = APITimeoutError(f"{shown}: timed out: {what}")
    else:
        raw = str(exc) or type(exc).__name__
        detail = _scrubbed(raw, url)
        translated = APIConnectionError(f"{shown}: {type(exc).__name__}: {detail}")
        if detail != raw:
            translated.__cause__ = None
            translated.__suppress_context__ = True
            return translated
    translated.__cause__ = exc
    return translated


def _raise_translated(
    exc: BaseException, method: str, url: str, *, timeout: float, deadline: float | None
) -> NoReturn:
    """Raise our exception for `exc`, chained to it unless that would leak a query string.
    Call it outside the `except` block that caught `exc` when it may not be chained, so it is
    not kept as `__context__` either."""
    translated = _translation(exc, method, url, timeout=timeout, deadline=deadline)
    raise translated


def _too_large(
    method: str, url: str, status: int, limit: int, length: int | None
) -> ResponseTooLargeError:
    size = f"{length} bytes" if length is not None else "longer"
    return ResponseTooLargeError(
        f"{_shown(method, url)}: the answer ({status}) is {size}, more than "
        f"max_response_bytes ({limit}); it was not read",
        status_code=status,
        limit=limit,
    )


async def _read_capped(
    response: aiohttp.ClientResponse, limit: int, method: str, url: str
) -> bytes:
    """The whole body, or ResponseTooLargeError as soon as it is known to pass `limit`
    decoded bytes (aiohttp decompresses as we read, so a compressed body stops at the cap)."""
    length = response.content_length
    if length is not None and length > limit:
        raise _too_large(method, url, response.status, limit, length)
    content = response.content
    first = await content.read(limit + 1)
    if not first or content.at_eof():
        if len(first) > limit:
            raise _too_large(method, url, response.status, limit, None)
        return first
    chunks = [first]
    size = len(first)
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    raise _too_large(method, url, response.status, limit, None)


def _unacknowledged(sock: object) -> int | None:
    """Bytes written to `sock` that its peer has not acknowledged yet (Linux, macOS), or None
    where the system does not tell."""
    try:
        if _OUTQ is not None:
            fileno = sock.fileno()  # type: ignore[attr-defined]
            answer = fcntl.ioctl(fileno, _OUTQ, b"\0\0\0\0")
            return int(struct.unpack("i", answer)[0])
        if _SO_NWRITE is not None:
            return int(sock.getsockopt(socket.SOL_SOCKET, _SO_NWRITE))  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _since_last_ack(sock: object) -> float | None:
    """Seconds since the peer last acknowledged anything on `sock` (Linux: TCP_INFO's
    tcpi_last_ack_recv, in the struct since Linux 2.6), or None where that is not known."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)  # type: ignore[attr-defined]
        if len(info) < 60:
            return None
        return int(struct.unpack_from("I", info, 56)[0]) / 1000
    except (OSError, ValueError, AttributeError, struct.error):
        return None


class _BodyWatch:
    """A write timeout for a streamed request body, which aiohttp lacks (its `sock_read`
    starts only once the body is sent): the body is written in pieces, and a piece the peer
    has not taken within `timeout` seconds cancels `scope`, which the request runs in.
    Waiting for our own source (a file read) does not count.

    Once the last piece is written, the watch waits (where the system tells) until the peer
    has acknowledged the bytes still queued in the kernel, which on a slow link can be
    megabytes: aiohttp's read timeout starts only when the body is done, and must not run
    out while the tail of a body is still moving. For a whole body of known length (a PUT)
    it then waits while the peer keeps acknowledging (it opens its receive window as its
    application reads what its kernel took: megabytes when that buffer is large), for the
    answer is not due before it has read it all; the answer ends that wait."""

    __slots__ = ("scope", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = anyio.CancelScope()

    def body(
        self,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        size: int | None = None,
        tail: bool = True,
    ) -> aiohttp.Payload:
        """`chunks` as a payload written by this watch; `tail=False` for a part of a form
        (the form's end is waited on instead)."""
        return _WatchedBody(chunks, self, content_type=content_type, size=size, tail=tail)

    def form(self, form: aiohttp.MultipartWriter) -> aiohttp.Payload:
        return _WatchedForm(form, self)

    async def send(
        self, chunks: AsyncIterator[bytes], writer: Any, length: int | None, *, tail: bool
    ) -> None:
        """Write `chunks` (at most `length` bytes, when given) to aiohttp's `writer`; with
        `tail`, then wait for what the kernels hold (`_until_taken`)."""
        scope = self.scope
        timeout = self.timeout
        left = length
        try:
            async for chunk in chunks:
                if left is not None:
                    if left <= 0:
                        continue  # drained but not sent, as aiohttp does past a length
                    if len(chunk) > left:
                        chunk = chunk[:left]
                    left -= len(chunk)
                if len(chunk) <= _BODY_PIECE:
                    scope.deadline = anyio.current_time() + timeout
                    await writer.write(chunk)
                else:
                    view = memoryview(chunk)
                    for start in range(0, len(view), _BODY_PIECE):
                        scope.deadline = anyio.current_time() + timeout
                        await writer.write(view[start : start + _BODY_PIECE])
                scope.deadline = math.inf
            if tail:
                await self._until_taken(writer, whole_body=length is not None)
        finally:
            scope.deadline = math.inf
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _until_taken(self, writer: Any, *, whole_body: bool) -> None:
        """Wait while the peer keeps acknowledging what is queued; give up waiting once it
        stalls for `timeout` (the scope's deadline then cancels the request). With
        `whole_body`, then wait while the peer still acknowledges, up to `timeout` after its
        last acknowledgement (aiohttp's read timeout follows)."""
        scope = self.scope
        timeout = self.timeout
        transport = getattr(writer, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return
        scope.deadline = anyio.current_time() + timeout
        await writer.drain()
        queued = _unacknowledged(sock)
        pause = 0.001
        while queued:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
            now_queued = _unacknowledged(sock)
            if now_queued is None:
                return
            if now_queued < queued:
                scope.deadline = anyio.current_time() + timeout
            elif anyio.current_time() >= scope.deadline:
                return  # the scope is cancelling the request (or the request is over)
            queued = now_queued
        scope.deadline = math.inf
        if not whole_body:
            return  # a part of a form: the rest of the body follows, then the answer
        while True:
            quiet = _since_last_ack(sock)
            if quiet is None or quiet >= timeout:
                return
            await asyncio.sleep(min(timeout - quiet, 0.1) + 0.001)

    def failure(self, method: str, url: str) -> APITimeoutError:
        return APITimeoutError(
            f"{_shown(method, url)}: timed out: the peer took no part of the request body "
            f"for {_seconds(self.timeout)}"
        )


class _WatchedBody(aiohttp.payload.AsyncIterablePayload):
    """A streamed request body written by its `_BodyWatch` (a file part of a form, or a
    whole PUT body)."""

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        watch: _BodyWatch,
        *,
        content_type: str | None,
        size: int | None,
        tail: bool,
    ) -> None:
        super().__init__(chunks, content_type=content_type)
        self._watch = watch
        self._size = size
        self._tail = tail

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        chunks, self._iter = self._iter, None
        if chunks is None:
            return
        self._consumed = True
        await self._watch.send(chunks, writer, content_length, tail=self._tail)


class _WatchedForm(aiohttp.payload.Payload):
    """A multipart form with watched parts, whose end is waited on like a whole body's when
    its length is known (sent with a Content-Length, nothing follows its last byte)."""

    _autoclose = True

    def __init__(self, form: aiohttp.MultipartWriter, watch: _BodyWatch) -> None:
        super().__init__(form, headers=form.headers)
        self._form = form
        self._watch = watch
        self._size = form.size

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._form.decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        await self._form.write(writer)
        await self._watch._until_taken(writer, whole_body=self._size is not None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        await self.write(writer)

    async def close(self) -> None:
        await self._form.close()


class StreamingResponse:
    """An answer whose body is read as it arrives. Only valid inside `Transport.stream()`."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        method: str,
        url: str,
        *,
        timeout: float,
        deadline: float | None,
        max_response_bytes: int,
    ) -> None:
        self._response = response
        self._method = method
        self._timeout = timeout
        self._deadline = deadline
        self._max_response_bytes = max_response_bytes
        self.status: int = response.status
        self.headers: Mapping[str, str] = _plain_headers(response.headers)
        self.url = url

    async def iter_chunks(self, size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The body in chunks of at most `size` bytes (not capped); a dropped connection
        raises APIConnectionError, no data for `timeout` seconds APITimeoutError."""
        content = self._response.content
        while True:
            failure: BaseException | None = None
            try:
                chunk = await content.read(size)
            except _TRANSLATED as exc:
                failure = exc
            if failure is not None:
                self._raise(failure)
            if not chunk:
                return
            yield chunk

    async def read(self) -> bytes:
        """The whole body, capped at `max_response_bytes` (for error answers)."""
        failure: BaseException | None = None
        try:
            return await _read_capped(
                self._response, self._max_response_bytes, self._method, self.url
            )
        except _TRANSLATED as exc:
            failure = exc
        self._raise(failure)

    def _raise(self, exc: BaseException) -> NoReturn:
        _raise_translated(
            exc, self._method, self.url, timeout=self._timeout, deadline=self._deadline
        )

    @property
    def finished(self) -> bool:
        """True once the whole body has been read."""
        return self._response.content.at_eof()


class Transport:
    """Sends requests on one aiohttp session. Knows nothing about the API or retries."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        deadline: float | None = None,
        max_response_bytes: int,
    ) -> None:
        self._session = session
        self._inactivity = timeout
        # Used when no call deadline is set (a request outside the client's retry loop).
        self._deadline = deadline
        self._max_response_bytes = max_response_bytes
        # Inactivity limits rather than a total: a 100 MB upload may take longer than any
        # sensible total, but a silent connection should still fail.
        self._timeout = aiohttp.ClientTimeout(
            total=deadline, connect=None, sock_connect=timeout, sock_read=timeout
        )

    def _timeouts(self, method: str, url: str) -> tuple[aiohttp.ClientTimeout, float | None]:
        """aiohttp's timeouts for one request and the deadline (seconds) they carry."""
        call = CALL_DEADLINE.get()
        if call is None:
            return self._timeout, self._deadline
        remaining = call.end - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise APITimeoutError(
                f"{_shown(method, url)}: timed out: the deadline of {_seconds(call.seconds)} passed"
            )
        timeout = aiohttp.ClientTimeout(
            total=remaining,
            connect=None,
            sock_connect=self._inactivity,
            sock_read=self._inactivity,
        )
        return timeout, call.seconds

    def _prepare(
        self, content: Content, form: Sequence[FormField] | None
    ) -> tuple[_Data, _BodyWatch | None]:
        watch: _BodyWatch | None = None
        if form is None:
            if content is None or isinstance(content, bytes):
                return content, None
            watch = _BodyWatch(self._inactivity)
            return watch.body(content), watch
        data = aiohttp.FormData(default_to_multipart=True)
        for field in form:
            value: object = field.value
            if not isinstance(field.value, (str, bytes)):
                if watch is None:
                    watch = _BodyWatch(self._inactivity)
                value = watch.body(
                    field.value, content_type=field.content_type, size=field.size, tail=False
                )
            data.add_field(
                field.name,
                value,
                filename=field.filename,
                content_type=field.content_type,
            )
        if watch is None:
            return data, None
        multipart = data()  # built here (aiohttp would at the request) to wrap it whole
        assert isinstance(multipart, aiohttp.MultipartWriter)
        return watch.form(multipart), watch

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        credential: Credential | None = None,
        params: Mapping[str, str] | None = None,
        content: Content = None,
        form: Sequence[FormField] | None = None,
    ) -> Response:
        """Send one request (redirects not followed) and read the whole answer (capped)."""
        timeout, deadline = self._timeouts(method, url)
        data, watch = self._prepare(content, form)
        failure: BaseException | None = None
        if watch is None:
            # Not a context manager per call: on this path (every API call) it is measurable.
            try:
                result = await self._exchange(
                    method, url, headers, credential, params, data, timeout
                )
            except _TRANSLATED as exc:
                failure = exc
        else:
            try:
                with watch.scope:
                    result = await self._exchange(
                        method, url, headers, credential, params, data, timeout
                    )
            except _TRANSLATED as exc:
                failure = exc
            if watch.scope.cancelled_caught:
                raise watch.failure(method, url)
        if failure is not None:
            _raise_translated(failure, method, url, timeout=self._inactivity, deadline=deadline)
        if logger.isEnabledFor(logging.DEBUG):  # _shown parses the URL: not for nothing
            logger.debug(
                "%s -> %d (%d bytes)", _shown(method, url), result.status, len(result.body)
            )
        return result

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        credential: Credential | None,
        params: Mapping[str, str] | None,
        data: _Data,
        limits: aiohttp.ClientTimeout,
    ) -> Response:
        async with self._session.request(
            method,
            url,
            headers=credential.headers(headers) if credential is not None else headers,
            params=params,
            data=data,
            allow_redirects=False,
            timeout=limits,
        ) as response:
            try:
                body = await _read_capped(response, self._max_response_bytes, method, url)
            except ResponseTooLargeError:
                response.close()  # the rest is not read: the connection cannot be reused
                raise
            if response.status >= 300 and "?" in url:
                body = _without_query_values(body, url)
            return Response(
                status=response.status, body=body, url=url, raw_headers=response.headers
            )

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        credential: Credential | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamingResponse]:
        """Send one request and hold the answer open for streaming; released on exit, and the
        connection closed if the body was not read to the end."""
        timeout, deadline = self._timeouts(method, url)
        failure: BaseException | None = None
        try:
            response = await self._session.request(
                method,
                url,
                headers=credential.headers(headers) if credential is not None else dict(headers),
                params=params,
                allow_redirects=False,
                timeout=timeout,
            )
        except _TRANSLATED as exc:
            failure = exc
        if failure is not None:
            _raise_translated(failure, method, url, timeout=self._inactivity, deadline=deadline)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s -> %d (streaming)", _shown(method, url), response.status)
        streaming = StreamingResponse(
            response,
            method,
            url,
            timeout=self._inactivity,
            deadline=deadline,
            max_response_bytes=self._max_response_bytes,
        )
        try:
            yield streaming
        finally:
            if streaming.finished:
                response.release()
            else:
                response.close()
