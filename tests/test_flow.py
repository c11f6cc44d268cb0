"""End to end against the in-process emulator: the seed docs' flow (upload -> create_batch ->
get_batch until done -> retrieve_content -> results), and that flow surviving dropped
connections where they hurt most (after a create took effect, mid-download)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from together_async import AsyncTogether, BatchJob, BatchJobStatus
from together_async.emulator import Emulator
from together_async.emulator.faults import Fault, FaultKind

pytestmark = pytest.mark.usefixtures("fast_retries")

CHAT = "/v1/chat/completions"
MakeEmulator = Callable[..., Awaitable[Emulator]]


def seed_docs_requests(count: int) -> bytes:
    """Batch lines in the seed docs' shape (with method and url)."""
    rows = [
        {
            "custom_id": f"request-{index}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": "meta-llama/Llama-3.2-3B-Instruct-Turbo",
                "messages": [{"role": "user", "content": f"What is {index}?"}],
                "max_tokens": 100,
            },
        }
        for index in range(count)
    ]
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


async def until_finished(client: AsyncTogether, batch_id: str, polls: int = 1_000) -> BatchJob:
    """Poll get_batch, as the seed docs do, with a bound instead of forever."""
    for _ in range(polls):
        job = await client.batches.get_batch(batch_id)
        if job.is_terminal:
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batch_id} did not finish within {polls} polls")


def read_rows(path: Path) -> list[Any]:
    """The JSON rows of a downloaded file (blocking: a test helper)."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def test_seed_docs_flow(client: AsyncTogether, emulator: Emulator, tmp_path: Path) -> None:
    """upload -> create_batch -> get_batch until COMPLETED -> retrieve_content -> results."""
    requests_path = tmp_path / "batch_requests.jsonl"
    await asyncio.to_thread(requests_path.write_bytes, seed_docs_requests(20))

    batch_file = await client.files.upload(file=requests_path, purpose="batch-api")
    batch = await client.batches.create_batch(file_id=batch_file.id, endpoint=CHAT)
    assert batch.status in (BatchJobStatus.VALIDATING, BatchJobStatus.IN_PROGRESS)

    completed = await until_finished(client, batch.id)
    assert completed.status == "COMPLETED"
    assert completed.output_file_id

    downloaded = await client.files.retrieve_content(
        id=completed.output_file_id, output=tmp_path / "batch_results.jsonl"
    )
    rows = await asyncio.to_thread(read_rows, downloaded.path)
    assert sorted(row["custom_id"] for row in rows) == sorted(f"request-{i}" for i in range(20))
    assert downloaded.bytes == (await asyncio.to_thread(downloaded.path.stat)).st_size

    results = [result async for result in client.batches.results(completed)]
    assert sorted(result.custom_id for result in results) == sorted(
        row["custom_id"] for row in rows
    )
    assert all(result.ok and result.text for result in results)
    assert emulator.stats.storage_authorization_headers == 0


async def test_create_dropped_after_it_took_effect_makes_one_job(
    client: AsyncTogether, emulator: Emulator
) -> None:
    """The emulator makes the job then resets the connection: still exactly one job."""
    uploaded = await client.files.upload(seed_docs_requests(3))
    emulator.faults.add(
        Fault(kind=FaultKind.RESET, routes=("POST /batches",), times=1, after_effect=True)
    )
    job = await client.batches.create_batch(uploaded.id, CHAT)
    assert emulator.stats.faults_injected["POST", "/batches", "reset"] == 1
    assert emulator.stats.jobs_created[uploaded.id] == 1
    assert [j.id for j in await client.batches.list_batches()] == [job.id]


async def test_download_survives_a_mid_body_reset(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """A content download cut in the middle resumes and gives the exact bytes."""
    data = seed_docs_requests(500)
    uploaded = await client.files.upload(data)
    emulator.faults.add(Fault(kind=FaultKind.RESET, routes=("GET /files/{id}/content",), times=1))
    downloaded = await client.files.retrieve_content(uploaded.id, output=tmp_path / "copy.jsonl")
    assert await asyncio.to_thread(downloaded.path.read_bytes) == data
    assert emulator.stats.faults_injected["GET", "/files/{id}/content", "reset"] == 1
    assert emulator.stats["GET", "/files/{id}/content"] == 2


async def test_uploading_the_same_bytes_twice_reuses_the_file(client: AsyncTogether) -> None:
    """A second upload of identical content gets the first file back (the 409 path)."""
    data = seed_docs_requests(4)
    first = await client.files.upload(data)
    second = await client.files.upload(data)
    assert second.id == first.id
