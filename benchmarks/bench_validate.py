"""Batch-file validation speed: check_batch_file against a bare orjson.loads loop over the lines.

    python -m benchmarks.bench_validate            # 50,000 lines of ~2 KB (~100 MB)
    python -m benchmarks.bench_validate --quick    # 5,000 lines (~10 MB)

Target: the validator runs at >= 0.5x the speed of the bare loop (the faster of the two shown).
The input is generated once into benchmarks/.work/ and reused. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import orjson

from benchmarks._data import write_chat_batch_file
from together_async._jsonl import CHUNK_SIZE, check_batch_chunks, check_batch_file

WORK_DIR = Path(__file__).resolve().parent / ".work"
TARGET_RATIO = 0.5
ENDPOINT = "/v1/chat/completions"


def bare_loop_file_iteration(path: Path) -> None:
    """orjson.loads on every line, lines from Python's buffered `for line in file`."""
    loads = orjson.loads
    with path.open("rb") as file:
        for line in file:
            loads(line)


def bare_loop_chunks(path: Path) -> None:
    """orjson.loads on every line, lines cut from 1 MiB chunks with bytes.split."""
    loads = orjson.loads
    pending = b""
    with path.open("rb") as file:
        for chunk in iter(partial(file.read, CHUNK_SIZE), b""):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                loads(line)
    if pending:
        loads(pending)


def validator(path: Path) -> None:
    """check_batch_file, as the CLI and the emulator run it."""
    report = check_batch_file(path, endpoint=ENDPOINT)
    assert report.ok, report.problems


def validator_with_sha256(path: Path) -> None:
    """The upload check: validation and sha256 in one pass, as validate_batch_file runs it."""
    with path.open("rb") as file:
        chunks = iter(partial(file.read, CHUNK_SIZE), b"")
        report = check_batch_chunks(chunks, endpoint=ENDPOINT, sha256=True)
    assert report.ok, report.problems


def sha256_only(path: Path) -> None:
    """Hashing alone, for reference."""
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(partial(file.read, CHUNK_SIZE), b""):
            hasher.update(chunk)


def best_time(run: Callable[[Path], None], path: Path, repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(path)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_traced_memory(run: Callable[[Path], None], path: Path) -> int:
    """Peak Python allocations during one run, in bytes (tracemalloc; slow, so not timed)."""
    tracemalloc.start()
    try:
        run(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def input_file(lines: int, line_bytes: int) -> Path:
    """The generated chat batch file, made on first use."""
    path = WORK_DIR / f"chat-{lines}x{line_bytes}.jsonl"
    if not path.exists():
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} ...", file=sys.stderr)
        write_chat_batch_file(path, lines=lines, line_bytes=line_bytes)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 lines instead of 50,000")
    parser.add_argument("--lines", type=int, help="number of requests in the file")
    parser.add_argument("--line-bytes", type=int, default=2_000, help="bytes per line")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per pass (best kept)")
    args = parser.parse_args(argv)
    lines = args.lines or (5_000 if args.quick else 50_000)
    path = input_file(lines, args.line_bytes)
    size = path.stat().st_size
    path.read_bytes()  # warm the page cache so no pass pays for the disk alone

    passes: list[tuple[str, Callable[[Path], None]]] = [
        ("bare loop: `for line in file` + orjson.loads", bare_loop_file_iteration),
        ("bare loop: 1 MiB chunks + split + orjson.loads", bare_loop_chunks),
        ("check_batch_file", validator),
        ("validation + sha256 in one pass (upload check)", validator_with_sha256),
        ("sha256 alone (reference)", sha256_only),
    ]
    seconds = {name: best_time(run, path, args.repeats) for name, run in passes}
    bare = min(seconds[name] for name, _ in passes[:2])
    ratio = bare / seconds["check_batch_file"]

    print(f"## Batch-file validation: {lines:,} lines, {size / 1e6:.1f} MB")
    print()
    print(
        f"Python {platform.python_version()}, orjson {orjson.__version__}, "
        f"best of {args.repeats} runs, page cache warm. MB = 10^6 bytes."
    )
    print()
    print("| pass | seconds | MB/s | speed vs bare loop |")
    print("|---|---:|---:|---:|")
    for name, _ in passes:
        print(
            f"| {name} | {seconds[name]:.3f} | {size / 1e6 / seconds[name]:,.0f} "
            f"| {bare / seconds[name]:.2f}x |"
        )
    peak = peak_traced_memory(validator, path)
    print()
    print(f"Peak Python allocations during check_batch_file: {peak / 1e6:.1f} MB (tracemalloc).")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"Target: validator >= {TARGET_RATIO}x the faster bare loop: {ratio:.2f}x, {verdict}.")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
