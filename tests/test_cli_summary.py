"""`run`'s summary names the most common error of the failed rows and its count."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs

from together_async import BatchResult
from together_async._cli_results import (
    CommonError,
    ErrorTally,
    InputOrderWriter,
    RunSummary,
    render_summary,
    result_row,
    write_result_rows,
)

MODEL = "meta-llama/Llama-3.2-3B-Instruct-Turbo"


def failure(message: str, *, status: int | None = 400, code: str | None = "bad") -> BatchResult:
    return BatchResult(custom_id="x", status_code=status, error_message=message, error_code=code)


ALL_FAILED = RunSummary(
    input=Path("in.jsonl"), output=Path("out.jsonl"), errors_output=Path("out.errors.jsonl"),
    endpoint="/v1/chat/completions", jobs=1, shards=1, rows=1000, rows_ok=0, rows_failed=1000,
    resubmitted_rows=0, prompt_tokens=0, completion_tokens=0, total_tokens=0, wall_seconds=1.0,
    resumed=False, emulator=False, state=None,
)  # fmt: skip


def test_tally_names_the_error_on_most_rows() -> None:
    """The most common (status, code, message) wins, with the number of rows it is on."""
    tally = ErrorTally()
    for result in [failure("a"), failure("b"), failure("b"), failure("b", code="other")]:
        tally.add(result_row(result))
    tally.add(result_row(BatchResult(custom_id="ok", status_code=200, body={})))
    assert tally.most_common() == CommonError(status_code=400, code="bad", message="b", rows=2)


def test_tally_without_failures_names_nothing() -> None:
    """No failed row, no most common error."""
    tally = ErrorTally()
    tally.add(result_row(BatchResult(custom_id="ok", status_code=200, body={})))
    assert tally.most_common() is None


def test_common_error_line_reads_status_code_message_and_rows() -> None:
    """`400 invalid_request_error: 'messages' is required (1,000 rows)`; missing parts left out."""
    common = CommonError(
        status_code=400, code="invalid_request_error", message="'messages' is required", rows=1000
    )
    assert common.describe() == "400 invalid_request_error: 'messages' is required (1,000 rows)"
    bare = CommonError(status_code=None, code=None, message="no response", rows=1)
    assert bare.describe() == "no response (1 row)"


def test_common_error_line_shortens_a_long_message_at_a_word() -> None:
    """A long message is cut at a word boundary and marked, never mid-word."""
    common = CommonError(status_code=500, code=None, message="word " * 100, rows=3)
    text = common.describe(max_chars=40)
    assert text == "500: word word word word word word word word ... (3 rows)"


def test_render_summary_shows_the_most_common_error() -> None:
    """The human summary has a `most common error` line after the failed count."""
    common = CommonError(
        status_code=400, code="invalid_request_error", message="'messages' is required", rows=1000
    )
    lines = render_summary(attrs.evolve(ALL_FAILED, most_common_error=common)).splitlines()
    index = lines.index("  failed:       1,000")
    assert lines[index + 1] == (
        "  most common error: 400 invalid_request_error: 'messages' is required (1,000 rows)"
    )


def test_render_summary_without_failures_has_no_error_line() -> None:
    """Nothing failed: no `most common error` line."""
    text = render_summary(attrs.evolve(ALL_FAILED, rows_ok=1000, rows_failed=0))
    assert "most common error" not in text


async def test_input_order_writer_counts_the_most_common_error(tmp_path: Path) -> None:
    """The run's writer hands the most common error over with the row counts."""
    writer = InputOrderWriter(tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl")
    await writer.open()
    for position, message in enumerate(["x", "y", "y"]):
        await writer.add(position, failure(message))
    counts = await writer.commit(3)
    assert counts.most_common_error == CommonError(status_code=400, code="bad", message="y", rows=2)


async def test_write_result_rows_counts_the_most_common_error(tmp_path: Path) -> None:
    """`batches results` gets the most common error from the same tally."""

    async def results() -> AsyncIterator[BatchResult]:
        for message in ["p", "q", "q"]:
            yield failure(message, status=None, code=None)

    counts = await write_result_rows(results(), tmp_path / "res.jsonl")
    assert counts.most_common_error == CommonError(status_code=None, code=None, message="q", rows=2)


def test_run_where_every_row_fails_names_the_error(tmp_path: Path) -> None:
    """`run` on rows the server refuses alike prints the error and its count, in text and
    JSON."""
    with (tmp_path / "in.jsonl").open("w") as file:
        for index in range(30):
            file.write(json.dumps({"custom_id": f"r{index}", "body": {"model": MODEL}}) + "\n")
    command = [sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "out.jsonl",
               "--emulator"]  # fmt: skip
    text = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert text.returncode == 1, text.stderr
    error_row = json.loads((tmp_path / "out.errors.jsonl").read_text().splitlines()[0])
    message, code = error_row["error"]["message"], error_row["error"]["code"]
    assert f"  most common error: 400 {code}: {message} (30 rows)" in text.stdout.splitlines()
    as_json = subprocess.run(
        [*command, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert json.loads(as_json.stdout)["most_common_error"] == {
        "status_code": 400, "code": code, "message": message, "rows": 30,
    }  # fmt: skip
