"""The `Emulator` (in process: `async with Emulator() as emu`) and the command line around it.

`add_arguments` / `emulator_from_args` / `run_from_args` are shared by
`python -m together_async.emulator` and `together-async serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from aiohttp import web

from .._tempdirs import make_owned_temp_dir, remove_owned_temp_dir
from .app import AppContext, EmulatorStats, build_api_app, build_storage_app
from .engines import Engine, make_engine
from .faults import Fault, FaultInjector, FaultKind
from .jobs import JobRunner, RunnerSettings
from .storage import Storage

__all__ = [
    "Emulator",
    "add_arguments",
    "emulator_from_args",
    "main",
    "run_from_args",
    "serve",
]

logger = logging.getLogger("together_async.emulator")

#: What `emu.api_key` gives when no key is configured (any key is accepted then).
ANY_KEY = "emulator-accepts-any-key"
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
# Longest header field the API port parses; longer ones get aiohttp's plain-text 400.
MAX_HEADER_FIELD = 256 * 1024
API_KEY_ENV = "TOGETHER_EMULATOR_API_KEY"


class Emulator:
    """A local server speaking Together's files and batches API, running jobs for real.

    Example:
        async with Emulator(latency=0.01, time_factor=0.001) as emu:
            async with AsyncTogether(base_url=emu.base_url, api_key=emu.api_key) as client:
                ...

    Args:
        data_dir: where files and job state live; None uses a temporary directory that is
            removed on exit. Restarting on the same directory resumes unfinished jobs.
        api_key: the key every API call must carry as `Authorization: Bearer <key>`;
            None accepts any key.
        host: the interface to listen on (loopback by default).
        port: the API port; 0 picks a free one.
        storage_port: the port of the presigned-upload route (another origin); 0 picks one.
        engine: "echo" (default), "openai" (needs `upstream`), or an `Engine` instance.
        upstream: the OpenAI-compatible base URL for the "openai" engine.
        upstream_api_key: a key for the upstream server, if it wants one.
        latency: simulated seconds per request inside a job.
        concurrency: requests in flight at once per job (for latency or the openai engine).
        time_factor: scales completion windows: 0.001 makes "24h" expire after 86.4 s.
        validation_delay: seconds each job spends in VALIDATING at least.
        faults: `Fault`s to inject into API calls (more can be added via `emu.faults.add`).
        seed: makes faults and output order reproducible.
        max_upload_bytes: largest upload accepted (413 beyond).
        max_lines: most lines in a batch input file (validated during VALIDATING).
        max_file_bytes: most bytes in a batch input file (validated during VALIDATING).
        commit_interval: seconds between durable commits of finished rows.
        shutdown_timeout: seconds given to in-flight calls when the server stops.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_port: int = 0,
        engine: str | Engine = "echo",
        upstream: str | None = None,
        upstream_api_key: str | None = None,
        latency: float = 0.0,
        concurrency: int = 32,
        time_factor: float = 1.0,
        validation_delay: float = 0.0,
        faults: Sequence[Fault] | None = None,
        seed: int = 0,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_lines: int = 50_000,
        max_file_bytes: int = 100 * 1024 * 1024,
        commit_interval: float = 0.25,
        shutdown_timeout: float = 2.0,
    ) -> None:
        if latency < 0 or time_factor <= 0 or validation_delay < 0 or concurrency < 1:
            raise ValueError(
                "latency and validation_delay must be >= 0, time_factor > 0, concurrency >= 1"
            )
        self._requested_data_dir = Path(data_dir) if data_dir is not None else None
        self._api_key = api_key
        self._host = host
        self._port = port
        self._storage_port = storage_port
        self._engine = make_engine(engine, upstream=upstream, upstream_api_key=upstream_api_key)
        self._settings = RunnerSettings(
            concurrency=concurrency,
            latency=latency,
            time_factor=time_factor,
            validation_delay=validation_delay,
            max_lines=max_lines,
            max_bytes=max_file_bytes,
            commit_interval=commit_interval,
            seed=seed,
        )
        self._max_upload_bytes = max_upload_bytes
        self._shutdown_timeout = shutdown_timeout
        self.faults = FaultInjector(faults or (), seed=seed)
        """The fault injector: `emu.faults.add(Fault(...))`, `emu.faults.clear()`."""
        self.stats = EmulatorStats()
        """Counters of what was served (see `EmulatorStats`)."""
        self._data_dir: Path | None = None
        self._temp_dir: Path | None = None
        self._remove_at_exit: Callable[[], None] | None = None
        self._storage: Storage | None = None
        self._runner: JobRunner | None = None
        self._api_runner: web.AppRunner | None = None
        self._storage_runner: web.AppRunner | None = None
        self._state = "new"

    def __repr__(self) -> str:
        where = self.base_url if self._state == "running" else self._state
        return f"<Emulator {where}>"

    # -- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The API base URL, ending in /v1 (e.g. "http://127.0.0.1:8788/v1")."""
        return f"{self.url}/v1"

    @property
    def url(self) -> str:
        """The API host URL without /v1 (the form the official SDK 3.x wants)."""
        return f"http://{_url_host(self._host)}:{self.port}"

    @property
    def storage_url(self) -> str:
        """The origin of the presigned-upload route."""
        return f"http://{_url_host(self._host)}:{self.storage_port}"

    @property
    def api_key(self) -> str:
        """The key to use: the configured one, or a placeholder when any key is accepted."""
        return self._api_key if self._api_key is not None else ANY_KEY

    @property
    def port(self) -> int:
        """The API port (after start)."""
        return _bound_port(self._api_runner)

    @property
    def storage_port(self) -> int:
        """The storage port (after start)."""
        return _bound_port(self._storage_runner)

    @property
    def data_dir(self) -> Path:
        """Where the files and the job state live (after start)."""
        if self._data_dir is None:
            raise RuntimeError("the emulator is not started")
        return self._data_dir

    @property
    def storage(self) -> Storage:
        """The storage layer (after start), for tests that look behind the API."""
        if self._storage is None:
            raise RuntimeError("the emulator is not started")
        return self._storage

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the storage, start both servers, and resume unfinished jobs."""
        if self._state != "new":
            raise RuntimeError(f"an emulator can be started once (it is {self._state})")
        self._state = "starting"
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        self._state = "running"

    async def _start(self) -> None:
        if self._requested_data_dir is None:
            # Named for this process: the next emulator removes it if this one is killed.
            self._temp_dir = await asyncio.to_thread(make_owned_temp_dir, "together-emulator")
            self._data_dir = self._temp_dir
            # An emulator never closed (a notebook's, say) leaves no directory behind when the
            # interpreter exits. Only at exit: a collected but still running emulator's jobs
            # may still be writing there.
            self._remove_at_exit = functools.partial(shutil.rmtree, self._temp_dir, True)
            atexit.register(self._remove_at_exit)
        else:
            self._data_dir = self._requested_data_dir
        self._storage = Storage(self._data_dir)
        await self._storage.open()
        await self._engine.start()
        self._runner = JobRunner(self._storage, self._engine, self._settings)
        context = AppContext(
            storage=self._storage,
            runner=self._runner,
            stats=self.stats,
            faults=self.faults,
            api_key=self._api_key,
            max_upload_bytes=self._max_upload_bytes,
        )
        access_log = logging.getLogger("together_async.emulator.access")
        self._storage_runner = web.AppRunner(
            build_storage_app(context),
            access_log=access_log,
            shutdown_timeout=self._shutdown_timeout,
        )
        await self._storage_runner.setup()
        await web.TCPSite(self._storage_runner, self._host, self._storage_port).start()
        context.storage_port = self.storage_port
        self._api_runner = web.AppRunner(
            build_api_app(context),
            access_log=access_log,
            shutdown_timeout=self._shutdown_timeout,
            # Room for a long header (a 100 kB multipart boundary) to reach the routes, which
            # refuse it in the API's error shape; aiohttp's own refusal is plain text.
            max_field_size=MAX_HEADER_FIELD,
        )
        await self._api_runner.setup()
        await web.TCPSite(self._api_runner, self._host, self._port).start()
        await self._runner.start()
        logger.info(
            "Together API emulator at %s (storage %s), data in %s, engine %r",
            self.base_url,
            self.storage_url,
            self._data_dir,
            self._engine,
        )
        if self._api_key is None:
            logger.info("no API key configured: any key is accepted")

    async def close(self) -> None:
        """Stop the servers and the jobs (they resume on a restart); safe to call twice."""
        if self._state == "closed":
            return
        self._state = "closed"
        for app_runner in (self._api_runner, self._storage_runner):
            if app_runner is not None:
                await app_runner.cleanup()
        if self._runner is not None:
            await self._runner.close()
        await self._engine.aclose()
        if self._storage is not None:
            await self._storage.close()
        if self._temp_dir is not None:
            await asyncio.to_thread(remove_owned_temp_dir, self._temp_dir)
            if self._remove_at_exit is not None:
                atexit.unregister(self._remove_at_exit)
                self._remove_at_exit = None

    async def wait_idle(self) -> None:
        """Wait until every job has reached a terminal status (for tests and benchmarks)."""
        if self._runner is not None:
            await self._runner.wait_idle()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _bound_port(app_runner: web.AppRunner | None) -> int:
    if app_runner is None or not app_runner.addresses:
        raise RuntimeError("the emulator is not started")
    return int(app_runner.addresses[0][1])


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to `parser` (used by `together-async serve` too)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback)")
    parser.add_argument("--port", type=int, default=8788, help="API port (default: 8788)")
    parser.add_argument(
        "--storage-port", type=int, default=0, help="presigned-upload port (default: any free)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where files and jobs live (default: a temporary dir removed on exit)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this Bearer key (or set {API_KEY_ENV}); default: accept any key",
    )
    parser.add_argument("--engine", choices=("echo", "openai"), default="echo")
    parser.add_argument("--upstream", help="OpenAI-compatible base URL for --engine openai")
    parser.add_argument(
        "--upstream-api-key",
        default=os.environ.get("TOGETHER_EMULATOR_UPSTREAM_API_KEY"),
        help="key for the upstream server (or TOGETHER_EMULATOR_UPSTREAM_API_KEY)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per job")
    parser.add_argument(
        "--time-factor",
        type=float,
        default=1.0,
        help="scale completion windows (0.001: 24h -> 86.4 s)",
    )
    parser.add_argument(
        "--validation-delay", type=float, default=0.0, help="seconds in VALIDATING at least"
    )
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES)
    parser.add_argument("--seed", type=int, default=0, help="seed of faults and output order")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    faults = parser.add_argument_group("fault injection (API port only)")
    faults.add_argument(
        "--fault-error-rate", type=float, default=0.0, help="share answered 500/503"
    )
    faults.add_argument(
        "--fault-rate-limit-rate", type=float, default=0.0, help="share answered 429"
    )
    faults.add_argument("--fault-retry-after", type=float, default=1.0, help="seconds in a 429")
    faults.add_argument(
        "--fault-reset-rate", type=float, default=0.0, help="share whose connection is cut"
    )
    faults.add_argument("--fault-slow-rate", type=float, default=0.0, help="share held back")
    faults.add_argument("--fault-slow-seconds", type=float, default=1.0)
    faults.add_argument(
        "--fault-after-effect",
        action="store_true",
        help="errors and resets on POST/DELETE strike after the effect took place",
    )
    faults.add_argument(
        "--fault-route",
        action="append",
        default=[],
        metavar="'METHOD /path'",
        help="limit faults to this route, e.g. 'POST /batches' (repeatable)",
    )


def faults_from_args(args: argparse.Namespace) -> list[Fault]:
    """The `Fault`s the --fault-* options describe."""
    routes = tuple(args.fault_route)
    faults = []
    for kind, rate in (
        (FaultKind.ERROR, args.fault_error_rate),
        (FaultKind.RATE_LIMIT, args.fault_rate_limit_rate),
        (FaultKind.RESET, args.fault_reset_rate),
        (FaultKind.SLOW, args.fault_slow_rate),
    ):
        if rate > 0:
            faults.append(
                Fault(
                    kind=kind,
                    rate=rate,
                    routes=routes,
                    after_effect=args.fault_after_effect,
                    retry_after=args.fault_retry_after,
                    delay=args.fault_slow_seconds,
                )
            )
    return faults


def emulator_from_args(args: argparse.Namespace) -> Emulator:
    """An `Emulator` configured from parsed `add_arguments` options."""
    return Emulator(
        data_dir=args.data_dir,
        api_key=args.api_key or None,
        host=args.host,
        port=args.port,
        storage_port=args.storage_port,
        engine=args.engine,
        upstream=args.upstream,
        upstream_api_key=args.upstream_api_key,
        latency=args.latency,
        concurrency=args.concurrency,
        time_factor=args.time_factor,
        validation_delay=args.validation_delay,
        faults=faults_from_args(args),
        seed=args.seed,
        max_upload_bytes=args.max_upload_bytes,
    )


async def serve(emulator: Emulator) -> None:
    """Run `emulator` until SIGINT or SIGTERM; prints one line with the addresses when ready."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with emulator:
            # One machine-readable line on stdout, so scripts can find the ports.
            print(
                f"together-async emulator ready: base_url={emulator.base_url} "
                f"storage_url={emulator.storage_url} data_dir={emulator.data_dir}",
                flush=True,
            )
            await stop.wait()
            logger.info("stopping: unfinished jobs resume on the next start")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_from_args(args: argparse.Namespace) -> int:
    """Build the emulator from parsed options and serve it; returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not getattr(args, "access_log", False):
        logging.getLogger("together_async.emulator.access").setLevel(logging.WARNING)
    try:
        emulator = emulator_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(emulator))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m together_async.emulator`."""
    parser = argparse.ArgumentParser(
        prog="python -m together_async.emulator",
        description="A local emulator of Together's files and batches API.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
