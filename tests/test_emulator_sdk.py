"""Fidelity: the official `together` SDK (3.x, a test dependency only) drives the emulator
through upload -> create -> retrieve -> list -> cancel -> content, with its strict response
validation on, and gets what it expects. The synchronous SDK runs in a worker thread so the
emulator keeps serving on the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MakeEmulator
from emulator_helpers import chat_file

together = pytest.importorskip("together")

pytestmark = pytest.mark.timeout(120)

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"}


def _client(url: str, api_key: str, *, strict: bool = True) -> Any:
    # The 3.x SDK takes the bare host and adds /v1 itself; strict validation makes it check
    # every answer against its own models.
    return together.Together(
        api_key=api_key, base_url=url, max_retries=0, _strict_response_validation=strict
    )


def _wait(client: Any, job_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.batches.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)  # polling inside the SDK's worker thread, not on the event loop


def _full_flow(url: str, api_key: str, path: Path) -> dict[str, Any]:
    client = _client(url, api_key)
    try:
        uploaded = client.files.upload(file=path, purpose="batch-api", check=False)
        created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions")
        job = created.job
        retrieved = client.batches.retrieve(job.id)
        listed = client.batches.list()
        while not client.batches.retrieve(job.id).progress:
            time.sleep(0.01)  # until some rows are done, so the cancel keeps a partial output
        cancelled = client.batches.cancel(job.id)
        final = _wait(client, job.id)
        content = client.files.content(final.output_file_id).read()
        return {
            "uploaded": uploaded,
            "created": created,
            "retrieved": retrieved,
            "listed": listed,
            "cancelled": cancelled,
            "final": final,
            "content": content,
            "file": client.files.retrieve(uploaded.id),
            "files": _list_files(url, api_key),
        }
    finally:
        client.close()


def _list_files(url: str, api_key: str) -> Any:
    # Not strict: the SDK's FilePurpose literal lacks "batch-generated", which the spec (and
    # so the real service) uses for output files; strict mode rejects any listing holding one.
    client = _client(url, api_key, strict=False)
    try:
        return client.files.list()
    finally:
        client.close()


async def test_official_sdk_full_flow(make_emulator: MakeEmulator, tmp_path: Path) -> None:
    """upload(check=False) -> create -> retrieve -> list -> cancel -> content, all as the SDK
    expects: the wrapped create, the bare retrieve, the array list, partial output kept."""
    emulator = await make_emulator(latency=0.01, concurrency=2)
    path = tmp_path / "batch.jsonl"
    data = chat_file(400)
    await asyncio.to_thread(path.write_bytes, data)
    seen = await asyncio.to_thread(_full_flow, emulator.url, emulator.api_key, path)

    uploaded = seen["uploaded"]
    assert uploaded.id.startswith("file-")
    assert uploaded.bytes == len(data)
    assert uploaded.purpose == "batch-api"
    assert uploaded.file_type == "jsonl"
    job = seen["created"].job
    assert job.status == "VALIDATING"
    assert job.input_file_id == uploaded.id
    assert seen["retrieved"].id == job.id
    assert job.id in [listed.id for listed in seen["listed"]]
    assert seen["cancelled"].status == "CANCELLED"
    final = seen["final"]
    assert final.status == "CANCELLED"
    assert final.completed_at is not None
    rows = [orjson.loads(line) for line in seen["content"].splitlines()]
    assert 0 < len(rows) < 400
    assert all(row["response"]["status_code"] == 200 for row in rows)
    assert seen["file"].id == uploaded.id
    assert uploaded.id in [item.id for item in seen["files"].data]
    assert emulator.stats.storage_authorization_headers == 0


def _complete_flow(url: str, api_key: str, path: Path) -> tuple[Any, bytes, Any]:
    client = _client(url, api_key)
    try:
        uploaded = client.files.upload(file=path, purpose="batch-api", check=False)
        again = client.files.upload(file=path, purpose="batch-api", check=False)
        job = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions").job
        final = _wait(client, job.id)
        return final, client.files.content(final.output_file_id).read(), (uploaded, again)
    finally:
        client.close()


async def test_official_sdk_job_to_completion(make_emulator: MakeEmulator, tmp_path: Path) -> None:
    """A job polled with the SDK reaches COMPLETED; its output parses; re-uploading the same
    file gives back the existing file (the SDK's 409 path)."""
    emulator = await make_emulator()
    path = tmp_path / "small.jsonl"
    await asyncio.to_thread(path.write_bytes, chat_file(25))
    final, content, (uploaded, again) = await asyncio.to_thread(
        _complete_flow, emulator.url, emulator.api_key, path
    )
    assert final.status == "COMPLETED"
    assert final.progress == 100.0
    rows = [orjson.loads(line) for line in content.splitlines()]
    assert sorted(row["custom_id"] for row in rows) == sorted(f"request-{i}" for i in range(25))
    assert again.id == uploaded.id
