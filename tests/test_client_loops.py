"""One client across event loops: several `asyncio.run` calls in a row (scripts, notebooks),
`aclose()` from another loop, and use from a second loop while the first is still open.
Plain test functions (no pytest-asyncio loop), so each test owns its loops; with
filterwarnings=error and a collection at the end, a leaked connection fails the test."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from http_fakes import SECRET_KEY, job_json
from raw_server import RawConnection, RawRequest, RawServer, http_response

from together_async import AsyncTogether, TogetherError

LIST = json.dumps({"data": [job_json("b1")], "object": "list"}).encode()


async def answer_list(request: RawRequest, conn: RawConnection) -> None:
    await conn.write(http_response(200, LIST, headers={"Content-Type": "application/json"}))


class LoopThread:
    """An event loop running in a thread until `stop()`; `run(coro)` runs a coroutine in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def api_url() -> Iterator[str]:
    """A raw API answering every request with a list of one job, served from its own loop
    in a thread, so that each test's loops come and go around it."""
    server_loop = LoopThread()
    ready: Future[RawServer] = Future()
    stop = asyncio.Event()

    async def serve() -> None:
        async with RawServer(answer_list) as server:
            ready.set_result(server)
            await stop.wait()

    done = asyncio.run_coroutine_threadsafe(serve(), server_loop.loop)
    server = ready.result(timeout=30)
    yield f"{server.url}/v1"
    server_loop.loop.call_soon_threadsafe(stop.set)
    done.result(timeout=30)
    server_loop.stop()


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fails the test if collecting garbage at its end reports an unclosed session, connector
    or transport (a ResourceWarning, or an error raised in a finaliser)."""
    unraisable: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
            gc.collect()
    finally:
        sys.unraisablehook = previous
    assert [str(warning.message) for warning in caught] == []
    assert [repr(hook.exc_value) for hook in unraisable] == []


async def list_ids(client: AsyncTogether) -> list[str]:
    return [job.id for job in await client.batches.list_batches()]


@pytest.mark.usefixtures("no_leaks")
def test_one_client_serves_several_asyncio_runs(api_url: str) -> None:
    """A client used in two `asyncio.run` calls in a row works in both: the first loop's end
    closes its session, and the second call opens a new one."""
    client = AsyncTogether(SECRET_KEY, base_url=api_url)
    assert asyncio.run(list_ids(client)) == ["b1"]
    assert client.state == "unopened"
    assert asyncio.run(list_ids(client)) == ["b1"]
    asyncio.run(client.aclose())
    assert client.state == "closed"


@pytest.mark.usefixtures("no_leaks")
def test_a_client_never_closed_is_closed_with_its_loop(api_url: str) -> None:
    """A client used in `asyncio.run` and never closed leaves no unclosed session or
    connection behind once that loop has ended."""
    client = AsyncTogether(SECRET_KEY, base_url=api_url)
    asyncio.run(list_ids(client))
    del client


@pytest.mark.usefixtures("no_leaks")
def test_aclose_in_another_loop_after_the_first_ended_is_clean(api_url: str) -> None:
    """`asyncio.run(client.aclose())` after the loop that used the client has ended closes it
    without a ResourceWarning."""
    client = AsyncTogether(SECRET_KEY, base_url=api_url)
    asyncio.run(list_ids(client))
    asyncio.run(client.aclose())
    assert client.is_closed


@pytest.mark.usefixtures("no_leaks")
def test_aclose_from_another_loop_closes_the_session_in_its_running_loop(api_url: str) -> None:
    """A client opened in a loop that is still running (in another thread) and closed from
    this one has its session closed by its own loop."""
    other = LoopThread()
    try:
        client = AsyncTogether(SECRET_KEY, base_url=api_url)
        assert other.run(list_ids(client)) == ["b1"]
        session = client._own_session
        assert session is not None
        asyncio.run(client.aclose())
        assert client.is_closed
        assert session.closed
    finally:
        other.stop()


@pytest.mark.usefixtures("no_leaks")
def test_aclose_from_another_loop_while_its_loop_is_idle_is_refused(api_url: str) -> None:
    """A client whose loop is open but not running cannot be closed from another loop: a
    TogetherError says to close it in its own loop, and that then works."""
    loop = asyncio.new_event_loop()
    try:
        client = AsyncTogether(SECRET_KEY, base_url=api_url)
        loop.run_until_complete(list_ids(client))
        with pytest.raises(TogetherError, match="close it in that loop"):
            asyncio.run(client.aclose())
        assert client.state == "open"
        loop.run_until_complete(client.aclose())
        assert client.is_closed
    finally:
        loop.close()


@pytest.mark.usefixtures("no_leaks")
def test_use_from_a_second_loop_while_the_first_is_open_is_a_clear_error(api_url: str) -> None:
    """A call from a second loop while the loop that opened the client is still open is a
    TogetherError naming the cause, not aiohttp's "attached to a different loop"."""
    loop = asyncio.new_event_loop()
    try:
        client = AsyncTogether(SECRET_KEY, base_url=api_url)
        loop.run_until_complete(list_ids(client))
        with pytest.raises(TogetherError, match="another event loop, which is still open"):
            asyncio.run(list_ids(client))
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()
