"""Workload 6, our side: a whole dataset through gather_batches or stream_batches, end to end.

    python -m benchmarks.bench_gather            # 1,000,000 chat requests, both functions
    python -m benchmarks.bench_gather --quick    # 50,000 requests

Standalone, it writes the input file, then for each of gather_batches and stream_batches starts a
fresh emulator in its own process (echo engine, no latency: its CPU and memory never count for
ours) and runs the function in a child process of its own, with the peak-RSS meter and a 1 ms
loop ticker on, and prints a markdown table. The target: stream_batches peaks at 400 MB at most.

With `--contender ours` it is that child (also what `python -m benchmarks` runs for workload 6).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._child import child_parser
from benchmarks._harness import (
    ChildFailed,
    EmulatorProcess,
    LoopStallMeter,
    PeakRSS,
    cpu_and_wall,
    emit_result,
    run_child,
)

FULL_REQUESTS = 1_000_000
QUICK_REQUESTS = 50_000
LINE_BYTES = 300
STREAM_RSS_TARGET = 400 * 1024 * 1024
MODES = ("gather", "stream")


# --- the child ---------------------------------------------------------------------------------


async def run_ours(
    client: Any,
    mode: str,
    input_path: Path,
    shard_lines: int,
    poll_interval: float,
    kept: list[Any],
) -> dict[str, Any]:
    """Every request of `input_path` through gather_batches or stream_batches; count the results.

    gather's results are left in `kept`, so the caller can drop them after the loop ticker has
    stopped: freeing a million results takes a while and is not the library's doing.
    """
    from together_async import BatchRun

    run = BatchRun(
        client,
        input_path,
        max_requests_per_batch=shard_lines,
        poll_interval=poll_interval,
        max_interval=poll_interval,  # polls every poll_interval, as the official script does
    )
    if mode == "gather":
        results = await run.gather()
        rows = len(results)
        ok = sum(1 for result in results if result.ok)
        kept.append(results)
    else:
        rows = ok = 0
        async for result in run.stream():
            rows += 1
            ok += result.ok
    summary = run.summary
    tokens = summary.usage.get("total_tokens")
    return {"rows": rows, "ok": ok, "jobs": summary.jobs, "tokens": tokens}


async def measure(
    mode: str,
    base_url: str,
    api_key: str,
    input_path: Path,
    shard_lines: int,
    poll_interval: float,
) -> dict[str, Any]:
    """Run once with the RSS meter and the loop ticker on (imports and client set up before)."""
    from together_async import AsyncTogether

    stalls = LoopStallMeter()
    kept: list[Any] = []
    async with AsyncTogether(api_key, base_url=base_url) as client:
        await client.batches.list_batches()  # opens the session outside the measured block
        with PeakRSS() as rss:
            async with stalls.running():
                with cpu_and_wall() as figures:
                    outcome = await run_ours(
                        client, mode, input_path, shard_lines, poll_interval, kept
                    )
            kept.clear()
    return {
        **outcome,
        **figures,
        "mode": mode,
        "rss_growth": rss.growth,
        "rss_peak": rss.baseline + rss.growth,
        "loop_stall_s": stalls.longest,
    }


def child_main(argv: list[str]) -> None:
    parser = child_parser(__doc__ or "", ("ours",))
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--shard-lines", type=int, default=50_000)
    parser.add_argument("--mode", choices=MODES, default="gather")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    # gather's temporary run directory goes under the work dir, which the runner removes.
    os.environ["TMPDIR"] = str(args.work_dir)
    tempfile.tempdir = None
    emit_result(
        asyncio.run(
            measure(
                args.mode,
                args.base_url,
                args.api_key,
                args.input,
                args.shard_lines,
                args.poll_interval,
            )
        )
    )


# --- standalone --------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / (1024 * 1024):,.0f} MB"


def standalone_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS:,} requests")
    parser.add_argument("--requests", type=int, help="how many requests (overrides --quick)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    requests = args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS)

    from benchmarks import _data

    scratch = Path(tempfile.mkdtemp(prefix="bench-gather-"))
    try:
        path = scratch / f"requests-{requests}.jsonl"
        print(f"writing {requests:,} requests to {path} ...", file=sys.stderr)
        _data.write_chat_batch_file(path, lines=requests, line_bytes=LINE_BYTES)
        size = path.stat().st_size
        outcomes: dict[str, dict[str, Any] | str] = {}
        for mode in args.modes:
            print(f"running {mode} ...", file=sys.stderr)
            work_dir = scratch / f"work-{mode}"
            with EmulatorProcess() as emulator:
                try:
                    outcomes[mode] = run_child(
                        "benchmarks.bench_gather",
                        [
                            "--contender",
                            "ours",
                            *emulator.child_args(),
                            "--input",
                            str(path),
                            "--work-dir",
                            str(work_dir),
                            "--mode",
                            mode,
                        ],
                        timeout=3 * 3600,
                    )
                except ChildFailed as error:
                    outcomes[mode] = str(error).splitlines()[0]
            shutil.rmtree(work_dir, ignore_errors=True)
        print(_table(requests, size, outcomes))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _table(requests: int, size: int, outcomes: dict[str, dict[str, Any] | str]) -> str:
    lines = [
        f"### {requests:,} chat requests end to end ({_mb(size)} JSONL, shards of 50,000, "
        "echo engine, emulator in its own process)",
        "",
        "| function | result rows | ok | jobs | wall time | requests/s | client CPU "
        "| peak RSS | RSS growth | longest loop stall | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, outcome in outcomes.items():
        name = f"{mode}_batches"
        if isinstance(outcome, str):
            lines.append(f"| {name} | failed: {outcome} |" + " |" * 9)
            continue
        target = "-"
        if mode == "stream":
            met = outcome["rss_peak"] <= STREAM_RSS_TARGET
            target = f"peak <= 400 MB: {'met' if met else 'MISSED'}"
        lines.append(
            f"| {name} | {outcome['rows']:,} | {outcome['ok']:,} | {outcome['jobs']} "
            f"| {outcome['wall_s']:.1f} s | {outcome['rows'] / outcome['wall_s']:,.0f} "
            f"| {outcome['cpu_s']:.1f} s | {_mb(outcome['rss_peak'])} "
            f"| {_mb(outcome['rss_growth'])} | {outcome['loop_stall_s'] * 1000:.0f} ms | {target} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if "--contender" in sys.argv[1:]:
        child_main(sys.argv[1:])
    else:
        standalone_main(sys.argv[1:])
