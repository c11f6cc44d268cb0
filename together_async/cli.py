"""The `together-async` command: run a batch file end to end, validate input, serve the emulator,
and manage files and batch jobs. Parsing, dispatch, exit codes and error reporting live here;
`run` itself in `_cli_run.py`, the result files and the summary in `_cli_results.py`.

Built on argparse from the standard library, so the command adds no dependency to install, and
sub-commands, `--help` and exit code 2 on usage errors come built in. Exit codes: 0 ok; 1 a failed
job, failed rows or invalid input; 2 a usage error; 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.to_thread
import orjson

from . import __version__
from ._cli_results import STDOUT, render_summary, write_result_rows
from ._cli_run import (
    EMULATOR_LATENCY,
    RunInterrupted,
    run_batch_file,
    stderr_is_terminal,
)
from ._client import AsyncTogether
from ._convert import unstructure
from ._errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BatchFileError,
    ManifestMismatchError,
    MissingAPIKeyError,
    TogetherError,
)
from ._jsonl import BatchFileReport, check_batch_file
from ._models import BatchEndpoint, BatchJob, BatchJobStatus, FileObject
from .progress import job_percent
from .watch import stream_status

__all__ = ["build_parser", "main"]

PROG = "together-async"
DEFAULT_ENDPOINT = BatchEndpoint.CHAT_COMPLETIONS.value
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_logger = logging.getLogger("together_async.cli")


class _Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived while a command was running; the message says what now."""

    exit_code = EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _file_path(text: str) -> Path:
    # Path("") is ".", the current directory: an empty --state is a mistake to say so.
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a file path, got an empty string")
    path = Path(text)
    if not path.name:
        raise argparse.ArgumentTypeError(f"must be a file path, got {text!r}")
    return path


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_common_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # The same options are accepted before and after the sub-command. In the sub-command's copy
    # the defaults are SUPPRESS, so an option given before the sub-command is not overwritten.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(None),
        help="Together API key (default: $TOGETHER_API_KEY); never printed",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        default=default(None),
        help="API base URL, with or without /v1 (default: $TOGETHER_BASE_URL or "
        "https://api.together.ai/v1)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print machine-readable JSON on stdout",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="log requests and show tracebacks on errors",
    )


def _examples(*lines: str) -> str:
    """An epilog of example command lines, shown at the end of a command's --help."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_command(
    commands: Any,
    name: str,
    *,
    help: str,
    description: str | None = None,
    examples: Sequence[str],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    # Every command's --help ends with examples, laid out as written (RawDescription).
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        parents=list(parents),
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _add_order_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--oldest-first",
        "--reverse",
        action="store_true",
        dest="oldest_first",
        help="list the oldest first (default: newest first, by creation time; entries "
        "without one come last either way)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `together-async`, with every sub-command."""
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, in_subcommand=True)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run Together batch jobs from the command line, or against a local emulator.",
        epilog="Details: docs/cli.md. Exit codes: 0 ok, 1 failed job/rows or invalid input, "
        "2 usage error, 130 interrupted.\n\n"
        + _examples(
            "together-async run examples/summarise-1000.jsonl --emulator -o results.jsonl",
            "together-async batches list --json",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="the command to run"
    )

    _add_run_parser(commands, common)
    _add_validate_parser(commands, common)
    _add_serve_parser(commands)
    _add_files_parser(commands, common)
    _add_batches_parser(commands, common)
    return parser


def _add_run_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    run = _add_command(
        commands,
        "run",
        parents=[common],
        help="validate, shard, upload, run and collect a whole batch file",
        description=(
            "Validate INPUT, split it into batch jobs, upload and start them, watch them, and\n"
            "write one result per input line, in input order, to RESULTS. Failed rows also go\n"
            "to RESULTS with .errors.jsonl in place of .jsonl; a FIFO, a device or - (stdout)\n"
            "is written into directly, failed rows included, with no errors file. Ctrl-C\n"
            "cancels the jobs, unless --state is given: then they keep running and the same\n"
            "command resumes the run."
        ),
        examples=[
            "together-async run examples/summarise-1000.jsonl --emulator -o results.jsonl",
            "together-async run big.jsonl -o results.jsonl --state big.state",
        ],
    )
    run.add_argument("input", type=Path, metavar="INPUT.jsonl", help="batch input file")
    run.add_argument(
        "-o",
        "--output",
        type=_file_path,
        required=True,
        metavar="RESULTS.jsonl",
        help="where to write the results ('-': stdout, and the summary goes to stderr)",
    )
    run.add_argument(
        "--endpoint",
        metavar="PATH",
        help=f"batch endpoint (default: the url of the first line, else {DEFAULT_ENDPOINT})",
    )
    run.add_argument("--model", help="model for request bodies that name none")
    run.add_argument(
        "--state",
        type=_file_path,
        metavar="FILE",
        help="durable run state: rerun the same command after a crash or Ctrl-C to resume "
        "without creating jobs twice",
    )
    run.add_argument(
        "--max-requests-per-batch",
        type=_positive_int,
        metavar="N",
        default=50_000,
        help="most requests in one batch job (default: 50000, the API's limit)",
    )
    run.add_argument(
        "--max-attempts",
        type=_positive_int,
        metavar="N",
        help="most submissions of a row that fails retryably (429, 5xx, expiry); default 3",
    )
    run.add_argument(
        "--poll-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="first interval between status polls (default: 2, or 0.1 with --emulator); "
        "it backs off from there",
    )
    run.add_argument(
        "--max-poll-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="longest interval between status polls (default: 30, or 0.5 with --emulator)",
    )
    run.add_argument(
        "--emulator",
        action="store_true",
        help="run against a local in-process emulator: no account, no network, synthetic "
        "responses (with --state it keeps its data beside the state file, so resume works)",
    )
    run.add_argument(
        "--emulator-latency",
        type=_non_negative_float,
        default=EMULATOR_LATENCY,
        metavar="SECONDS",
        help=f"simulated seconds per request on --emulator (default: {EMULATOR_LATENCY})",
    )
    run.set_defaults(handler=_cmd_run)


def _add_validate_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    validate = _add_command(
        commands,
        "validate",
        parents=[common],
        help="check a batch input file without sending anything",
        description=(
            "Check a batch input file against the Batch API's rules and name the lines at\n"
            "fault, worded as `run` words them. Exit code 1 when there are problems."
        ),
        examples=[
            "together-async validate examples/summarise-1000.jsonl",
            "together-async validate big.jsonl --no-size-limits --json",
        ],
    )
    validate.add_argument("file", type=Path, metavar="FILE", help="batch input file")
    validate.add_argument(
        "--endpoint",
        metavar="PATH",
        help="batch endpoint every line's url must match (default: all lines agree)",
    )
    validate.add_argument(
        "--no-size-limits",
        action="store_true",
        help="skip the per-job 50,000-line / 100 MB limits (`run` shards bigger files)",
    )
    validate.set_defaults(handler=_cmd_validate)


# Help for the emulator options that its own command line leaves without one.
_SERVE_HELP = {
    "engine": "how requests are answered: echo (synthetic, offline; the default) or openai "
    "(forwarded to --upstream)",
    "max_upload_bytes": "largest file accepted, in bytes",
    "fault_slow_seconds": "seconds a held-back request waits (default: 1.0)",
}


def _add_serve_parser(commands: Any) -> None:
    from .emulator.server import add_arguments

    serve = _add_command(
        commands,
        "serve",
        help="run the local emulator of the Together files and batches API",
        description="Run the local emulator of Together's files and batches API (the same\n"
        "options as python -m together_async.emulator). It prints one line with its base URL\n"
        "when ready and stops on Ctrl-C; unfinished jobs resume on the next start with the\n"
        "same --data-dir.",
        examples=[
            "together-async serve --port 8788 --data-dir ./emulator-data",
            "together-async serve --port 0 --api-key test-key --fault-error-rate 0.1",
        ],
    )
    add_arguments(serve)
    for action in serve._actions:
        if not action.help and action.dest in _SERVE_HELP:
            action.help = _SERVE_HELP[action.dest]
    serve.set_defaults(handler=None, sync_handler=_cmd_serve)


def _add_files_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    files = _add_command(
        commands,
        "files",
        help="upload, list, inspect, delete and download files",
        examples=[
            "together-async files upload batch.jsonl",
            "together-async files list --oldest-first",
        ],
    )
    actions = files.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="what to do with files"
    )

    upload = _add_command(
        actions,
        "upload",
        parents=[common],
        help="upload a file (validated first for batch-api)",
        examples=[
            "together-async files upload batch.jsonl",
            "together-async files upload notes.txt --purpose fine-tune --no-check",
        ],
    )
    upload.add_argument("path", type=Path, metavar="PATH", help="the local file to upload")
    upload.add_argument("--purpose", default="batch-api", help="file purpose (default: batch-api)")
    upload.add_argument("--no-check", action="store_true", help="skip the batch-file validation")
    upload.add_argument("--endpoint", metavar="PATH", help="the endpoint the lines' url must match")
    upload.set_defaults(handler=_cmd_files_upload)

    listing = _add_command(
        actions,
        "list",
        parents=[common],
        help="list files, newest first",
        examples=["together-async files list", "together-async files list --oldest-first --json"],
    )
    _add_order_option(listing)
    listing.set_defaults(handler=_cmd_files_list)

    get = _add_command(
        actions,
        "get",
        parents=[common],
        help="show one file",
        examples=["together-async files get file-09b3e435-0293-4be6-98a7-bc9e057ed25b"],
    )
    get.add_argument("file_id", metavar="FILE_ID", help="the file's id (see `files list`)")
    get.set_defaults(handler=_cmd_files_get)

    delete = _add_command(
        actions,
        "delete",
        parents=[common],
        help="delete a file",
        examples=["together-async files delete file-09b3e435-0293-4be6-98a7-bc9e057ed25b"],
    )
    delete.add_argument("file_id", metavar="FILE_ID", help="the file's id (see `files list`)")
    delete.set_defaults(handler=_cmd_files_delete)

    download = _add_command(
        actions,
        "download",
        parents=[common],
        help="download a file's content",
        examples=[
            "together-async files download file-09b3e435-0293-4be6-98a7-bc9e057ed25b -o out.jsonl",
            "together-async files download file-09b3e435-0293-4be6-98a7-bc9e057ed25b | head",
        ],
    )
    download.add_argument("file_id", metavar="FILE_ID", help="the file's id (see `files list`)")
    download.add_argument(
        "-o", "--output", type=Path, metavar="PATH", help="write here ('-' or default: stdout)"
    )
    download.set_defaults(handler=_cmd_files_download)


def _add_batches_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    batches = _add_command(
        commands,
        "batches",
        help="create, inspect, cancel and follow batch jobs",
        examples=[
            "together-async batches create file-09b3e435-0293-4be6-98a7-bc9e057ed25b",
            "together-async batches watch b0635b12-b5ae-44bd-8ee9-c7436132170e",
        ],
    )
    actions = batches.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="what to do with batch jobs"
    )
    batch_id_help = "the job's id (see `batches list`)"

    create = _add_command(
        actions,
        "create",
        parents=[common],
        help="start a batch job on an uploaded file",
        examples=[
            "together-async batches create file-09b3e435-0293-4be6-98a7-bc9e057ed25b",
            "together-async batches create FILE_ID --endpoint /v1/completions --model-id MODEL",
        ],
    )
    create.add_argument(
        "input_file_id", metavar="FILE_ID", help="the uploaded batch input file's id"
    )
    create.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        metavar="PATH",
        help=f"batch endpoint (default: {DEFAULT_ENDPOINT})",
    )
    create.add_argument(
        "--completion-window",
        default="24h",
        metavar="WINDOW",
        help="how long the job may take (default: 24h)",
    )
    create.add_argument("--model-id", metavar="MODEL", help="model of the job, if required")
    create.add_argument("--priority", type=int, metavar="N", help="job priority")
    create.set_defaults(handler=_cmd_batches_create)

    get = _add_command(
        actions,
        "get",
        parents=[common],
        help="show one job",
        examples=["together-async batches get b0635b12-b5ae-44bd-8ee9-c7436132170e --json"],
    )
    get.add_argument("batch_id", metavar="BATCH_ID", help=batch_id_help)
    get.set_defaults(handler=_cmd_batches_get)

    listing = _add_command(
        actions,
        "list",
        parents=[common],
        help="list jobs, newest first",
        examples=[
            "together-async batches list",
            "together-async batches list --oldest-first --json",
        ],
    )
    _add_order_option(listing)
    listing.set_defaults(handler=_cmd_batches_list)

    cancel = _add_command(
        actions,
        "cancel",
        parents=[common],
        help="cancel a job",
        examples=["together-async batches cancel b0635b12-b5ae-44bd-8ee9-c7436132170e"],
    )
    cancel.add_argument("batch_id", metavar="BATCH_ID", help=batch_id_help)
    cancel.set_defaults(handler=_cmd_batches_cancel)

    watch = _add_command(
        actions,
        "watch",
        parents=[common],
        help="print a job's status as it changes until it ends",
        description="Print a line per status or progress change. Exit code 0 when the job\n"
        "COMPLETED, 1 when it ended otherwise.",
        examples=[
            "together-async batches watch b0635b12-b5ae-44bd-8ee9-c7436132170e",
            "together-async batches watch BATCH_ID --timeout 3600 --json",
        ],
    )
    watch.add_argument("batch_id", metavar="BATCH_ID", help=batch_id_help)
    watch.add_argument(
        "--poll-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="first interval between status polls (default: 2); it backs off from there",
    )
    watch.add_argument(
        "--max-poll-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="longest interval between status polls (default: 30)",
    )
    watch.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="give up after this long"
    )
    watch.set_defaults(handler=_cmd_batches_watch)

    results = _add_command(
        actions,
        "results",
        parents=[common],
        help="fetch a finished job's results (output and error files)",
        description="Write one result row per request (the `run` shape; in the server's order)\n"
        "to PATH or stdout. Exit code 1 when any row failed.",
        examples=[
            "together-async batches results b0635b12-b5ae-44bd-8ee9-c7436132170e -o results.jsonl",
            "together-async batches results BATCH_ID | head",
        ],
    )
    results.add_argument("batch_id", metavar="BATCH_ID", help=batch_id_help)
    results.add_argument(
        "-o", "--output", type=Path, metavar="PATH", help="write here ('-' or default: stdout)"
    )
    results.set_defaults(handler=_cmd_batches_results)


# ---------------------------------------------------------------------------------------------
# Output: stdout/stderr writes happen in a worker thread, so a slow pipe never stalls the loop
# ---------------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return orjson.dumps(unstructure(value), option=orjson.OPT_INDENT_2).decode()


async def _write_stdout(text: str) -> None:
    def write() -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    await anyio.to_thread.run_sync(write)


async def _write_stderr(text: str) -> None:
    def write() -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    await anyio.to_thread.run_sync(write)


async def _emit(args: argparse.Namespace, value: Any, human: str) -> None:
    """Print `value` as JSON with --json, else the human-readable text."""
    await _write_stdout((_dumps(value) if args.json else human) + "\n")


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(title) for title in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


_Created = TypeVar("_Created", FileObject, BatchJob)


def by_creation(items: Iterable[_Created], *, oldest_first: bool = False) -> list[_Created]:
    """`files list` and `batches list` order: newest first by created_at (oldest first when
    asked), the server's order among equal times, and entries without a time last either way
    (nothing says where they belong)."""
    items = list(items)
    # timestamp() compares aware and naive datetimes alike, where `<` would raise.
    dated = [(item.created_at.timestamp(), item) for item in items if item.created_at is not None]
    dated.sort(key=lambda pair: pair[0], reverse=not oldest_first)
    return [item for _, item in dated] + [item for item in items if item.created_at is None]


def _describe_file(file: FileObject) -> str:
    fields = [
        ("id", file.id),
        ("filename", file.filename or "-"),
        ("bytes", "-" if file.bytes is None else f"{file.bytes:,}"),
        ("purpose", str(file.purpose or "-")),
        ("created", _when(file.created_at)),
    ]
    if file.line_count is not None:
        fields.append(("lines", f"{file.line_count:,}"))
    if file.processing_status:
        fields.append(("processing", file.processing_status))
    return "\n".join(f"{name + ':':<12}{value}" for name, value in fields)


def _percent(job: BatchJob, form: str) -> str:
    # `progress`, or for OpenAI-style servers `request_counts`; "-" when neither is known.
    percent = job_percent(job)
    return "-" if percent is None else form.format(percent)


def _describe_job(job: BatchJob) -> str:
    fields = [
        ("id", job.id),
        ("status", str(job.status or "-")),
        ("progress", _percent(job, "{:.1f}%")),
        ("endpoint", job.endpoint or "-"),
        ("input file", job.input_file_id or "-"),
        ("output file", job.output_file_id or "-"),
        ("error file", job.error_file_id or "-"),
        ("created", _when(job.created_at)),
        ("completed", _when(job.completed_at)),
    ]
    if job.model_id:
        fields.append(("model", job.model_id))
    if job.error:
        fields.append(("error", job.error))
    return "\n".join(f"{name + ':':<13}{value}" for name, value in fields)


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _open_client(args: argparse.Namespace) -> AsyncIterator[AsyncTogether]:
    client = AsyncTogether(api_key=args.api_key, base_url=args.base_url)
    async with client:
        yield client


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


async def _cmd_validate(args: argparse.Namespace) -> int:
    limits: dict[str, int] = {}
    if args.no_size_limits:
        limits = {"max_lines": sys.maxsize, "max_bytes": sys.maxsize}
    report: BatchFileReport = await anyio.to_thread.run_sync(
        lambda: check_batch_file(args.file, endpoint=args.endpoint, **limits)
    )
    if args.json:
        await _write_stdout(
            orjson.dumps(
                {
                    "file": str(args.file),
                    "ok": report.ok,
                    "lines": report.lines,
                    "bytes": report.bytes,
                    "problem_count": report.problem_count,
                    "problems": [
                        {"line": p.line, "field": p.field, "message": p.message}
                        for p in report.problems
                    ],
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
    elif report.ok:
        await _write_stdout(f"{args.file}: ok, {report.lines:,} requests, {report.bytes:,} bytes\n")
    else:
        await _write_stdout(
            str(
                BatchFileError(
                    list(report.problems), problem_count=report.problem_count, source=str(args.file)
                )
            )
            + "\n"
        )
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_serve(args: argparse.Namespace) -> int:
    from .emulator.server import run_from_args

    return run_from_args(args)


async def _cmd_files_upload(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        file = await client.files.upload(
            args.path, purpose=args.purpose, check=not args.no_check, endpoint=args.endpoint
        )
    await _emit(args, file, _describe_file(file))
    return EXIT_OK


async def _cmd_files_list(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        files = await client.files.list()
    ordered = by_creation(files, oldest_first=args.oldest_first)
    rows = [
        [
            file.id,
            file.filename or "-",
            "-" if file.bytes is None else f"{file.bytes:,}",
            str(file.purpose or "-"),
            _when(file.created_at),
        ]
        for file in ordered
    ]
    human = (
        _table(["ID", "FILENAME", "BYTES", "PURPOSE", "CREATED"], rows) if rows else ("no files")
    )
    await _emit(args, ordered, human)
    return EXIT_OK


async def _cmd_files_get(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        file = await client.files.retrieve(args.file_id)
    await _emit(args, file, _describe_file(file))
    return EXIT_OK


async def _cmd_files_delete(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        deleted = await client.files.delete(args.file_id)
    human = f"deleted {deleted.id}" if deleted.deleted else f"{deleted.id} was not deleted"
    await _emit(args, deleted, human)
    return EXIT_OK if deleted.deleted else EXIT_FAILED


async def _cmd_files_download(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        if args.output is not None and str(args.output) != "-":
            downloaded = await client.files.retrieve_content(args.file_id, output=args.output)
            await _emit(
                args,
                downloaded,
                f"wrote {downloaded.bytes:,} bytes to {downloaded.path}",
            )
            return EXIT_OK
        # The bytes exactly as stored (CRLF, no final newline, binary), a chunk at a time.
        stdout = anyio.wrap_file(sys.stdout.buffer)
        chunks = client.files.iter_bytes(args.file_id)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                await stdout.write(chunk)
        await stdout.flush()
    return EXIT_OK


async def _cmd_batches_create(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        job = await client.batches.create_batch(
            args.input_file_id,
            args.endpoint,
            completion_window=args.completion_window,
            model_id=args.model_id,
            priority=args.priority,
        )
    if job.warning:
        await _write_stderr(f"{PROG}: warning: {job.warning}\n")
    await _emit(args, job, _describe_job(job))
    return EXIT_OK


async def _cmd_batches_get(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        job = await client.batches.get_batch(args.batch_id)
    await _emit(args, job, _describe_job(job))
    return EXIT_OK


async def _cmd_batches_list(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        jobs = by_creation(await client.batches.list_batches(), oldest_first=args.oldest_first)
    rows = [
        [
            job.id,
            str(job.status or "-"),
            _percent(job, "{:.0f}%"),
            job.endpoint or "-",
            _when(job.created_at),
        ]
        for job in jobs
    ]
    human = (
        _table(["ID", "STATUS", "PROGRESS", "ENDPOINT", "CREATED"], rows)
        if rows
        else ("no batch jobs")
    )
    await _emit(args, jobs, human)
    return EXIT_OK


async def _cmd_batches_cancel(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        job = await client.batches.cancel_batch(args.batch_id)
    await _emit(args, job, _describe_job(job))
    return EXIT_OK


def poll_intervals(
    first: float | None, longest: float | None, *, default_first: float, default_longest: float
) -> tuple[float, float]:
    """(poll_interval, max_interval) from --poll-interval / --max-poll-interval and defaults.

    Giving one moves the default of the other out of its way, so either works alone.
    """
    if first is None:
        first = default_first if longest is None else min(default_first, longest)
    if longest is None:
        longest = max(default_longest, first)
    return first, longest


async def _cmd_batches_watch(args: argparse.Namespace) -> int:
    last: BatchJob | None = None

    async def follow(client: Any) -> None:
        nonlocal last
        first, longest = poll_intervals(
            args.poll_interval, args.max_poll_interval, default_first=2.0, default_longest=30.0
        )
        stream = stream_status(
            client.batches, args.batch_id, poll_interval=first, max_interval=longest
        )
        try:
            async for job in stream:
                last = job
                if args.json:
                    line = orjson.dumps(unstructure(job)).decode()
                else:
                    progress = "" if job_percent(job) is None else _percent(job, "  {:5.1f}%")
                    now = datetime.now().strftime("%H:%M:%S")
                    line = f"{now}  {job.id}  {job.status!s:<11}{progress}"
                await _write_stdout(line + "\n")
        finally:
            await stream.aclose()

    async with _open_client(args) as client:
        if args.timeout is None:
            await follow(client)
        else:
            with anyio.move_on_after(args.timeout) as scope:
                await follow(client)
            if scope.cancelled_caught:
                raise TogetherError(
                    f"batch {args.batch_id} still {last.status if last else 'unknown'} "
                    f"after {args.timeout:g} s; the job keeps running"
                )
    if last is not None and last.error:
        await _write_stderr(f"{PROG}: job error: {last.error}\n")
    return EXIT_OK if last is not None and last.status == BatchJobStatus.COMPLETED else EXIT_FAILED


async def _cmd_batches_results(args: argparse.Namespace) -> int:
    async with _open_client(args) as client:
        job = await client.batches.get_batch(args.batch_id)
        if not job.is_terminal:
            raise TogetherError(
                f"batch {job.id} is {job.status}: its results come once it ends "
                f"(wait with: {PROG} batches watch {job.id})"
            )
        results = client.batches.results(job, partial=True)
        try:
            counts = await write_result_rows(results, args.output)
        finally:
            # Stopping early (an error writing) must release the download connection now.
            aclose = getattr(results, "aclose", None)
            if aclose is not None:
                await aclose()
    common = counts.most_common_error
    most = "" if common is None else f"; most common error: {common.describe()}"
    await _write_stderr(
        f"{counts.total:,} rows: {counts.ok:,} ok, {counts.failed:,} failed{most}\n"
    )
    if job.status != BatchJobStatus.COMPLETED:
        reason = f": {job.error}" if job.error else ""
        await _write_stderr(f"{PROG}: batch {job.id} ended {job.status}{reason}\n")
        return EXIT_FAILED
    return EXIT_OK if counts.failed == 0 else EXIT_FAILED


async def _cmd_run(args: argparse.Namespace) -> int:
    try:
        # The emulator finishes jobs in seconds: poll it often. Real jobs take minutes to
        # hours: start at 2 s and back off to Together's advice of 30 s or more.
        first, longest = poll_intervals(
            args.poll_interval,
            args.max_poll_interval,
            default_first=0.1 if args.emulator else 2.0,
            default_longest=0.5 if args.emulator else 30.0,
        )
        summary = await run_batch_file(
            args,
            poll_interval=first,
            max_interval=longest,
            display_stream=sys.stderr if stderr_is_terminal() else None,
        )
    except RunInterrupted as exc:
        raise _Interrupted(str(exc)) from None
    if args.json:
        text = orjson.dumps(summary.as_json(), option=orjson.OPT_INDENT_2).decode()
    else:
        text = render_summary(summary)
    # With `-o -` stdout carries the results and nothing else, so `| jq` reads only rows.
    if args.output == STDOUT:
        await _write_stderr(text + "\n")
    else:
        await _write_stdout(text + "\n")
    return EXIT_OK if summary.rows_failed == 0 else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Running a command: signals, errors, exit codes
# ---------------------------------------------------------------------------------------------


class _Secrets:
    """The API keys this process knows, to blank out of anything it prints."""

    def __init__(self, *keys: str | None) -> None:
        # Very short strings would blank out ordinary words; real keys are long.
        self._keys = sorted({key for key in keys if key and len(key) >= 6}, key=len, reverse=True)

    def add(self, key: str | None) -> None:
        if key and len(key) >= 6 and key not in self._keys:
            self._keys.append(key)
            self._keys.sort(key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for key in self._keys:
            text = text.replace(key, "<api key>")
        return text


class _ScrubbingFilter(logging.Filter):
    def __init__(self, secrets: _Secrets) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._secrets.scrub(record.getMessage())
        record.args = None
        return True


def _hint(exc: BaseException) -> str:
    if isinstance(exc, MissingAPIKeyError):
        return (
            "no API key: pass --api-key or set TOGETHER_API_KEY "
            "(or try `run ... --emulator`, which needs none)"
        )
    if isinstance(exc, AuthenticationError):
        return f"{exc} (check --api-key / TOGETHER_API_KEY)"
    if isinstance(exc, ManifestMismatchError):
        return str(exc).replace("another state_path", "another --state")
    if isinstance(exc, APIConnectionError) and not isinstance(exc, APITimeoutError):
        return (
            f"{exc} (nothing answered: check --base-url / TOGETHER_BASE_URL and the network, "
            "or try `run ... --emulator`)"
        )
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


async def _run_command(
    handler: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run the handler as a task that Ctrl-C cancels cleanly (its cleanup runs; exit 130)."""
    loop = asyncio.get_running_loop()
    work = asyncio.ensure_future(handler(args))
    interrupted_by: int | None = None

    def on_signal(signum: int) -> None:
        nonlocal interrupted_by
        if interrupted_by is not None:
            # A second Ctrl-C while cleaning up (cancelling jobs can take seconds): quit now.
            # The state file is SQLite, committed step by step, so a hard exit is safe for it.
            sys.stderr.write(
                f"\n{PROG}: interrupted again: exiting without waiting for the clean-up "
                "(jobs may be left running)\n"
            )
            sys.stderr.flush()
            os._exit(128 + interrupted_by)
        interrupted_by = signum
        _logger.debug("signal %s: cancelling the command", signum)
        work.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # Windows or not the main thread: KeyboardInterrupt handling still applies
    try:
        return await work
    except _Interrupted as exc:
        if interrupted_by is not None:
            exc.exit_code = 128 + interrupted_by  # the shell's convention: 130 Ctrl-C, 143 TERM
        raise
    except asyncio.CancelledError:
        if interrupted_by is not None:
            interrupted = _Interrupted("interrupted")
            interrupted.exit_code = 128 + interrupted_by
            raise interrupted from None
        raise
    finally:
        for signum in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


class _CommandLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The command's log output on stderr, API keys blanked out.

    On a terminal each record starts by clearing the line: `run`'s live status line may be
    there (it is drawn again on its next tick), and a record glued to it would read as one
    long garbled line.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        try:
            on_terminal = self.stream.isatty()
        except (AttributeError, ValueError):
            on_terminal = False
        return "\r\x1b[K" + text if on_terminal else text


@contextlib.contextmanager
def _command_logging(debug: bool, secrets: _Secrets) -> Iterator[None]:
    """Log warnings (everything with --debug) to stderr for the command; undone afterwards,
    as run_cli may be called more than once in a process (tests)."""
    package_logger = logging.getLogger("together_async")
    handler = _CommandLogHandler(sys.stderr)
    handler.addFilter(_ScrubbingFilter(secrets))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    # The handler's own level too: the live display lowers the client logger's level to
    # hear of retries, and those records must not reach stderr (they would break its line).
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `together-async` entry point: parse `argv`, run the command, exit with its code."""
    try:
        code = run_cli(argv)
    except KeyboardInterrupt:
        # Ctrl-C before the command's own handler is installed (while importing and parsing):
        # nothing was started, so there is nothing to say but that.
        sys.stderr.write(f"{PROG}: interrupted\n")
        code = EXIT_INTERRUPTED
    sys.exit(code)


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _is_broken_pipe(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BrokenPipeError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _stdout_closed() -> int:
    """The reader of stdout went away (`... | head`): end quietly, as git and gh do.

    stdout is pointed at /dev/null so the interpreter's flush at exit does not report the
    same broken pipe again; the exit code is a SIGPIPE death's, which is what a shell
    pipeline expects of a writer whose reader left.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the command, and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    if getattr(args, "emulator", False) and args.base_url is not None:
        parser.error("--emulator runs a local emulator; drop --base-url")
    first, longest = getattr(args, "poll_interval", None), getattr(args, "max_poll_interval", None)
    if first is not None and longest is not None and longest < first:
        parser.error("--max-poll-interval must not be below --poll-interval")
    if args.handler is None:
        # `serve` is the emulator's own command line, with its own logging and key.
        return int(args.sync_handler(args))
    secrets = _Secrets(args.api_key, os.environ.get("TOGETHER_API_KEY"))
    debug = bool(args.debug)
    try:
        with _command_logging(debug, secrets):
            return asyncio.run(_run_command(args.handler, args))
    except _Interrupted as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return exc.exit_code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except BatchFileError as exc:
        # The validator's report, naming the lines at fault: several lines on purpose.
        sys.stderr.write(f"{PROG}: error: invalid input {secrets.scrub(str(exc))}\n")
        return EXIT_FAILED
    except (TogetherError, OSError) as exc:
        if _is_broken_pipe(exc):
            return _stdout_closed()
        if debug:
            sys.stderr.write(secrets.scrub(traceback.format_exc()))
        sys.stderr.write(f"{PROG}: error: {secrets.scrub(_hint(exc))}\n")
        return EXIT_FAILED
    except Exception as exc:
        hint = "" if debug else " (run with --debug for the traceback)"
        if debug:
            sys.stderr.write(secrets.scrub(traceback.format_exc()))
        sys.stderr.write(
            f"{PROG}: error: unexpected {type(exc).__name__}: {secrets.scrub(str(exc))}{hint}\n"
        )
        return EXIT_FAILED
