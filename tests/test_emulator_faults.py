"""Fault injection: deterministic decisions from a seed (pure), and each kind of fault over
loopback HTTP, including failures that strike after a create took effect and cut downloads."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import MakeEmulator
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_file

from together_async.emulator import Emulator, Fault, FaultKind
from together_async.emulator.faults import FaultInjector

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare session carrying the emulator test key."""
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as client_session:
        yield client_session


def _kinds(injector: FaultInjector, route: tuple[str, str], calls: int) -> list[str | None]:
    decisions = [injector.decide(*route) for _ in range(calls)]
    return [None if d.kind is None else f"{d.kind.value}:{d.status}" for d in decisions]


def test_same_seed_same_decisions() -> None:
    """Two injectors with one seed strike the same calls with the same statuses."""
    faults = [Fault(kind="error", rate=0.5)]
    first = _kinds(FaultInjector(faults, seed=7), ("GET", "/batches"), 200)
    second = _kinds(FaultInjector(faults, seed=7), ("GET", "/batches"), 200)
    assert first == second
    assert 50 < sum(kind is not None for kind in first) < 150
    assert {"error:500", "error:503"} <= set(first)


def test_another_seed_other_decisions() -> None:
    """A different seed gives a different pattern."""
    faults = [Fault(kind="error", rate=0.5)]
    first = _kinds(FaultInjector(faults, seed=1), ("GET", "/batches"), 100)
    second = _kinds(FaultInjector(faults, seed=2), ("GET", "/batches"), 100)
    assert first != second


def test_decisions_per_route_ignore_other_routes() -> None:
    """Calls to one route do not shift the decisions for another."""
    faults = [Fault(kind="error", rate=0.5)]
    alone = FaultInjector(faults, seed=3)
    expected = _kinds(alone, ("GET", "/batches/{id}"), 50)
    mixed = FaultInjector(faults, seed=3)
    seen = []
    for _ in range(50):
        mixed.decide("GET", "/files")
        seen.extend(_kinds(mixed, ("GET", "/batches/{id}"), 1))
    assert seen == expected


def test_times_limits_the_strikes() -> None:
    """`times=2` strikes the next two matching calls only."""
    injector = FaultInjector([Fault(kind="rate_limit", times=2)])
    kinds = [injector.decide("GET", "/batches").kind for _ in range(4)]
    assert kinds == [FaultKind.RATE_LIMIT, FaultKind.RATE_LIMIT, None, None]


def test_routes_target_the_fault() -> None:
    """A fault for "POST /batches" leaves other routes alone; /v1 in the route is accepted."""
    injector = FaultInjector([Fault(kind="error", routes=["POST /v1/batches"])])
    assert injector.decide("GET", "/batches").kind is None
    assert injector.decide("POST", "/batches").kind is FaultKind.ERROR


def test_rate_limit_never_strikes_after_the_effect() -> None:
    """A 429 is a refusal at the door even when after_effect is asked for."""
    injector = FaultInjector([Fault(kind="rate_limit", after_effect=True)])
    assert injector.decide("POST", "/batches").after_effect is False


def test_bad_fault_settings_are_refused() -> None:
    """Rates outside 0..1, statuses other than 500/503 and malformed routes raise ValueError."""
    with pytest.raises(ValueError):
        Fault(kind="error", rate=1.5)
    with pytest.raises(ValueError):
        Fault(kind="error", status=502)
    with pytest.raises(ValueError):
        Fault(kind="error", routes=["batches"])


# -- over HTTP -----------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(emulator: Emulator, api: RawAPI) -> None:
    """A 429 fault carries Retry-After (seconds) and retry-after-ms, in the route's error shape."""
    emulator.faults.add(Fault(kind="rate_limit", retry_after=2.5, times=1))
    async with api.session.get(f"{api.base_url}/batches") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "3"
        assert response.headers["retry-after-ms"] == "2500"
        assert isinstance((await response.json())["error"], str)
    assert emulator.stats.faults_injected["GET", "/batches", "rate_limit"] == 1
    assert (await api.call("GET", "/batches"))[0] == 200


async def test_error_before_the_effect_creates_nothing(emulator: Emulator, api: RawAPI) -> None:
    """A 5xx struck before the handler: no job was created."""
    file_id = (await api.upload(chat_file(1)))["id"]
    emulator.faults.add(Fault(kind="error", routes=["POST /batches"], status=503, times=1))
    status, body = await api.call(
        "POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert status == 503 and isinstance(body["error"], str)
    assert emulator.stats.jobs_created[file_id] == 0
    assert await api.json("GET", "/batches") == []


async def test_error_after_the_effect_leaves_the_job_created(
    emulator: Emulator, api: RawAPI
) -> None:
    """A 500 struck after POST /batches took effect: the caller sees 500, yet the job exists."""
    file_id = (await api.upload(chat_file(1)))["id"]
    emulator.faults.add(
        Fault(kind="error", routes=["POST /batches"], status=500, after_effect=True, times=1)
    )
    status, _ = await api.call(
        "POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert status == 500
    assert emulator.stats.jobs_created[file_id] == 1
    jobs = await api.json("GET", "/batches")
    assert [job["input_file_id"] for job in jobs] == [file_id]


async def test_reset_after_the_effect_cuts_the_answer_but_keeps_the_job(
    emulator: Emulator, api: RawAPI
) -> None:
    """A connection cut in the middle of the 201: the client gets an error, the job exists."""
    file_id = (await api.upload(chat_file(1)))["id"]
    emulator.faults.add(Fault(kind="reset", routes=["POST /batches"], after_effect=True, times=1))
    with pytest.raises(aiohttp.ClientError):
        await api.call(
            "POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        )
    assert emulator.stats.jobs_created[file_id] == 1
    assert len(await api.json("GET", "/batches")) == 1


async def test_reset_before_the_effect_creates_nothing(emulator: Emulator, api: RawAPI) -> None:
    """A connection dropped before the handler ran: the client gets an error and no job exists."""
    file_id = (await api.upload(chat_file(1)))["id"]
    emulator.faults.add(Fault(kind="reset", routes=["POST /batches"], times=1))
    with pytest.raises(aiohttp.ClientError):
        await api.call(
            "POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        )
    assert emulator.stats.jobs_created[file_id] == 0
    assert await api.json("GET", "/batches") == []


async def test_reset_mid_download_then_range_resume(emulator: Emulator, api: RawAPI) -> None:
    """A download cut halfway delivers a true prefix; a Range request fetches the rest."""
    data = chat_file(2000)
    file_id = (await api.upload(data))["id"]
    emulator.faults.add(Fault(kind="reset", routes=["GET /files/{id}/content"], times=1))
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with api.session.get(f"{api.base_url}/files/{file_id}/content") as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                received += chunk
    assert 0 < len(received) < len(data)
    assert bytes(received) == data[: len(received)]
    rest = await api.content(file_id, Range=f"bytes={len(received)}-")
    assert bytes(received) + rest == data


async def test_reset_of_a_read_cuts_the_json(emulator: Emulator, api: RawAPI) -> None:
    """A reset on a GET sends part of the JSON body and then closes the connection."""
    emulator.faults.add(Fault(kind="reset", routes=["GET /batches"], times=1))
    with pytest.raises(aiohttp.ClientError):
        await api.call("GET", "/batches")
    assert (await api.call("GET", "/batches"))[0] == 200


async def test_slow_fault_holds_the_call(emulator: Emulator, api: RawAPI) -> None:
    """A slow fault delays the answer by at least its delay, then answers normally."""
    emulator.faults.add(Fault(kind="slow", delay=0.3, routes=["GET /files"], times=1))
    started = time.monotonic()
    status, _ = await api.call("GET", "/files")
    assert status == 200
    assert time.monotonic() - started >= 0.3


async def test_storage_port_is_never_faulted(emulator: Emulator, api: RawAPI) -> None:
    """Faults on every API route leave the presigned PUT alone."""
    response = await api.start_upload(b"{}\n")
    emulator.faults.add(Fault(kind="error"))
    assert (await api.put(response.headers["Location"], b"{}\n")).status == 200
    assert (await api.call("GET", "/files"))[0] in (500, 503)


async def test_same_seed_same_failures_over_http(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """Two emulators built with the same seed and fault rate fail the same calls."""
    patterns = []
    for _ in range(2):
        emulator = await make_emulator(faults=[Fault(kind="error", rate=0.4)], seed=11)
        api = RawAPI(session, emulator.base_url)
        patterns.append([(await api.call("GET", "/batches"))[0] for _ in range(30)])
    assert patterns[0] == patterns[1]
    assert {200, 500, 503} <= set(patterns[0])


async def test_faults_can_be_cleared(emulator: Emulator, api: RawAPI) -> None:
    """emu.faults.clear() removes every fault."""
    emulator.faults.add(Fault(kind="error"))
    assert (await api.call("GET", "/batches"))[0] >= 500
    emulator.faults.clear()
    assert (await api.call("GET", "/batches"))[0] == 200
