"""The emulator as a server: auth, JSON answers for unknown routes, request ids, the
`Emulator` lifecycle, and the API key kept out of every log."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeEmulator
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_file

from together_async.emulator import Emulator

pytestmark = pytest.mark.timeout(60)


async def _status(emulator: Emulator, headers: dict[str, str], path: str = "/batches") -> int:
    async with aiohttp.ClientSession(headers=headers) as session:
        return (await RawAPI(session, emulator.base_url).call("GET", path))[0]


async def test_missing_key_gets_401(emulator: Emulator) -> None:
    """With an API key configured, a call without Authorization answers 401 {"error": ...}."""
    async with aiohttp.ClientSession() as session:
        status, body = await RawAPI(session, emulator.base_url).call("GET", "/batches")
    assert status == 401
    assert isinstance(body["error"], str)


async def test_wrong_key_gets_401(emulator: Emulator) -> None:
    """Another Bearer key answers 401 on batch and file routes alike."""
    for path in ("/batches", "/files"):
        assert await _status(emulator, {"Authorization": "Bearer not-the-key"}, path) == 401


async def test_the_right_key_is_accepted(emulator: Emulator) -> None:
    """The configured key passes (the scheme is case-insensitive)."""
    assert await _status(emulator, {"Authorization": f"bearer {EMULATOR_KEY}"}) == 200


async def test_without_a_configured_key_any_key_is_accepted(
    make_emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """api_key=None accepts any key (or none), and the startup log says so."""
    caplog.set_level(logging.INFO, logger="together_async.emulator")
    emulator = await make_emulator(api_key=None)
    assert await _status(emulator, {"Authorization": "Bearer anything"}) == 200
    assert await _status(emulator, {}) == 200
    assert "any key is accepted" in caplog.text
    assert emulator.api_key  # a placeholder a client can send


async def test_key_never_reaches_the_logs(
    make_emulator: MakeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG logging, neither startup, access logs nor 401s show the configured key."""
    caplog.set_level(logging.DEBUG)
    secret = "sk-emulator-SECRET-123"
    emulator = await make_emulator(api_key=secret)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as session:
        api = RawAPI(session, emulator.base_url)
        await api.wait_for((await api.submit(chat_file(3)))["id"])
    assert await _status(emulator, {"Authorization": "Bearer wrong"}) == 401
    assert secret not in caplog.text
    assert secret not in repr(emulator)


async def test_unknown_route_is_a_json_404(api: RawAPI) -> None:
    """A path the API does not have answers 404 in JSON."""
    status, body = await api.call("GET", "/nothing-here")
    assert status == 404
    assert body["error"]["message"]


async def test_wrong_method_is_a_json_405(api: RawAPI) -> None:
    """A known path with the wrong method answers 405 in JSON."""
    status, body = await api.call("PUT", "/batches")
    assert status == 405
    assert body["error"]


async def test_answers_carry_a_request_id(api: RawAPI) -> None:
    """Every answer, errors included, has an x-request-id header."""
    for path in ("/batches", "/batches/00000000-0000-4000-8000-000000000000"):
        async with api.session.get(f"{api.base_url}{path}") as response:
            assert response.headers["x-request-id"]


async def test_stats_count_requests_by_route(emulator: Emulator, api: RawAPI) -> None:
    """emu.stats counts calls by (method, route template)."""
    job = await api.submit(chat_file(1))
    await api.wait_for(job["id"])
    assert emulator.stats["POST", "/files"] == 1
    assert emulator.stats["POST", "/files/{id}/preprocess"] == 1
    assert emulator.stats["POST", "/batches"] == 1
    assert emulator.stats["GET", "/batches/{id}"] >= 1


async def test_base_url_ends_in_v1_and_url_is_the_bare_host(emulator: Emulator) -> None:
    """base_url is <host>/v1 for our client; url is the bare host for the official SDK 3.x."""
    assert emulator.base_url == f"{emulator.url}/v1"
    assert emulator.url == f"http://127.0.0.1:{emulator.port}"


async def test_emulator_starts_once_and_closes_twice(tmp_path: Path) -> None:
    """start() twice raises; close() twice is harmless."""
    emulator = Emulator(data_dir=tmp_path)
    await emulator.start()
    with pytest.raises(RuntimeError):
        await emulator.start()
    await emulator.close()
    await emulator.close()


async def test_temporary_data_dir_is_removed_on_exit() -> None:
    """With no data_dir, the emulator's temporary directory is gone after `async with`."""
    async with Emulator() as emulator:
        data_dir = emulator.data_dir
        assert data_dir.is_dir()
    assert not data_dir.exists()


async def test_bad_settings_are_refused() -> None:
    """Negative latency, a zero time factor or an unknown engine raise ValueError up front."""
    with pytest.raises(ValueError):
        Emulator(latency=-1)
    with pytest.raises(ValueError):
        Emulator(time_factor=0)
    with pytest.raises(ValueError):
        Emulator(engine="magic")
    with pytest.raises(ValueError):
        Emulator(engine="openai")


async def test_graceful_restart_resumes_a_job(make_emulator: MakeEmulator, tmp_path: Path) -> None:
    """Closing mid-job and starting again on the same data dir finishes the job, no row twice."""
    data_dir = tmp_path / "shared"
    first = await make_emulator(data_dir=data_dir, latency=0.005, concurrency=4)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as session:
        api = RawAPI(session, first.base_url)
        job = await api.submit(chat_file(300))
        while (await api.json("GET", f"/batches/{job['id']}"))["progress"] < 10:
            pass
        await first.close()
        second = await make_emulator(data_dir=data_dir, latency=0.005, concurrency=4)
        api = RawAPI(session, second.base_url)
        done = await api.wait_for(job["id"])
        rows = await api.rows(done["output_file_id"])
    assert done["status"] == "COMPLETED"
    assert sorted(row["custom_id"] for row in rows) == sorted(f"request-{i}" for i in range(300))
