"""Workload 1, call overhead: N `get_batch` calls at a fixed concurrency against the emulator.

Run as a child (`python -m benchmarks.bench_calls --contender ours ...`) it measures one contender;
`run()` is the runner's entry point and starts one child per contender.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from benchmarks import _raw
from benchmarks._child import child_parser, host_of
from benchmarks._harness import cpu_and_wall, emit_result

CONTENDERS = ("ours", "raw", "official")


async def _hammer(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> None:
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _measure(
    call: Callable[[], Awaitable[Any]], calls: int, concurrency: int
) -> dict[str, float]:
    # Warm up: open the pool's connections and any lazy state before the clock starts.
    await _hammer(call, concurrency * 2, concurrency)
    with cpu_and_wall() as figures:
        await _hammer(call, calls, concurrency)
    return {
        "calls": calls,
        "calls_per_s": calls / figures["wall_s"],
        "cpu_us_per_call": figures["cpu_s"] / calls * 1e6,
        "wall_s": figures["wall_s"],
    }


async def measure(
    contender: str, base_url: str, api_key: str, batch_id: str, calls: int, concurrency: int
) -> dict[str, float]:
    """Time `calls` retrievals of one batch by one contender."""
    if contender == "raw":
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"{base_url}/batches/{batch_id}"
            return await _measure(lambda: _raw.get_json(session, url, api_key), calls, concurrency)
    if contender == "ours":
        from together_async import AsyncTogether

        async with AsyncTogether(api_key, base_url=base_url) as ours:
            return await _measure(lambda: ours.batches.get_batch(batch_id), calls, concurrency)
    import together

    async with together.AsyncTogether(api_key=api_key, base_url=host_of(base_url)) as official:
        return await _measure(lambda: official.batches.retrieve(batch_id), calls, concurrency)


def main() -> None:
    parser = child_parser(__doc__ or "", CONTENDERS)
    parser.add_argument("--batch-id", required=True)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    emit_result(
        asyncio.run(
            measure(
                args.contender,
                args.base_url,
                args.api_key,
                args.batch_id,
                args.calls,
                args.concurrency,
            )
        )
    )


if __name__ == "__main__":
    main()
