"""Retries are told through the library's logger with context (the call, what failed, the
wait), never as bare `stamina.retry_scheduled` lines; a program that configured no logging
sees nothing on stderr; a wrong base URL path is named as the likely cause of 404s."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import stamina

from together_async import AsyncTogether, NotFoundError
from together_async.emulator import Emulator
from together_async.emulator.faults import Fault

pytestmark = pytest.mark.usefixtures("fast_retries")


async def test_a_retry_is_logged_with_the_call_the_failure_and_the_wait(
    make_emulator: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Two 503s then success: two INFO records on together_async.client naming the route,
    the failure and the wait; no stamina.retry_scheduled record."""
    emulator: Emulator = await make_emulator(  # type: ignore[operator]
        faults=[Fault(kind="error", status=503, times=2, routes=("GET /batches",))]
    )
    with caplog.at_level(logging.DEBUG):
        async with AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url) as client:
            await client.batches.list_batches()
    retries = [r for r in caplog.records if hasattr(r, "together_retry")]
    assert [r.together_retry[:2] for r in retries] == [(1, 5), (2, 5)]
    assert all(r.name == "together_async.client" and r.levelno == logging.INFO for r in retries)
    assert "GET /v1/batches" in retries[0].getMessage() and " in " in retries[0].getMessage()
    assert not [r for r in caplog.records if r.getMessage() == "stamina.retry_scheduled"]


def test_an_application_own_stamina_retries_still_log(caplog: pytest.LogCaptureFixture) -> None:
    """The filter drops only the client's retries: the application's own stamina retry is
    still logged by stamina."""
    calls = 0

    @stamina.retry(on=ValueError, attempts=2)
    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("once")

    with caplog.at_level(logging.DEBUG):
        flaky()
    assert [r for r in caplog.records if r.getMessage() == "stamina.retry_scheduled"]


def test_a_program_without_logging_prints_nothing_on_retries() -> None:
    """A script that configured no logging, retried twice, writes nothing to stderr."""
    script = textwrap.dedent(
        """
        import asyncio
        from together_async import AsyncTogether
        from together_async.emulator import Emulator
        from together_async.emulator.faults import Fault

        async def main():
            fault = Fault(kind="error", status=503, times=2, routes=("GET /batches",))
            async with Emulator(faults=[fault]) as emu:
                async with AsyncTogether(api_key=emu.api_key, base_url=emu.base_url) as c:
                    await c.batches.list_batches()
            print("done")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done" and done.stderr == ""


@pytest.mark.parametrize("path", ["/v2", "/api"])
async def test_404_on_a_collection_route_blames_the_base_url(emulator: Emulator, path: str) -> None:
    """GET /files answered 404 (the base URL's path is wrong) says so and how to fix it."""
    base = emulator.base_url.rsplit("/v1", 1)[0] + path
    async with AsyncTogether(api_key=emulator.api_key, base_url=base) as client:
        with pytest.raises(NotFoundError, match=r"base URL's path is probably wrong") as caught:
            await client.files.list()
    assert "Together's is https://api.together.ai/v1" in str(caught.value)
    assert (
        f"went to 127.0.0.1:{emulator.base_url.rsplit(':', 1)[1].split('/')[0]}{path}/files"
        in str(caught.value)
    )


async def test_404_for_an_id_does_not_blame_the_base_url(client: AsyncTogether) -> None:
    """A missing file's 404 is just not found: no base-URL hint."""
    with pytest.raises(NotFoundError) as caught:
        await client.files.retrieve("file-00000000-0000-4000-8000-000000000000")
    assert "base URL" not in str(caught.value)


def test_cli_connection_error_hints_at_the_base_url() -> None:
    """The CLI words a connection failure with where to look: --base-url, the env, --emulator."""
    from together_async import APIConnectionError, APITimeoutError
    from together_async.cli import _hint

    text = _hint(APIConnectionError("GET http://127.0.0.1:9/v1/batches: connection refused"))
    assert "127.0.0.1:9" in text and "--base-url / TOGETHER_BASE_URL" in text
    assert "--base-url" not in _hint(APITimeoutError("GET http://h/v1/batches: no data for 60 s"))
