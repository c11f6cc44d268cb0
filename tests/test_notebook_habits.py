"""Notebook habits: a client dropped without aclose() (a cell run again rebinds `client`)
closes its session quietly, and an Emulator never closed leaves no temp directory at exit."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

from together_async import AsyncTogether
from together_async.emulator import Emulator


async def test_a_dropped_client_closes_its_session_without_a_warning(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Rebinding an open client (as re-running a cell does) closes the old session in the
    loop, logged at DEBUG: no "Unclosed client session" warning or error."""
    client = AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url)
    await client.files.list()
    session = weakref.ref(client._own_session)  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG):
        client = AsyncTogether(api_key=emulator.api_key, base_url=emulator.base_url)
        gc.collect()
        for _ in range(1000):  # the close runs as loop callbacks: give the loop a turn
            if (old := session()) is None or old.closed:
                break
            await asyncio.sleep(0)
        gc.collect()
    assert session() is None or session().closed  # type: ignore[union-attr]
    assert "dropped without aclose" in caplog.text
    assert "Unclosed" not in caplog.text
    await client.aclose()


def test_an_emulator_never_closed_leaves_no_directory(tmp_path: Path) -> None:
    """A script that starts an Emulator and never closes it leaves no temp directory."""
    script = textwrap.dedent(
        """
        import asyncio
        from together_async.emulator import Emulator

        async def main():
            emulator = Emulator()
            await emulator.start()
            print(emulator._data_dir, flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    data_dir = Path(done.stdout.strip())
    assert data_dir.name.startswith("together-emulator-")
    assert not data_dir.exists()


async def test_a_closed_emulator_keeps_no_exit_hook(make_emulator: object) -> None:
    """Closing the emulator removes its directory at once and forgets the exit hook."""
    emulator = Emulator()
    await emulator.start()
    data_dir = emulator._data_dir
    await emulator.close()
    assert data_dir is not None and not data_dir.exists()
    assert emulator._remove_at_exit is None
