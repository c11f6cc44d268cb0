"""Workload 6, the official SDK's side: a dataset pushed through batches the straightforward way.

The script a user of `together` 3.x would write, since the SDK has no sharding or wait helper:
split the input file into shards of 50,000 lines, then for every shard at once (asyncio.gather)
upload, create the job, poll it until it ends, download its output and error files and read
every result line with json.loads (ours hands every result to the caller too).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Final

import together

from benchmarks._child import child_parser, host_of
from benchmarks._harness import LoopStallMeter, PeakRSS, cpu_and_wall, emit_result

ENDPOINT: Final = "/v1/chat/completions"
TERMINAL = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})


def write_shards(input_path: Path, directory: Path, shard_lines: int) -> list[Path]:
    """Cut the input file into files of `shard_lines` lines."""
    shards: list[Path] = []
    shard = None
    try:
        with input_path.open("rb") as source:
            for index, line in enumerate(source):
                if index % shard_lines == 0:
                    if shard is not None:
                        shard.close()
                    shards.append(directory / f"shard-{len(shards):04d}.jsonl")
                    shard = shards[-1].open("wb")
                assert shard is not None
                shard.write(line)
    finally:
        if shard is not None:
            shard.close()
    return shards


def read_results(path: Path) -> int:
    """Read every result line of a downloaded file, as a plain script does; return the count."""
    rows = 0
    with path.open("rb") as file:
        for line in file:
            if line.strip():
                json.loads(line)
                rows += 1
    return rows


async def run_official(
    base_url: str, api_key: str, input_path: Path, work_dir: Path, shard_lines: int, poll: float
) -> dict[str, Any]:
    """Push every line of `input_path` through batch jobs; count the result rows that come back."""
    shards = write_shards(input_path, work_dir, shard_lines)
    async with together.AsyncTogether(api_key=api_key, base_url=host_of(base_url)) as client:

        async def one_shard(shard: Path) -> tuple[int, str]:
            uploaded = await client.files.upload(shard, purpose="batch-api", check=False)
            created = await client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT)
            job = created.job
            assert job is not None and job.id is not None
            while job.status not in TERMINAL:
                await asyncio.sleep(poll)
                job = await client.batches.retrieve(job.id)
            rows = 0
            for file_id in (job.output_file_id, job.error_file_id):
                if not file_id:
                    continue
                target = shard.with_suffix(f".{file_id}.out")
                async with client.files.with_streaming_response.content(file_id) as response:
                    await response.stream_to_file(target)
                rows += read_results(target)
            return rows, str(job.status)

        outcomes = await asyncio.gather(*(one_shard(shard) for shard in shards))
    statuses = sorted({status for _, status in outcomes})
    return {"rows": sum(rows for rows, _ in outcomes), "shards": len(shards), "statuses": statuses}


async def measure(
    base_url: str, api_key: str, input_path: Path, work_dir: Path, shard_lines: int, poll: float
) -> dict[str, Any]:
    """Run the script once with the RSS meter and the loop ticker on."""
    stalls = LoopStallMeter()
    with PeakRSS() as rss:
        async with stalls.running():
            with cpu_and_wall() as figures:
                outcome = await run_official(
                    base_url, api_key, input_path, work_dir, shard_lines, poll
                )
    return {
        **outcome,
        **figures,
        "rss_growth": rss.growth,
        "rss_peak": rss.baseline + rss.growth,
        "loop_stall_s": stalls.longest,
    }


def main() -> None:
    # Imported and its lazy resources loaded up front: a program pays for that once, at start.
    together.AsyncTogether(api_key="preload", base_url="http://127.0.0.1:9").files  # noqa: B018
    parser = child_parser(__doc__ or "", ("official",))
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--shard-lines", type=int, default=50_000)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    emit_result(
        asyncio.run(
            measure(
                args.base_url,
                args.api_key,
                args.input,
                args.work_dir,
                args.shard_lines,
                args.poll_interval,
            )
        )
    )


if __name__ == "__main__":
    main()
