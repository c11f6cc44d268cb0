"""Shared fixtures: fake API servers and clients on loopback, and in-process emulators with
temporary data dirs and fast time settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import aiohttp
import pytest
import stamina
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from emulator_helpers import EMULATOR_KEY, RawAPI
from http_fakes import SECRET_KEY

from together_async import AsyncTogether
from together_async.emulator import Emulator

Serve = Callable[[web.Application], Awaitable[TestServer]]
MakeClient = Callable[..., AsyncTogether]
MakeEmulator = Callable[..., Awaitable[Emulator]]


# -- fake servers and clients -------------------------------------------------------------------


@pytest.fixture
def fast_retries() -> Iterator[None]:
    """Retries without waiting (stamina's test mode); the client's attempt counts still apply."""
    with stamina.set_testing(True, attempts=1000, cap=True):
        yield


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app on a loopback port: `server = await serve(app)`; closed at teardown."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """An AsyncTogether for a test server, keyed SECRET_KEY: `make_client(server, **options)`."""
    clients: list[AsyncTogether] = []

    def make(server: TestServer, **options: Any) -> AsyncTogether:
        options.setdefault("api_key", SECRET_KEY)
        client = AsyncTogether(base_url=str(server.make_url("/v1")), **options)
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.aclose()


# -- emulators ----------------------------------------------------------------------------------


@pytest.fixture
async def make_emulator(tmp_path: Path) -> AsyncIterator[MakeEmulator]:
    """A factory of started emulators (closed at teardown): `await make_emulator(latency=0.01)`.

    Defaults: a data dir under tmp_path, the key EMULATOR_KEY, commits every 20 ms.
    """
    started: list[Emulator] = []

    async def make(**options: Any) -> Emulator:
        options.setdefault("data_dir", tmp_path / f"emulator-{len(started)}")
        options.setdefault("api_key", EMULATOR_KEY)
        options.setdefault("commit_interval", 0.02)
        emulator = Emulator(**options)
        await emulator.start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in reversed(started):
        await emulator.close()


@pytest.fixture
async def emulator(make_emulator: MakeEmulator) -> Emulator:
    """An in-process emulator on loopback, echo engine, no latency, key EMULATOR_KEY."""
    return await make_emulator()


@pytest.fixture
async def api(emulator: Emulator) -> AsyncIterator[RawAPI]:
    """The `emulator` fixture's API through a bare aiohttp session carrying its key."""
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {emulator.api_key}"}
    ) as session:
        yield RawAPI(session, emulator.base_url)


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[AsyncTogether]:
    """An AsyncTogether for the `emulator` fixture, closed at teardown."""
    async with AsyncTogether(base_url=emulator.base_url, api_key=emulator.api_key) as together:
        yield together


@pytest.fixture
def mock_http(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """aioresponses, made to work on aiohttp >= 3.14 (request shapes and error paths only).

    aioresponses 0.7.9 builds its fake ClientResponse without the `stream_writer` argument that
    aiohttp 3.14 made required, and every mocked call then fails with a TypeError. We must not
    pin aiohttp below 3.14 (a security release), so the response class aioresponses uses gets
    that one argument filled in. Streaming paths use aiohttp's test server or the emulator.
    """
    import aioresponses.core as aioresponses_core

    class _Aiohttp314Response(aiohttp.ClientResponse):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", Mock())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(aioresponses_core, "ClientResponse", _Aiohttp314Response)
    with aioresponses() as mocked:
        yield mocked
