"""Workload 4 (decoding a batch output file into results) and the download half of workload 5.

The output file is made here (`write_output_file`: chat-completion rows of about 2 KB) and stored
on the emulator; each contender streams it back and decodes every row, in its own child, with the
RSS meter and a 1 ms ticker running. `local-orjson` is the ceiling with no network at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import _raw
from benchmarks._child import child_parser, host_of
from benchmarks._harness import LoopStallMeter, PeakRSS, cpu_and_wall, emit_result

CONTENDERS = ("ours", "raw", "official", "local-orjson")

_ANSWER = (
    "Batch inference trades latency for throughput: requests wait in a queue and run when "
    "capacity is free, which is why a batch costs half as much as the same calls made live. "
)


def write_output_file(path: Path, rows: int, *, content_chars: int = 1640) -> int:
    """Write a batch output file of `rows` chat-completion rows; return its size in bytes.

    About one row in fifty is a failed request (status 400), as real output files have some.
    """
    content = (_ANSWER * (content_chars // len(_ANSWER) + 1))[:content_chars]
    with path.open("wb") as file:
        for index in range(rows):
            failed = index % 50 == 49
            body: dict[str, Any]
            if failed:
                body = {"error": {"message": "max_tokens is too large", "type": "invalid_request"}}
            else:
                body = {
                    "id": f"chatcmpl-{index:08d}",
                    "object": "chat.completion",
                    "created": 1_760_000_000 + index,
                    "model": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"{index}: {content}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 412, "completion_tokens": 380, "total_tokens": 792},
                }
            row = {
                "id": f"batch_req_{index:08d}",
                "custom_id": f"request-{index}",
                "response": {"status_code": 400 if failed else 200, "body": body},
                "error": None,
            }
            file.write(orjson.dumps(row) + b"\n")
        return file.tell()


Decode = Callable[[], Awaitable[int]]


async def _prepare(
    contender: str, stack: AsyncExitStack, base_url: str, api_key: str, file_id: str, path: Path
) -> Decode:
    """Import the contender's library and open its client, outside the measured block."""
    if contender == "local-orjson":

        async def local_loop() -> int:
            # The ceiling: the file from local disk in 1 MiB chunks, one orjson.loads a line.
            # Deliberately synchronous (it never yields to the loop): nothing but the decoding.
            rows = 0
            with path.open("rb") as file:
                pending = b""
                while chunk := file.read(_raw.CHUNK):
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        if line:
                            orjson.loads(line)
                            rows += 1
            return rows

        return local_loop
    if contender == "raw":
        session = await stack.enter_async_context(aiohttp.ClientSession())

        async def raw_loop() -> int:
            rows = 0
            async for line in _raw.iter_content_lines(session, base_url, api_key, file_id):
                orjson.loads(line)
                rows += 1
            return rows

        return raw_loop
    if contender == "ours":
        from together_async import AsyncTogether, BatchJob, BatchJobStatus

        ours = await stack.enter_async_context(AsyncTogether(api_key, base_url=base_url))
        job = BatchJob(id="bench-results", status=BatchJobStatus.COMPLETED, output_file_id=file_id)

        async def ours_results() -> int:
            rows = 0
            async for _result in ours.batches.results(job):
                rows += 1
            return rows

        return ours_results
    import together

    official = await stack.enter_async_context(
        together.AsyncTogether(api_key=api_key, base_url=host_of(base_url))
    )
    _ = official.files  # the SDK imports its resources on first access

    async def official_script() -> int:
        # What a user of the SDK writes: stream the content, json.loads each line.
        rows = 0
        async with official.files.with_streaming_response.content(file_id) as response:
            async for line in response.iter_lines():
                if line:
                    json.loads(line)
                    rows += 1
        return rows

    return official_script


async def measure(
    contender: str, base_url: str, api_key: str, file_id: str, path: Path
) -> dict[str, Any]:
    """Decode every row of the stored output file once, with the RSS and loop-stall meters."""
    stalls = LoopStallMeter()
    async with AsyncExitStack() as stack:
        decode = await _prepare(contender, stack, base_url, api_key, file_id, path)
        with PeakRSS() as rss:
            async with stalls.running():
                with cpu_and_wall() as figures:
                    rows = await decode()
    size = await asyncio.to_thread(lambda: path.stat().st_size)
    return {
        "rows": rows,
        "bytes": size,
        "wall_s": figures["wall_s"],
        "cpu_s": figures["cpu_s"],
        "rows_per_s": rows / figures["wall_s"],
        "rss_growth": rss.growth,
        # The local loop never yields to the event loop: a stall figure would mean nothing.
        "max_stall_s": None if contender == "local-orjson" else stalls.longest,
    }


def main() -> None:
    parser = child_parser(__doc__ or "", CONTENDERS)
    parser.add_argument("--file-id", required=True)
    parser.add_argument("--file", type=Path, required=True, help="the same file, on local disk")
    args = parser.parse_args()
    emit_result(
        asyncio.run(measure(args.contender, args.base_url, args.api_key, args.file_id, args.file))
    )


if __name__ == "__main__":
    main()
