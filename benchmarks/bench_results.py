"""Workload 4 (decoding a batch output file into results) and the download half of workload 5.

The output file is made here (`write_output_file`: chat-completion rows of about 2 KB) and stored
on the emulator; each contender streams it back and decodes every row, in its own child, with the
RSS meter and a 1 ms ticker running. `local-orjson` is the ceiling with no network at all.
"""

from __future__ import annotations

import asyncio
import json
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


async def _decode(contender: str, base_url: str, api_key: str, file_id: str, path: Path) -> int:
    rows = 0
    if contender == "local-orjson":
        # The ceiling: the same file from local disk, read in 1 MiB chunks, one orjson.loads a line.
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
    if contender == "raw":
        async with aiohttp.ClientSession() as session:
            async for line in _raw.iter_content_lines(session, base_url, api_key, file_id):
                orjson.loads(line)
                rows += 1
        return rows
    if contender == "ours":
        from together_async import AsyncTogether, BatchJob, BatchJobStatus

        job = BatchJob(id="bench-results", status=BatchJobStatus.COMPLETED, output_file_id=file_id)
        async with AsyncTogether(api_key, base_url=base_url) as ours:
            async for _result in ours.batches.results(job):
                rows += 1
        return rows
    import together

    # The straightforward script with the official SDK: stream the content, json.loads each line.
    async with together.AsyncTogether(api_key=api_key, base_url=host_of(base_url)) as official:
        async with official.files.with_streaming_response.content(file_id) as response:
            async for line in response.iter_lines():
                if line:
                    json.loads(line)
                    rows += 1
    return rows


async def measure(
    contender: str, base_url: str, api_key: str, file_id: str, path: Path
) -> dict[str, Any]:
    """Decode every row of the stored output file once, with the RSS and loop-stall meters."""
    stalls = LoopStallMeter()
    with PeakRSS() as rss:
        async with stalls.running():
            with cpu_and_wall() as figures:
                rows = await _decode(contender, base_url, api_key, file_id, path)
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
