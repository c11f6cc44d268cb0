"""Workload 2 (upload time and peak RSS growth) and the upload half of workload 5 (loop stalls).

One child per contender uploads the same batch file to a fresh emulator (a fresh one, because the
API answers a repeated checksum with 409 and no body would be sent), with a 1 ms ticker running,
after one tiny warm-up upload (lazy imports and worker threads are then paid for, as in a
long-running program).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import _raw
from benchmarks._child import child_parser, host_of
from benchmarks._harness import LoopStallMeter, PeakRSS, cpu_and_wall, emit_result

CONTENDERS = ("ours-check", "ours-nocheck", "raw", "official")


Upload = Callable[[Path], Awaitable[str]]


async def _prepare(contender: str, stack: AsyncExitStack, base_url: str, api_key: str) -> Upload:
    """Import the contender's library and open its client, outside the measured block.

    A long-running program pays for imports and client construction once, not per upload.
    """
    if contender == "raw":
        session = await stack.enter_async_context(aiohttp.ClientSession())

        async def raw_upload(path: Path) -> str:
            answer = await _raw.upload_file(session, base_url, api_key, path)
            return str(answer["id"])

        return raw_upload
    if contender.startswith("ours"):
        from together_async import AsyncTogether

        ours = await stack.enter_async_context(AsyncTogether(api_key, base_url=base_url))
        check = contender == "ours-check"

        async def ours_upload(path: Path) -> str:
            uploaded = await ours.files.upload(path, purpose="batch-api", check=check)
            return uploaded.id

        return ours_upload
    import together

    official = await stack.enter_async_context(
        together.AsyncTogether(api_key=api_key, base_url=host_of(base_url))
    )
    _ = official.files  # the SDK imports its resources on first access

    async def official_upload(path: Path) -> str:
        # check=False: like the rest, measure the transfer; its checker is timed in workload 3.
        response = await official.files.upload(path, purpose="batch-api", check=False)
        return response.id

    return official_upload


_WARM_UP_LINE = (
    b'{"custom_id":"warm-up","method":"POST","url":"/v1/chat/completions",'
    b'"body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}\n'
)


async def _warm_up(upload: Upload, scratch: Path) -> None:
    """One tiny upload before the clock starts: lazy imports (anyio loads its backend and
    file API on first use), worker threads and the connection pool are then ready, as in a
    long-running program; the calls workload warms up the same way."""
    tiny = scratch / "warm-up.jsonl"
    await asyncio.to_thread(tiny.write_bytes, _WARM_UP_LINE)
    await upload(tiny)


async def measure(contender: str, base_url: str, api_key: str, path: Path) -> dict[str, Any]:
    """Upload `path` once, with the RSS and loop-stall meters running."""
    stalls = LoopStallMeter()
    async with AsyncExitStack() as stack:
        upload = await _prepare(contender, stack, base_url, api_key)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-upload-")))
        await _warm_up(upload, scratch)
        with PeakRSS() as rss:
            async with stalls.running():
                with cpu_and_wall() as figures:
                    file_id = await upload(path)
    size = await asyncio.to_thread(lambda: path.stat().st_size)
    return {
        "file_id": file_id,
        "bytes": size,
        "wall_s": figures["wall_s"],
        "cpu_s": figures["cpu_s"],
        "mb_per_s": size / 1e6 / figures["wall_s"],
        "rss_growth": rss.growth,
        "max_stall_s": stalls.longest,
    }


def main() -> None:
    parser = child_parser(__doc__ or "", CONTENDERS)
    parser.add_argument("--file", type=Path, required=True)
    args = parser.parse_args()
    emit_result(asyncio.run(measure(args.contender, args.base_url, args.api_key, args.file)))


if __name__ == "__main__":
    main()
