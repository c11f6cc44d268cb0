"""Plumbing shared by the benchmarks: child processes, peak-RSS and loop-stall meters, the emulator.

Each contender runs in its own Python process (so one contender's allocations, imports and caches
cannot colour another's memory figure); the child prints one JSON result line that the runner reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

RESULT_MARKER = "BENCH-RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent


# --- inside a child process -------------------------------------------------------------------


class PeakRSS:
    """Peak resident-set growth over a block, in bytes, measured inside the process doing the work.

    The kernel's high-water mark (getrusage) is exact but only useful when the block pushes it
    higher than it already was; a sampling thread (every 5 ms) covers the case where it doesn't.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._sampled_peak = 0
        self.baseline = 0
        self.growth = 0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._process.memory_info().rss
            if rss > self._sampled_peak:
                self._sampled_peak = rss

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.baseline = self._process.memory_info().rss
        self._sampled_peak = self.baseline
        self._kernel_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = kernel_peak if kernel_peak > self._kernel_peak_before else self._sampled_peak
        self.growth = max(0, max(peak, self._sampled_peak) - self.baseline)


class LoopStallMeter:
    """The worst lateness of a 1 ms ticker, i.e. the event loop's longest stall, in seconds."""

    def __init__(self, tick: float = 0.001) -> None:
        self._tick = tick
        self.longest = 0.0
        self.ticks = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._tick
            await asyncio.sleep(self._tick)
            lateness = loop.time() - due
            self.ticks += 1
            if lateness > self.longest:
                self.longest = lateness

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopStallMeter]:
        """Run the ticker for the duration of the block."""
        task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.contextmanager
def cpu_and_wall() -> Iterator[dict[str, float]]:
    """Wall seconds and process CPU seconds (all threads) spent in the block."""
    figures: dict[str, float] = {}
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield figures
    finally:
        figures["wall_s"] = time.perf_counter() - wall_start
        figures["cpu_s"] = time.process_time() - cpu_start


def emit_result(result: dict[str, Any]) -> None:
    """Hand a child's result to the runner (one marked JSON line on stdout)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


# --- in the runner ----------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A benchmark child process exited non-zero or printed no result."""


def run_child(module: str, args: Sequence[str], *, timeout: float = 1800.0) -> dict[str, Any]:
    """Run `python -m module args...` from the repository root and return its result dict."""
    command = [sys.executable, "-m", module, *args]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER) and completed.returncode == 0:
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return result
    tail = (completed.stderr or completed.stdout)[-3000:]
    raise ChildFailed(f"{' '.join(command[1:])} exited {completed.returncode}:\n{tail}")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmulatorProcess:
    """The project's emulator in its own process: its CPU and memory never count for a client."""

    API_KEY = "bench-key"

    def __init__(self, data_dir: Path | None = None) -> None:
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="bench-emulator-")
            data_dir = Path(self._own_dir.name)
        self.data_dir = data_dir
        self.port = free_port()
        self.host_url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.host_url + "/v1"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EmulatorProcess:
        env = {**os.environ, "TOGETHER_API_KEY": self.API_KEY}
        command = [
            sys.executable,
            "-m",
            "together_async.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--api-key",
            self.API_KEY,
        ]
        self._log = open(self.data_dir / "emulator.log", "wb")  # closed in __exit__
        self._process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ready(timeout=30.0)
        return self

    def _wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(
            self.base_url + "/batches", headers={"Authorization": f"Bearer {self.API_KEY}"}
        )
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ChildFailed(
                    f"the emulator exited {self._process.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(request, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise ChildFailed(f"the emulator did not answer within {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        """The end of the emulator's log, for error messages."""
        try:
            return (self.data_dir / "emulator.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
        if self._own_dir is not None:
            self._own_dir.cleanup()

    def child_args(self) -> list[str]:
        """The arguments that point a benchmark child at this emulator."""
        return ["--base-url", self.base_url, "--api-key", self.API_KEY]
