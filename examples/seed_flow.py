"""The seed docs' basic flow, written for together_async, on the embedded emulator.

Run it as it is (no account needed): `python examples/seed_flow.py`.
To run it against Together, set TOGETHER_API_KEY and pass `--real`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from together_async import AsyncTogether, BatchEndpoint
from together_async.emulator import Emulator

MODEL = "meta-llama/Llama-3.2-3B-Instruct-Turbo"


def write_requests(path: Path) -> None:
    """Two chat requests in the batch input format (one JSON object per line)."""
    questions = ["What is AI?", "Explain machine learning"]
    with path.open("wb") as file:
        for number, question in enumerate(questions, start=1):
            line = {
                "custom_id": f"request-{number}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": 100,
                },
            }
            file.write(orjson.dumps(line) + b"\n")


async def seed_flow(client: AsyncTogether, workdir: Path) -> None:
    """upload -> create_batch -> get_batch (via wait) -> retrieve_content -> results."""
    requests_path = workdir / "batch_requests.jsonl"
    write_requests(requests_path)

    batch_file = await client.files.upload(file=requests_path, purpose="batch-api")
    batch = await client.batches.create_batch(batch_file.id, BatchEndpoint.CHAT_COMPLETIONS)
    print(f"Batch job created: {batch.id}")
    print(f"Status: {batch.status}")

    async for job in client.batches.stream_status(batch.id, poll_interval=0.2, max_interval=5):
        print(f"Status: {job.status} ({job.progress or 0:.0f}%)")
    completed = await client.batches.get_batch(batch.id)

    if completed.status == "COMPLETED" and completed.output_file_id:
        downloaded = await client.files.retrieve_content(
            completed.output_file_id, output=workdir / "batch_results.jsonl"
        )
        print(f"Results downloaded to {downloaded.path} ({downloaded.bytes} bytes)")
    async for result in client.batches.results(completed):
        print(f"{result.custom_id}: ok={result.ok} {(result.text or result.error_message)!r:.80}")


async def main() -> None:
    workdir = Path.cwd()
    if "--real" in sys.argv:
        async with AsyncTogether() as client:
            await seed_flow(client, workdir)
        return
    async with Emulator(latency=0.05) as emu:
        async with AsyncTogether(base_url=emu.base_url, api_key=emu.api_key) as client:
            await seed_flow(client, workdir)


if __name__ == "__main__":
    asyncio.run(main())
