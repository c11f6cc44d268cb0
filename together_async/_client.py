"""AsyncTogether: owns the HTTP session (opened lazily, closed once), adds the headers, runs the
retry loop, and wires the `files` and `batches` resources.

Resources call the underscore methods here; everything aiohttp-shaped stays in _transport.py.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import stamina

from ._config import API_KEY_ENV, DEFAULT_MAX_RESPONSE_BYTES, ClientConfig
from ._errors import (
    ClientClosedError,
    InvalidArgumentError,
    MissingAPIKeyError,
    TogetherError,
)
from ._protocol import (
    APIOrigin,
    api_url,
    decode_json,
    error_from_response,
    retry_backoff,
    user_agent,
)
from ._reconcile import ClaimRegistry
from ._retry_log import in_client_retry, install_stamina_filter
from ._transport import (
    CALL_DEADLINE,
    CallDeadline,
    Content,
    Credential,
    FormField,
    Response,
    StreamingResponse,
    Transport,
    is_session,
    open_session,
)
from .batches import Batches
from .files import Files

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AsyncTogether"]

logger = logging.getLogger("together_async.client")
install_stamina_filter()

T = TypeVar("T")


_CLOSING: set[asyncio.Task[None]] = set()


def _guard_orphan(
    client: AsyncTogether, session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop
) -> weakref.finalize[Any, Any]:
    """Close `session` in its loop if `client` is collected without being closed.

    A notebook cell run again rebinds `client = AsyncTogether()` and drops the old one with
    its session open, which aiohttp reports as "Unclosed client session" on the user's
    screen. The guard holds the session (so it is not collected with the client, which is
    what makes aiohttp warn) and closes it properly, logging that at DEBUG.
    """
    guard = weakref.finalize(client, _close_orphaned, session, loop)
    guard.atexit = False  # at exit the loop is gone; asyncio.run closes sessions itself
    return guard


def _close_orphaned(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop) -> None:
    if session.closed or loop.is_closed():
        return

    def close() -> None:
        if session.closed:
            return
        logger.debug("an AsyncTogether was dropped without aclose(); closing its session")
        task = loop.create_task(session.close())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    try:
        loop.call_soon_threadsafe(close)
    except RuntimeError:  # the loop closed in between
        pass


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


async def _session_keeper(
    session: aiohttp.ClientSession, closed: Callable[[aiohttp.ClientSession], None]
) -> AsyncGenerator[None, None]:
    """Closes `session` when it is closed itself: by `aclose()`, or by the event loop that
    opened the session as that loop ends (`asyncio.run` and other runners shut down the
    loop's async generators before closing it), or when the client is collected.

    A session's connections belong to its loop: once that loop is closed they can no longer
    be closed cleanly, and an unclosed session warns (ResourceWarning) when collected."""
    try:
        yield
    finally:
        try:
            if not session.closed:
                await session.close()
        finally:
            closed(session)


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
        timeout: an inactivity limit in seconds: to connect, for the peer to take each piece
            of an upload, and between two reads of an answer. A transfer that keeps moving
            never times out, however long it takes (a 100 MB upload over a slow link).
        deadline: seconds one request may take in all, its retries and their waits included
            (a download: with its resumes, until its last byte is read); a request still
            running at the deadline raises APITimeoutError, and a retry that could not start
            before it is not waited for (the last failure is raised at once). None (the
            default) sets no limit: give one so that a server trickling an answer cannot hold
            a call for ever.
        max_response_bytes: the most bytes of an answer read into memory (default 8 MiB,
            counted after decompression); a longer one raises ResponseTooLargeError. File
            downloads stream and are not capped.
        max_retries: retries after a retryable failure (408, 409, 429, 5xx, connection
            errors, timeouts); every resource method can override it per call.
        session: an aiohttp ClientSession to use instead of our own; it is never closed here.

    Event loops: the client's own session belongs to the loop that opened it. When that loop
    ends (`asyncio.run` returns) the session is closed with it, and a later call in another
    loop opens a new one, so one client serves several `asyncio.run` calls in a row. Using it
    from a second loop while the first is still open raises TogetherError. `aclose()` from
    another loop closes the session in its own loop if that loop is running (in another
    thread), and otherwise raises TogetherError asking to close it in that loop.
    """

    files: Files
    batches: Batches

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 60.0,
        deadline: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_retries: int = 5,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        config = ClientConfig.from_arguments(
            api_key,
            base_url=base_url,
            timeout=timeout,
            deadline=deadline,
            max_response_bytes=max_response_bytes,
            max_retries=max_retries,
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
        if session is not None and not is_session(session):
            raise InvalidArgumentError(
                f"session must be an aiohttp.ClientSession or None, got {type(session).__name__}"
            )
        self._config = config
        self._api_origin = APIOrigin(config.base_url)
        # Built on first use (the key is checked then); the key only enters a request's
        # headers inside the transport.
        self._credential: Credential | None = None
        self._caller_session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._keeper: AsyncGenerator[None, None] | None = None
        self._orphan_guard: weakref.finalize[Any, Any] | None = None
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
        """Close the session we opened (never a caller's). Safe to call more than once.

        From another event loop than the one that opened the session: that loop closes it if
        it is running (in another thread); if it is not running, this raises TogetherError
        and leaves the client open, to be closed in that loop."""
        if self._state is _State.CLOSED:
            return
        keeper, session, loop = self._keeper, self._own_session, self._session_loop
        running = asyncio.get_running_loop()
        if keeper is not None and session is not None and not session.closed:
            if loop is not None and loop is not running:
                if loop.is_closed():
                    self._mark_closed()
                    raise TogetherError(
                        "this AsyncTogether's event loop was closed without shutting down its "
                        "async generators, so its connections could not be closed; run it "
                        "with asyncio.run(), or close the client in its loop"
                    )
                if not loop.is_running():
                    raise TogetherError(
                        "this AsyncTogether was opened in another event loop, which is not "
                        "running: close it in that loop (its connections belong to it)"
                    )
                # Closed by its own loop (in another thread), which owns its connections.
                self._mark_closed()
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(keeper.aclose(), loop))
                return
        self._mark_closed()
        if keeper is not None:
            await keeper.aclose()

    def _mark_closed(self) -> None:
        self._drop_orphan_guard()
        self._state = _State.CLOSED
        self._transport_instance = None
        self._own_session = None
        self._keeper = None

    def __repr__(self) -> str:
        return f"<AsyncTogether base_url={self._config.base_url!r} state={self._state.value}>"

    __str__ = __repr__

    # ---- for the resources ----------------------------------------------------------------

    def _ensure_transport(self) -> Transport:
        if self._state is _State.CLOSED:
            raise ClientClosedError("this AsyncTogether is closed; create a new client")
        transport = self._transport_instance
        if transport is not None:
            if self._caller_session is not None:
                return transport
            loop = asyncio.get_running_loop()
            if self._session_loop is loop:
                return transport
            if self._session_loop is not None and self._session_loop.is_closed():
                raise TogetherError(
                    "this AsyncTogether's session belongs to an event loop that was closed "
                    "without shutting down its async generators; run each loop with "
                    "asyncio.run(), or use one client per event loop"
                )
            raise TogetherError(
                "this AsyncTogether's session belongs to another event loop, which is still "
                "open: use one client per event loop, or close it in its loop first"
            )
        loop = asyncio.get_running_loop()
        session = self._caller_session
        if session is None:
            session = self._own_session = open_session()
            self._keeper = self._keep(session)
            self._orphan_guard = _guard_orphan(self, session, loop)
        self._session_loop = loop
        config = self._config
        self._transport_instance = Transport(
            session,
            timeout=config.timeout,
            deadline=config.deadline,
            max_response_bytes=config.max_response_bytes,
        )
        self._state = _State.OPEN
        return self._transport_instance

    def _drop_orphan_guard(self) -> None:
        guard, self._orphan_guard = self._orphan_guard, None
        if guard is not None:
            guard.detach()

    def _keep(self, session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
        """Start `_session_keeper` for `session` in the running loop."""

        def closed(closed_session: aiohttp.ClientSession) -> None:
            # The loop that opened it has ended: a later call, in another loop, opens anew.
            if self._own_session is closed_session and self._state is _State.OPEN:
                self._drop_orphan_guard()
                self._own_session = None
                self._keeper = None
                self._transport_instance = None
                self._session_loop = None
                self._state = _State.UNOPENED

        keeper = _session_keeper(session, closed)
        # Its first step (up to the `yield`, which awaits nothing) registers the generator
        # with the running loop's async-generator hooks, so that the loop closes it as it
        # shuts down; taken here without awaiting, as this method is synchronous.
        step = keeper.__anext__()
        try:
            step.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - the keeper awaits nothing before its yield
            raise AssertionError("the session keeper awaited before its first yield")
        return keeper

    def _headers_for(
        self, url: str, extra: Mapping[str, str] | None = None
    ) -> tuple[dict[str, str], Credential | None]:
        """The headers (User-Agent always) and the credential: only for the API's own host."""
        headers = {"User-Agent": user_agent()}
        if extra:
            headers.update(extra)
        if url not in self._api_origin:
            return headers, None
        credential = self._credential
        if credential is None:
            key = self._config.api_key
            if key is None:
                raise MissingAPIKeyError(
                    f"no API key: pass AsyncTogether(api_key=...) or set {API_KEY_ENV}"
                )
            credential = self._credential = Credential(key)
        return headers, credential

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
        if self._config.deadline is not None:
            return await self._within_deadline(self._run_retried, operation, attempts)
        return await self._run_retried(operation, attempts)

    async def _run_retried(self, operation: Callable[[], Awaitable[T]], attempts: int) -> T:
        try:
            return await operation()
        except Exception as exc:
            first_failure = exc
        return await self._retry_failed(operation, first_failure, attempts)

    def _call_deadline(self) -> CallDeadline | None:
        """A deadline starting now, for a call made of several requests (a download and its
        resumes) to share; None when the client has none. Call it in the running loop."""
        seconds = self._config.deadline
        if seconds is None:
            return None
        end = asyncio.get_running_loop().time() + seconds
        outer = CALL_DEADLINE.get()
        if outer is not None and outer.end <= end:
            return outer  # a call inside another (a lookup during a create) keeps its deadline
        return CallDeadline(end=end, seconds=seconds)

    async def _within_deadline(
        self,
        run: Callable[[Callable[[], Awaitable[T]], int], Awaitable[T]],
        operation: Callable[[], Awaitable[T]],
        attempts: int,
        call: CallDeadline | None = None,
    ) -> T:
        """`run(operation, attempts)` within `call` (default: the client's deadline from now).
        Its requests share it: each gets what is left as aiohttp's `total` (a request that
        runs out fails inside its attempt, as an APITimeoutError the caller can tell from a
        refusal: a create then knows it may have made a job); and no retry is tried, or
        waited for, that could not start before the deadline (`_retry_failed`).

        Nothing is cancelled from outside an attempt: cutting a request short there would
        hide from the caller whether it reached the server."""
        if call is None:
            call = self._call_deadline()
            assert call is not None
        token = CALL_DEADLINE.set(call)
        try:
            return await run(operation, attempts)
        finally:
            CALL_DEADLINE.reset(token)

    async def _retry_failed(
        self, operation: Callable[[], Awaitable[T]], first_failure: Exception, attempts: int
    ) -> T:
        """The rest of `_with_retries`, after a first attempt failed with `first_failure`."""
        config = self._config

        call = CALL_DEADLINE.get() if config.deadline is not None else None
        retries = 0

        def backoff(exc: Exception) -> bool | float:
            nonlocal retries
            wait = retry_backoff(exc, retry_after_max=config.retry_after_max)
            if wait is False:
                return False
            retries += 1
            if wait is True:
                # stamina's own formula, drawn here to know (and tell) the wait before it
                # starts; stamina's test mode still waits 0 for a wait given this way.
                wait = min(
                    config.retry_wait_max,
                    config.retry_wait_initial * 2 ** min(retries - 1, 64)
                    + random.uniform(0, config.retry_wait_jitter),
                )
            if call is not None and asyncio.get_running_loop().time() + wait >= call.end:
                return False  # the retry could not start before the deadline: fail now
            if retries < attempts:
                logger.info(
                    "retry %d of %d in %.1f s after: %s",
                    retries,
                    attempts - 1,
                    wait,
                    exc,
                    extra={"together_retry": (retries, attempts - 1, wait)},
                )
            return wait

        # Not retryable: stamina would re-raise it at once without running any hook. (Asked
        # of the policy directly: stamina calls `backoff` for this failure again when it is
        # replayed, and that call is the one that counts, waits and logs.)
        if retry_backoff(first_failure, retry_after_max=config.retry_after_max) is False:
            raise first_failure
        replayed = False
        with in_client_retry():
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
        request_headers, credential = self._headers_for(url, headers)
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
            credential=credential,
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
        if self._config.deadline is not None:
            attempt = functools.partial(self._send_once, method, url, params=params, json=json)
            response = await self._within_deadline(self._run_retried, attempt, attempts)
            return decode_json(response.body, what=what)
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
        request_headers, credential = self._headers_for(url, headers)
        async with transport.stream(
            method, url, headers=request_headers, credential=credential
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
        deadline: CallDeadline | None = None,
    ) -> StreamingResponse:
        """Open a streamed answer under the retry policy and hand its release to `stack`.

        Only opening is retried: once bytes flow, a failure is the caller's to handle (it may
        resume), which is why this is not a retried generator. `deadline` (from
        `_call_deadline`) is shared by the streams of one call; reading the body counts.
        """

        async def attempt() -> tuple[AsyncExitStack, StreamingResponse]:
            async with AsyncExitStack() as opening:
                response = await opening.enter_async_context(
                    self._stream(method, url, headers=headers, accept=accept)
                )
                return opening.pop_all(), response

        if deadline is None:
            opened, response = await self._with_retries(attempt, max_retries=max_retries)
        else:
            attempts = self._config.attempts_for(max_retries)
            opened, response = await self._within_deadline(
                self._run_retried, attempt, attempts, deadline
            )
        await stack.enter_async_context(opened)
        return response
