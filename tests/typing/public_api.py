"""The public API as users write it, checked by `mypy --strict` (tests/test_typing.py).

Never run: it is read by the type checker only. A line marked `# type: ignore[...]` must be
an error (mypy runs with --warn-unused-ignores), so a typo'd endpoint literal that stopped
failing would fail the test.
"""

from __future__ import annotations

import contextlib
from typing import assert_type

from together_async import (
    AsyncTogether,
    BatchEndpoint,
    BatchJob,
    BatchJobStatus,
    BatchResult,
    DownloadedFile,
    FileDeleteResponse,
    FileList,
    FileObject,
    gather_batches,
    stream_batches,
)


async def basic_flow(client: AsyncTogether) -> None:
    uploaded = await client.files.upload("requests.jsonl")
    assert_type(uploaded, FileObject)
    job = await client.batches.create_batch(uploaded.id, "/v1/chat/completions")
    assert_type(job, BatchJob)
    job = await client.batches.create_batch(uploaded.id, BatchEndpoint.CHAT_COMPLETIONS)
    await client.batches.create_batch(uploaded.id, "/v1/chat/completion")  # type: ignore[arg-type]
    await client.batches.create(uploaded.id, "chat/completions")  # type: ignore[arg-type]
    done = await client.batches.wait(job.id)
    assert_type(done, BatchJob)
    if done.status == "completed" or done.status == BatchJobStatus.COMPLETED:
        async for result in client.batches.results(done):
            assert_type(result, BatchResult)
    async for update in client.batches.stream_status(job.id):
        assert_type(update, BatchJob)


async def files(client: AsyncTogether) -> None:
    listing = await client.files.list()
    assert_type(listing, FileList)
    for file in listing:
        assert_type(file, FileObject)
    assert_type(listing[0], FileObject)
    assert_type(await client.files.retrieve("file-1"), FileObject)
    assert_type(await client.files.retrieve_content("file-1", output="out.jsonl"), DownloadedFile)
    assert_type(await client.files.delete("file-1"), FileDeleteResponse)
    async with contextlib.aclosing(client.files.iter_bytes("file-1")) as chunks:
        async for chunk in chunks:
            assert_type(chunk, bytes)


async def datasets(client: AsyncTogether) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    results = await gather_batches(client, rows, model="m", endpoint="/v1/chat/completions")
    assert_type(results, list[BatchResult])
    await gather_batches(client, rows, endpoint="/v1/chat")  # type: ignore[arg-type]
    async with contextlib.aclosing(stream_batches(client, "requests.jsonl")) as stream:
        async for result in stream:
            assert_type(result, BatchResult)


async def lifecycle() -> None:
    async with AsyncTogether() as client:
        assert_type(client, AsyncTogether)
    await client.aclose()
