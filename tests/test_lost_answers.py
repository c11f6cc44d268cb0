"""A request whose first answer was lost after the server acted on it, retried: the retry
finding the work already done is success, not an error (DELETE of a file)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from emulator_helpers import EMULATOR_KEY

from together_async import AsyncTogether, NotFoundError
from together_async.emulator import Emulator
from together_async.emulator.faults import Fault

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("fast_retries")]

MakeEmulator = Callable[..., Awaitable[Emulator]]
LINE = orjson.dumps(
    {"custom_id": "a", "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
)


async def uploaded_file(client: AsyncTogether, tmp_path: Path) -> str:
    """The id of a freshly uploaded one-line batch file."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(LINE + b"\n")
    return (await client.files.upload(path)).id


@pytest.mark.parametrize("kind", ["reset", "error"])
async def test_delete_whose_answer_was_lost_succeeds(
    make_emulator: MakeEmulator, tmp_path: Path, kind: str
) -> None:
    """A DELETE that deleted the file but lost its answer (reset, 5xx) is retried, the retry's
    404 counts as done: deleted=True, and the file is gone."""
    fault = Fault(kind=kind, after_effect=True, times=1, routes=("DELETE /files/{id}",))
    emulator = await make_emulator(faults=[fault])
    async with AsyncTogether(api_key=EMULATOR_KEY, base_url=emulator.base_url) as client:
        file_id = await uploaded_file(client, tmp_path)
        deleted = await client.files.delete(file_id)
        assert (deleted.id, deleted.deleted) == (file_id, True)
        assert emulator.stats["DELETE", "/files/{id}"] == 2
        with pytest.raises(NotFoundError):
            await client.files.retrieve(file_id)


async def test_delete_of_a_missing_file_is_not_found(emulator: Emulator) -> None:
    """A 404 on the first DELETE is NotFoundError: nothing says this call deleted it."""
    async with AsyncTogether(api_key=EMULATOR_KEY, base_url=emulator.base_url) as client:
        with pytest.raises(NotFoundError):
            await client.files.delete("file-never-was")
