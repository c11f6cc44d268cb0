"""AsyncTogether: owns the HTTP session (opened lazily, closed once), adds the headers, runs the
retry loop, and wires the `files` and `batches` resources.

Resources call the underscore methods here; everything aiohttp-shaped stays in _transport.py.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import stamina

from ._config import API_KEY_ENV, ClientConfig
from ._errors import (
    ClientClosedError,
    InvalidArgumentError,
    MissingAPIKeyError,
    TogetherError,
)
from ._protocol import (
    APIOrigin,
    api_url,
    auth_headers,
    decode_json,
    error_from_response,
    retry_backoff,
    user_agent,
)
from ._reconcile import ClaimRegistry
from ._transport import Content, FormField, Response, StreamingResponse, Transport, open_session
from .batches import Batches
from .files import Files

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AsyncTogether"]

logger = logging.getLogger("together_async.client")

T = TypeVar("T")


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _APIHeaders(dict[str, str]):
    """The headers of every API request, key included: kept on the client, so hidden from
    repr (vars(client), a debugger's view). Its copy() is a plain dict."""

    def __repr__(self) -> str:
        return "<API headers: User-Agent, Authorization (hidden)>"


class AsyncTogether:
    """An async client for Together's Batch API.

    One aiohttp session per client, opened lazily inside the running event loop on the first
    call, so creating the client needs no loop (handy in a notebook). Close it with
    `async with` or `await client.aclose()`; a closed client refuses further calls.

    Example:
        async with AsyncTogether() as client:
            uploaded = await client.files.upload("requests.jsonl")
            job = await client.batches.create_batch(uploaded.id, "/v1/chat/completions")

    Args:
        api_key: defaults to `TOGETHER_API_KEY`; checked at the first call that needs it.
        base_url: defaults to `TOGETHER_BASE_URL`, else `https://api.together.ai/v1`; a URL
            with no path means `<host>/v1`.
        timeout: seconds to wait to connect and between reads of a response.
        max_retries: retries after a retryable failure (408, 409, 429, 5xx, connection
            errors, timeouts); every resource method can override it per call.
        session: an aiohttp ClientSession to use instead of our own; it is never closed here.
    """

    files: Files
    batches: Batches

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        config = ClientConfig.from_arguments(
            api_key, base_url=base_url, timeout=timeout, max_retries=max_retries
        )
        self._setup(config, session)

    @classmethod
    def from_config(
        cls, config: ClientConfig, *, session: aiohttp.ClientSession | None = None
    ) -> AsyncTogether:
        """A client with every setting spelled out, retry waits included."""
        if not isinstance(config, ClientConfig):
            raise InvalidArgumentError(
                f"config must be a ClientConfig, got {type(config).__name__}"
            )
        client = cls.__new__(cls)
        client._setup(config, session)
        return client

    def _setup(self, config: ClientConfig, session: aiohttp.ClientSession | None) -> None:
        self._config = config
        self._api_origin = APIOrigin(config.base_url)
        # Built on first use (the key is checked then): copied for every request to the API.
        self._api_headers: _APIHeaders | None = None
        self._caller_session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._transport_instance: Transport | None = None
        self._state = _State.UNOPENED
        # The jobs this client's create_batch calls made or adopted: never one job for two.
        self._claims = ClaimRegistry(skew=config.create_reconcile_skew)
        self.files = Files(self)
        self.batches = Batches(self)

    # ---- public surface -------------------------------------------------------------------

    @property
    def config(self) -> ClientConfig:
        """The settings this client runs with (the key is hidden from its repr)."""
        return self._config

    @property
    def base_url(self) -> str:
        """The API root, e.g. `https://api.together.ai/v1`."""
        return self._config.base_url

    @property
    def state(self) -> str:
        """`"unopened"`, `"open"` or `"closed"`."""
        return self._state.value

    @property
    def is_closed(self) -> bool:
        """True after `aclose()`."""
        return self._state is _State.CLOSED

    async def __aenter__(self) -> AsyncTogether:
        self._ensure_transport()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session we opened (never a caller's). Safe to call more than once."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._transport_instance = None
        session, self._own_session = self._own_session, None
        if session is not None and not session.closed:
            await session.close()

    def __repr__(self) -> str:
        return f"<AsyncTogether base_url={self._config.base_url!r} state={self._state.value}>"

    __str__ = __repr__

    # ---- for the resources ----------------------------------------------------------------

    def _ensure_transport(self) -> Transport:
        if self._state is _State.CLOSED:
            raise ClientClosedError("this AsyncTogether is closed; create a new client")
        loop = asyncio.get_running_loop()
        if self._transport_instance is not None:
            if self._session_loop is not loop and self._caller_session is None:
                raise TogetherError(
                    "this AsyncTogether was opened in another event loop; "
                    "create one client per event loop"
                )
            return self._transport_instance
        session = self._caller_session
        if session is None:
            session = self._own_session = open_session()
        self._session_loop = loop
        self._transport_instance = Transport(session, timeout=self._config.timeout)
        self._state = _State.OPEN
        return self._transport_instance

    def _headers_for(self, url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """User-Agent always; the key only for the API's own host."""
        if url in self._api_origin:
            api_headers = self._api_headers
            if api_headers is None:
                key = self._config.api_key
                if key is None:
                    raise MissingAPIKeyError(
                        f"no API key: pass AsyncTogether(api_key=...) or set {API_KEY_ENV}"
                    )
                api_headers = self._api_headers = _APIHeaders(
                    {"User-Agent": user_agent(), **auth_headers(key)}
                )
            headers = api_headers.copy()
        else:
            headers = {"User-Agent": user_agent()}
        if extra:
            headers.update(extra)
        return headers

    def _url(self, *segments: str) -> str:
        return api_url(self._config.base_url, *segments)

    async def _with_retries(
        self, operation: Callable[[], Awaitable[T]], *, max_retries: int | None
    ) -> T:
        """Run `operation` under the client's retry policy; it must rebuild any body it sends.

        The first attempt runs bare: building stamina's retry context costs more CPU than a
        whole request to a nearby server, and almost every call succeeds at once. Only a
        failure the policy retries enters stamina, which is handed that failure as its own
        first attempt, so attempt counts, waits, Retry-After, test mode and stamina's retry
        hooks behave exactly as if stamina had run the first attempt itself.
        """
        attempts = self._config.attempts_for(max_retries)  # checks it before any request
        try:
            return await operation()
        except Exception as exc:
            first_failure = exc
        return await self._retry_failed(operation, first_failure, attempts)

    async def _retry_failed(
        self, operation: Callable[[], Awaitable[T]], first_failure: Exception, attempts: int
    ) -> T:
        """The rest of `_with_retries`, after a first attempt failed with `first_failure`."""
        config = self._config

        def backoff(exc: Exception) -> bool | float:
            return retry_backoff(exc, retry_after_max=config.retry_after_max)

        # Not retryable: stamina would re-raise it at once without running any hook.
        if backoff(first_failure) is False:
            raise first_failure
        replayed = False
        async for attempt in stamina.retry_context(
            on=backoff,
            attempts=attempts,
            timeout=None,
            wait_initial=config.retry_wait_initial,
            wait_max=config.retry_wait_max,
            wait_jitter=config.retry_wait_jitter,
        ):
            with attempt:
                if not replayed:
                    replayed = True
                    raise first_failure
                return await operation()
        raise AssertionError("unreachable: stamina re-raises the last failure")

    async def _send_once(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: Callable[[], Content] | None = None,
        form: Callable[[], Sequence[FormField]] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: frozenset[int] = frozenset(),
    ) -> Response:
        """One attempt: a 2xx or a status in `accept` is returned, anything else raised."""
        transport = self._ensure_transport()
        request_headers = self._headers_for(url, headers)
        body: Content = None
        if json is not None:
            try:
                body = orjson.dumps(json)
            except TypeError as exc:
                # The public calls check their arguments; this is the net for anything they
                # let through (a lone surrogate deep in a value), so no raw TypeError escapes.
                raise InvalidArgumentError(
                    f"{method} {url}: the request body cannot be sent as JSON ({exc})"
                ) from None
            request_headers.setdefault("Content-Type", "application/json")
        elif content is not None:
            body = content()
        response = await transport.request(
            method,
            url,
            headers=request_headers,
            params=params,
            content=body,
            form=form() if form is not None else None,
        )
        if 200 <= response.status < 300 or response.status in accept:
            return response
        raise error_from_response(
            response.status,
            response.headers,
            response.body,
            method=method,
            url=url,
            secret=self._config.api_key,
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        max_retries: int | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: Callable[[], Content] | None = None,
        form: Callable[[], Sequence[FormField]] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: frozenset[int] = frozenset(),
    ) -> Response:
        """`_send_once` under the retry policy."""
        attempt = functools.partial(
            self._send_once,
            method,
            url,
            params=params,
            json=json,
            content=content,
            form=form,
            headers=headers,
            accept=accept,
        )
        return await self._with_retries(attempt, max_retries=max_retries)

    async def _send_json(
        self,
        method: str,
        url: str,
        *,
        what: str,
        max_retries: int | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
    ) -> Any:
        """A retried request whose success body is JSON; returns it decoded."""
        # _with_retries inlined: this is every API call's path, and most succeed at once.
        attempts = self._config.attempts_for(max_retries)
        try:
            response = await self._send_once(method, url, params=params, json=json)
        except Exception as exc:
            first_failure = exc
        else:
            return decode_json(response.body, what=what)
        attempt = functools.partial(self._send_once, method, url, params=params, json=json)
        response = await self._retry_failed(attempt, first_failure, attempts)
        return decode_json(response.body, what=what)

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        accept: frozenset[int] = frozenset(),
    ) -> AsyncIterator[StreamingResponse]:
        """One streamed attempt; an error status is read, mapped and raised."""
        transport = self._ensure_transport()
        async with transport.stream(
            method, url, headers=self._headers_for(url, headers)
        ) as response:
            if not (200 <= response.status < 300 or response.status in accept):
                body = await response.read()
                raise error_from_response(
                    response.status,
                    response.headers,
                    body,
                    method=method,
                    url=url,
                    secret=self._config.api_key,
                )
            yield response

    async def _open_stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        accept: frozenset[int] = frozenset(),
        max_retries: int | None,
        stack: AsyncExitStack,
    ) -> StreamingResponse:
        """Open a streamed answer under the retry policy and hand its release to `stack`.

        Only opening is retried: once bytes flow, a failure is the caller's to handle (it may
        resume), which is why this is not a retried generator.
        """

        async def attempt() -> tuple[AsyncExitStack, StreamingResponse]:
            async with AsyncExitStack() as opening:
                response = await opening.enter_async_context(
                    self._stream(method, url, headers=headers, accept=accept)
                )
                return opening.pop_all(), response

        opened, response = await self._with_retries(attempt, max_retries=max_retries)
        await stack.enter_async_context(opened)
        return response
