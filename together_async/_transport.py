"""The one place on the client side that touches aiohttp: open a session, send one request,
hand back plain values or a byte stream. Every aiohttp, OSError and timeout exception is
translated here into APIConnectionError / APITimeoutError, so none escapes the public API.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit

import aiohttp
import attrs

from ._errors import APIConnectionError, APITimeoutError

__all__ = ["Content", "FormField", "Response", "StreamingResponse", "Transport", "open_session"]

logger = logging.getLogger("together_async.transport")

#: A request body: bytes, a stream of byte chunks, or nothing.
Content = bytes | AsyncIterable[bytes] | None


@attrs.frozen(kw_only=True)
class FormField:
    """One field of a multipart form; a `filename` makes it a file part."""

    name: str
    value: str | bytes | AsyncIterable[bytes]
    filename: str | None = None
    content_type: str | None = None


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
_TRANSLATED = (asyncio.TimeoutError, aiohttp.ClientError, OSError)


def _translation(exc: BaseException, method: str, url: str) -> APIConnectionError:
    """Our exception for one of _TRANSLATED; raise it `from exc`."""
    # TimeoutError first: on 3.11+ it is a subclass of OSError.
    if isinstance(exc, asyncio.TimeoutError):
        return APITimeoutError(f"{_shown(method, url)}: timed out")
    detail = str(exc) or type(exc).__name__
    return APIConnectionError(f"{_shown(method, url)}: {type(exc).__name__}: {detail}")


@contextmanager
def _translated(method: str, url: str) -> Iterator[None]:
    """Turn aiohttp's and the OS's exceptions into ours; cancellation passes through."""
    try:
        yield
    except _TRANSLATED as exc:
        raise _translation(exc, method, url) from exc


class StreamingResponse:
    """An answer whose body is read as it arrives. Only valid inside `Transport.stream()`."""

    def __init__(self, response: aiohttp.ClientResponse, method: str, url: str) -> None:
        self._response = response
        self._method = method
        self.status: int = response.status
        self.headers: Mapping[str, str] = _plain_headers(response.headers)
        self.url = url

    async def iter_chunks(self, size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The body in chunks of at most `size` bytes; a dropped connection raises
        APIConnectionError."""
        content = self._response.content
        while True:
            with _translated(self._method, self.url):
                chunk = await content.read(size)
            if not chunk:
                return
            yield chunk

    async def read(self) -> bytes:
        """The whole body (use for error answers, which are small)."""
        with _translated(self._method, self.url):
            return await self._response.read()

    @property
    def finished(self) -> bool:
        """True once the whole body has been read."""
        return self._response.content.at_eof()


class Transport:
    """Sends requests on one aiohttp session. Knows nothing about the API or retries."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout: float) -> None:
        self._session = session
        # Per-step limits rather than a total: a 100 MB upload may take longer than any
        # sensible total, but a silent connection should still fail.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout, sock_read=timeout
        )

    def _prepare(
        self, content: Content, form: Sequence[FormField] | None
    ) -> bytes | AsyncIterable[bytes] | aiohttp.FormData | None:
        if form is None:
            return content
        data = aiohttp.FormData(default_to_multipart=True)
        for field in form:
            data.add_field(
                field.name,
                field.value,
                filename=field.filename,
                content_type=field.content_type,
            )
        return data

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
        content: Content = None,
        form: Sequence[FormField] | None = None,
    ) -> Response:
        """Send one request (redirects not followed) and read the whole answer."""
        data = self._prepare(content, form)
        # Not `with _translated(...)`: a generator context manager per call is measurable.
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                params=params,
                data=data,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                body = await response.read()
                result = Response(
                    status=response.status, body=body, url=url, raw_headers=response.headers
                )
        except _TRANSLATED as exc:
            raise _translation(exc, method, url) from exc
        if logger.isEnabledFor(logging.DEBUG):  # _shown parses the URL: not for nothing
            logger.debug("%s -> %d (%d bytes)", _shown(method, url), result.status, len(body))
        return result

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamingResponse]:
        """Send one request and hold the answer open for streaming; released on exit, and the
        connection closed if the body was not read to the end."""
        with _translated(method, url):
            response = await self._session.request(
                method,
                url,
                headers=dict(headers),
                params=params,
                allow_redirects=False,
                timeout=self._timeout,
            )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s -> %d (streaming)", _shown(method, url), response.status)
        streaming = StreamingResponse(response, method, url)
        try:
            yield streaming
        finally:
            if streaming.finished:
                response.release()
            else:
                response.close()
