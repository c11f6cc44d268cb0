"""Emulator throughput: one batch job of chat requests on the echo engine with zero latency.

    python -m benchmarks.bench_emulator            # 50,000 requests of ~500 bytes
    python -m benchmarks.bench_emulator --quick    # 5,000 requests

The emulator runs in this process; the file goes through the real upload flow over loopback,
then the job is created and polled over HTTP like any client would. The rate is taken from the
job's own timestamps (created_at -> completed_at), so it includes validation and the durable
commits of the results. Target: >= 20,000 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks._data import write_chat_batch_file
from together_async.emulator import Emulator

TARGET_RATE = 20_000.0
ENDPOINT = "/v1/chat/completions"


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


async def _upload(session: aiohttp.ClientSession, base_url: str, path: Path) -> str:
    form = {
        "purpose": "batch-api",
        "file_name": path.name,
        "file_type": "jsonl",
        "checksum": await asyncio.to_thread(_sha256, path),
    }
    async with session.post(f"{base_url}/files", data=form, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
        file_id = response.headers["X-Together-File-Id"]
    size = (await asyncio.to_thread(path.stat)).st_size
    body = await asyncio.to_thread(path.open, "rb")
    try:
        # A separate session: the storage URL is another origin and gets no Authorization.
        async with (
            aiohttp.ClientSession() as storage,
            storage.put(location, data=body, headers={"Content-Length": str(size)}) as response,
        ):
            assert response.status == 200, await response.text()
    finally:
        await asyncio.to_thread(body.close)
    async with session.post(f"{base_url}/files/{file_id}/preprocess") as response:
        assert response.status == 200, await response.text()
    return file_id


async def run_job(path: Path, rows: int) -> dict[str, Any]:
    """Upload `path`, run it as one job, and return the job and the measured figures."""
    async with (
        Emulator() as emulator,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {emulator.api_key}"}) as session,
    ):
        file_id = await _upload(session, emulator.base_url, path)
        started = time.perf_counter()
        async with session.post(
            f"{emulator.base_url}/batches", json={"input_file_id": file_id, "endpoint": ENDPOINT}
        ) as response:
            assert response.status == 201, await response.text()
            job_id = (await response.json())["job"]["id"]
        while True:
            async with session.get(f"{emulator.base_url}/batches/{job_id}") as response:
                job = orjson.loads(await response.read())
            if job["status"] in ("COMPLETED", "FAILED", "CANCELLED", "EXPIRED"):
                break
            await asyncio.sleep(0.02)
        polled = time.perf_counter() - started
        assert job["status"] == "COMPLETED", job
        async with session.get(
            f"{emulator.base_url}/files/{job['output_file_id']}/content"
        ) as response:
            output_lines = (await response.read()).count(b"\n")
        assert output_lines == rows, (output_lines, rows)
        job_seconds = _parse_time(job["completed_at"]) - _parse_time(job["created_at"])
        return {"job": job, "job_seconds": job_seconds, "polled_seconds": polled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 requests instead of 50,000")
    parser.add_argument("--requests", type=int, help="number of requests in the job")
    parser.add_argument("--line-bytes", type=int, default=500, help="bytes per request line")
    args = parser.parse_args(argv)
    rows = args.requests or (5_000 if args.quick else 50_000)
    with tempfile.TemporaryDirectory(prefix="bench-emulator-input-") as scratch:
        path = Path(scratch) / f"chat-{rows}.jsonl"
        size = write_chat_batch_file(path, lines=rows, line_bytes=args.line_bytes)
        result = asyncio.run(run_job(path, rows))
    seconds = result["job_seconds"]
    rate = rows / seconds
    verdict = "met" if rate >= TARGET_RATE else "NOT met"
    print(f"## Emulator throughput: one job of {rows:,} chat requests, echo engine, no latency")
    print()
    print(f"Input {size / 1e6:.1f} MB; Python {platform.python_version()}; {platform.machine()}.")
    print()
    print("| requests | job seconds (created -> completed) | requests/s | seen by a 20 ms poller |")
    print("|---:|---:|---:|---:|")
    print(f"| {rows:,} | {seconds:.2f} | {rate:,.0f} | {result['polled_seconds']:.2f} s |")
    print()
    print(f"Target: >= {TARGET_RATE:,.0f} requests/s: {rate:,.0f}/s, {verdict}.")
    return 0 if rate >= TARGET_RATE else 1


if __name__ == "__main__":
    sys.exit(main())
