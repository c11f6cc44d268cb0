"""The `together-async` command line, end to end: subprocesses against the in-process emulator
(`run --emulator`) and against a separately started `together-async serve`, plus in-process
calls of `run_cli` for the quick sub-commands and unit tests of the output helpers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from terminal import cli_on_terminal

from together_async import BatchResult
from together_async._cli_results import (
    InputOrderWriter,
    errors_path_for,
    render_summary,
    result_row,
)
from together_async._cli_run import (
    RunDisplay,
    emulator_data_dir,
    interrupted_message,
    resume_command,
)
from together_async.cli import _Secrets, poll_intervals, run_cli
from together_async.gather import BatchRunSummary

API_KEY = "test-key-cli-5f2b9c81d7"
MODEL = "meta-llama/Llama-3.2-3B-Instruct-Turbo"
STARTUP_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0


# --- helpers ---------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOGETHER_")}
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, timeout: float = RUN_TIMEOUT, **env: str) -> Any:
    """Run `python -m together_async ARGS` to completion; the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "together_async", *args],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_requests(path: Path, count: int, *, bad_rows: tuple[int, ...] = ()) -> list[str]:
    """A chat batch file of `count` rows, ids deliberately not in sorted order; the ids.

    Rows in `bad_rows` have a body without messages, which the emulator answers with a 400.
    """
    ids = [f"doc-{(index * 37) % count:04d}-{index}" for index in range(count)]
    with path.open("w") as file:
        for index, custom_id in enumerate(ids):
            body: dict[str, Any] = {"model": MODEL, "max_tokens": 20}
            if index not in bad_rows:
                body["messages"] = [{"role": "user", "content": f"Summarise document {index}."}]
            file.write(json.dumps({"custom_id": custom_id, "body": body}) + "\n")
    return ids


def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [json.loads(line) for line in file]


class ServedEmulator:
    """A `together-async serve` subprocess on a free port, requiring API_KEY."""

    def __init__(self, tmp: Path, *extra: str, data_dir: Path | None = None) -> None:
        self.log = (tmp / "serve.log").open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "together_async",
                "serve",
                "--port",
                "0",
                "--api-key",
                API_KEY,
                "--data-dir",
                str(data_dir or tmp / "emulator-data"),
                *extra,
            ],
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        stdout = self.process.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        try:
            ready = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            self.stop()
            raise RuntimeError("the emulator did not report ready in time") from None
        fields = dict(part.split("=", 1) for part in ready.split() if "=" in part)
        self.base_url = fields["base_url"]

    def jobs(self) -> list[dict[str, Any]]:
        """Every batch job on the server, straight from the API."""
        request = urllib.request.Request(
            f"{self.base_url}/batches", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            jobs: list[dict[str, Any]] = json.load(response)
        return jobs

    def wait_for_jobs(self, count: int, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll the server (bounded) until it has at least `count` jobs."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            if len(jobs) >= count:
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} jobs within {timeout} s, got {len(jobs)}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedEmulator]:
    """A fast emulator for the files/batches sub-commands and quick runs."""
    server = ServedEmulator(tmp_path_factory.mktemp("served"))
    yield server
    server.stop()


@pytest.fixture
def slow_served(tmp_path: Path) -> Iterator[ServedEmulator]:
    """An emulator slow enough (one request at a time, 20 ms each) to interrupt a run."""
    server = ServedEmulator(tmp_path, "--latency", "0.02", "--concurrency", "1")
    yield server
    server.stop()


def connection(server: ServedEmulator) -> list[str]:
    return ["--base-url", server.base_url, "--api-key", API_KEY]


# --- run -------------------------------------------------------------------------------------


def test_run_on_the_emulator_writes_every_result_in_input_order(tmp_path: Path) -> None:
    """`run --emulator` shards, runs and writes one result per input line, in input order."""
    ids = write_requests(tmp_path / "in.jsonl", 60)
    done = cli(
        "run", "in.jsonl", "-o", "out.jsonl", "--emulator", "--max-requests-per-batch", "25",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [row["custom_id"] for row in rows] == ids
    assert all(row["status_code"] == 200 and "choices" in row["body"] for row in rows)
    assert read_jsonl(tmp_path / "out.errors.jsonl") == []
    assert "60 requests in 3 batch jobs" in done.stdout
    assert done.stderr == ""  # quiet when piped


def test_run_the_shipped_example_finishes(tmp_path: Path) -> None:
    """README's first command works: the 1,000-document example on the emulator."""
    example = Path(__file__).parent.parent / "examples" / "summarise-1000.jsonl"
    done = cli("run", str(example), "--emulator", "-o", "results.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [row["custom_id"] for row in rows] == [f"text-{i}" for i in range(1000)]
    assert "succeeded:    1,000" in done.stdout


def test_run_failed_rows_go_to_the_errors_file_and_exit_1(tmp_path: Path) -> None:
    """Rows the server rejects are in both files with an error, and the exit code is 1."""
    ids = write_requests(tmp_path / "in.jsonl", 12, bad_rows=(3, 7))
    done = cli("run", "in.jsonl", "-o", "out.jsonl", "--emulator", "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [row["custom_id"] for row in rows] == ids
    failed = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [row["custom_id"] for row in failed] == [ids[3], ids[7]]
    assert all(row["status_code"] == 400 and row["error"]["message"] for row in failed)
    assert "body" not in failed[0]
    summary = json.loads(done.stdout)
    assert (summary["rows"], summary["rows_ok"], summary["rows_failed"]) == (12, 10, 2)


def test_run_json_summary_parses(tmp_path: Path) -> None:
    """`run --json` prints one JSON summary with counts, tokens and wall time."""
    write_requests(tmp_path / "in.jsonl", 5)
    done = cli("--json", "run", "in.jsonl", "-o", "out.jsonl", "--emulator", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows_ok"] == 5 and summary["jobs"] == 1
    assert summary["tokens"]["total"] > 0 and summary["wall_seconds"] > 0
    assert summary["output"] == "out.jsonl" and summary["errors_output"] == "out.errors.jsonl"


def test_run_against_a_served_emulator(tmp_path: Path, served: ServedEmulator) -> None:
    """`run` with --base-url/--api-key against a separately started server."""
    ids = write_requests(tmp_path / "in.jsonl", 30)
    done = cli(
        "run", "in.jsonl", "-o", "out.jsonl", "--max-requests-per-batch", "10",
        "--poll-interval", "0.05", *connection(served), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [row["custom_id"] for row in read_jsonl(tmp_path / "out.jsonl")] == ids


def test_run_takes_the_key_from_the_environment(tmp_path: Path, served: ServedEmulator) -> None:
    """TOGETHER_API_KEY and TOGETHER_BASE_URL work when no flags are given."""
    write_requests(tmp_path / "in.jsonl", 3)
    done = cli(
        "run", "in.jsonl", "-o", "out.jsonl", "--poll-interval", "0.05", cwd=tmp_path,
        TOGETHER_API_KEY=API_KEY, TOGETHER_BASE_URL=served.base_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_run_invalid_input_exits_1_naming_lines_before_sending(
    tmp_path: Path, served: ServedEmulator
) -> None:
    """A bad input file fails with its line numbers, and nothing reaches the server."""
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"custom_id": "a", "body": {"model": "m"}}\n'
        "{not json\n"
        '{"custom_id": "a", "body": {"model": "m"}}\n'
    )
    jobs_before = len(served.jobs())
    done = cli("run", "bad.jsonl", "-o", "out.jsonl", *connection(served), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("together-async: error: invalid input")
    assert "line 2" in done.stderr and "line 3" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(served.jobs()) == jobs_before
    assert not (tmp_path / "out.jsonl").exists()


def test_run_without_a_key_says_how_to_get_going(tmp_path: Path) -> None:
    """No key and no --emulator: one line naming --api-key, TOGETHER_API_KEY and --emulator."""
    write_requests(tmp_path / "in.jsonl", 2)
    done = cli("run", "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "TOGETHER_API_KEY" in done.stderr and "--emulator" in done.stderr


def test_sigint_then_rerun_with_state_creates_no_duplicate_job(
    tmp_path: Path, slow_served: ServedEmulator
) -> None:
    """Ctrl-C leaves the jobs running (--state); the rerun finishes them, creating none twice."""
    ids = write_requests(tmp_path / "in.jsonl", 240)
    command = [
        sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "out.jsonl",
        "--state", "run.state", "--max-requests-per-batch", "80", "--poll-interval", "0.05",
        *connection(slow_served),
    ]  # fmt: skip
    first = subprocess.Popen(
        command, cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    slow_served.wait_for_jobs(1)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=RUN_TIMEOUT)
    assert first.returncode == 130, stderr
    assert re.search(r"keeps? running", stderr) and "--state run.state" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out.jsonl").exists()

    second = subprocess.run(
        command, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "(resumed)" in second.stdout
    assert [row["custom_id"] for row in read_jsonl(tmp_path / "out.jsonl")] == ids
    jobs = slow_served.jobs()
    input_files = [job["input_file_id"] for job in jobs]
    assert len(jobs) == 3 and len(set(input_files)) == 3


def printed_resume_command(stderr: str) -> str:
    """The command line `run` printed after "Resume ... with:"."""
    lines = stderr.splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("Resume ("))
    return lines[marker + 1].strip()


def test_emulator_run_interrupted_with_state_resumes_on_the_same_emulator_data(
    tmp_path: Path,
) -> None:
    """`run --emulator --state`: Ctrl-C, rerun, done; the emulator's data holds no extra job."""
    ids = write_requests(tmp_path / "in.jsonl", 600)
    command = [
        sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "out.jsonl",
        "--emulator", "--emulator-latency", "0.2", "--state", "run.state",
        "--max-requests-per-batch", "200",
    ]  # fmt: skip
    log: list[str] = []
    with subprocess.Popen(
        [*command, "--debug"], cwd=tmp_path, env=_clean_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    ) as first:  # fmt: skip
        assert first.stderr is not None
        for line in first.stderr:  # ends when the process does, so this wait is bounded
            log.append(line)
            if "created batch" in line:
                first.send_signal(signal.SIGINT)
                break
        log.extend(first.stderr)
        first.wait(timeout=RUN_TIMEOUT)
    assert first.returncode == 130, "".join(log)
    assert "the in-process emulator stopped with this command" in "".join(log)
    printed = printed_resume_command("".join(log))
    assert "--max-requests-per-batch 200" in printed and "--emulator-latency 0.2" in printed

    # The printed line, run as it is (the program name spelled as this interpreter's).
    words = shlex.split(printed)
    assert words[0] == "together-async"
    second = subprocess.run(
        [sys.executable, "-m", "together_async", *words[1:], "--json"], cwd=tmp_path,
        env=_clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["resumed"] is True
    assert [row["custom_id"] for row in read_jsonl(tmp_path / "out.jsonl")] == ids

    server = ServedEmulator(tmp_path, data_dir=tmp_path / "run.state.emulator")
    try:
        jobs = server.jobs()
    finally:
        server.stop()
    assert len(jobs) == 3 and len({job["input_file_id"] for job in jobs}) == 3


def test_sigint_without_state_cancels_the_jobs(tmp_path: Path, slow_served: ServedEmulator) -> None:
    """Ctrl-C without --state cancels the run's jobs and suggests --state for next time."""
    write_requests(tmp_path / "in.jsonl", 80)
    run = subprocess.Popen(
        [
            sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "out.jsonl",
            "--poll-interval", "0.05", *connection(slow_served),
        ],
        cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    slow_served.wait_for_jobs(1)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=RUN_TIMEOUT)
    assert run.returncode == 130, stderr
    assert re.search(r"(was|were) cancelled", stderr) and "--state" in stderr
    assert {job["status"] for job in slow_served.jobs()} <= {"CANCELLED", "CANCELING"}


def test_sigterm_stops_a_run_like_ctrl_c_with_exit_code_143(tmp_path: Path) -> None:
    """SIGTERM (a service manager stopping the run) is handled as Ctrl-C, with exit code 143."""
    write_requests(tmp_path / "in.jsonl", 400)
    with subprocess.Popen(
        [
            sys.executable, "-m", "together_async", "--debug", "run", "in.jsonl", "-o",
            "out.jsonl", "--emulator", "--emulator-latency", "0.2",
        ],
        cwd=tmp_path, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    ) as run:  # fmt: skip
        assert run.stderr is not None
        for line in run.stderr:  # ends with the process, so the wait is bounded
            if "created batch" in line:
                run.send_signal(signal.SIGTERM)
                break
        rest = run.stderr.read()
        run.wait(timeout=RUN_TIMEOUT)
    assert run.returncode == 143
    assert re.search(r"(was|were) cancelled", rest)


def test_second_sigint_exits_without_waiting_for_the_clean_up(tmp_path: Path) -> None:
    """A second Ctrl-C quits at once even while cancelling the jobs hangs on the server."""
    server = ServedEmulator(
        tmp_path, "--latency", "0.02", "--concurrency", "1", "--fault-slow-rate", "1",
        "--fault-slow-seconds", "60", "--fault-route", "POST /batches/{id}/cancel",
    )  # fmt: skip
    try:
        write_requests(tmp_path / "in.jsonl", 80)
        with subprocess.Popen(
            [
                sys.executable, "-m", "together_async", "--debug", "run", "in.jsonl", "-o",
                "out.jsonl", "--poll-interval", "0.05", *connection(server),
            ],
            cwd=tmp_path, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        ) as run:  # fmt: skip
            assert run.stderr is not None
            server.wait_for_jobs(1)
            run.send_signal(signal.SIGINT)
            # Signals sent back to back merge into one: wait until the first was taken.
            for line in run.stderr:  # ends with the process, so the wait is bounded
                if "cancelling the command" in line:
                    break
            run.send_signal(signal.SIGINT)
            # The cancel call takes 60 s on this server: only the forced exit is this quick.
            _, stderr = run.communicate(timeout=20)
    finally:
        server.stop()
    assert run.returncode == 130
    assert "interrupted again" in stderr


# --- validate --------------------------------------------------------------------------------


def test_validate_bad_file_exits_1_naming_the_lines(tmp_path: Path) -> None:
    """`validate` lists each problem with its line number and exits 1."""
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"custom_id": "a", "body": {}}\n'
        '{"custom_id": "b", "body": "text"}\n'
        '{"custom_id": "a", "body": {}}\n'
        '{"custom_id": "c", "body": {}}\n'
    )
    done = cli("validate", "bad.jsonl", cwd=tmp_path)
    assert done.returncode == 1
    assert "2 problems" in done.stdout
    assert "line 2: body" in done.stdout and "line 3: custom_id: duplicates line 1" in done.stdout


def test_validate_good_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file is reported ok with its size."""
    write_requests(tmp_path / "in.jsonl", 4)
    assert run_cli(["validate", str(tmp_path / "in.jsonl")]) == 0
    assert "ok, 4 requests" in capsys.readouterr().out


def test_validate_json_report_parses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`validate --json` gives the report with each problem's line and field."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"custom_id": "", "body": {}}\n')
    assert run_cli(["validate", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"] == [{"line": 1, "field": "custom_id", "message": "is empty"}]


# --- usage and errors ------------------------------------------------------------------------


def test_usage_error_exits_2(tmp_path: Path) -> None:
    """A missing required option is a usage error: exit code 2 and the usage line."""
    done = cli("run", "in.jsonl", cwd=tmp_path)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "-o/--output" in done.stderr


def test_emulator_with_base_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--emulator and --base-url contradict each other: exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["run", "x.jsonl", "-o", "y.jsonl", "--emulator", "--base-url", "http://h"])
    assert exit_info.value.code == 2
    assert "--emulator" in capsys.readouterr().err


def test_api_error_is_one_line_without_traceback(tmp_path: Path, served: ServedEmulator) -> None:
    """A 404 from the API is one `together-async: error:` line on stderr and exit code 1."""
    done = cli("files", "get", "file-missing", *connection(served), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("together-async: error: 404")
    assert done.stderr.count("\n") == 1


def test_debug_shows_a_traceback(tmp_path: Path, served: ServedEmulator) -> None:
    """--debug adds the traceback (and the error line still ends the output)."""
    done = cli("--debug", "files", "get", "file-missing", *connection(served), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("together-async: error: 404")


def test_the_key_never_appears_in_output(tmp_path: Path, served: ServedEmulator) -> None:
    """Neither a wrong nor a right key is printed, even with --debug."""
    wrong = "wrong-key-0a9e77c3b1f2"
    bad = cli(
        "--debug", "batches", "list", "--base-url", served.base_url, "--api-key", wrong,
        cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 1 and "401" in bad.stderr
    write_requests(tmp_path / "in.jsonl", 3)
    good = cli(
        "--debug", "run", "in.jsonl", "-o", "out.jsonl", "--poll-interval", "0.05",
        *connection(served), cwd=tmp_path,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "DEBUG" in good.stderr  # --debug did log
    for text in (bad.stdout, bad.stderr, good.stdout, good.stderr):
        assert wrong not in text and API_KEY not in text


# --- files and batches -----------------------------------------------------------------------


def test_files_subcommands(
    tmp_path: Path, served: ServedEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """upload, list, get, download (file and stdout) and delete against the served emulator."""
    write_requests(tmp_path / "in.jsonl", 5)
    conn = connection(served)

    def call(*args: str) -> tuple[int, str]:
        code = run_cli([*args, *conn])
        return code, capsys.readouterr().out

    code, out = call("files", "upload", str(tmp_path / "in.jsonl"), "--json")
    assert code == 0
    file_id = json.loads(out)["id"]
    code, out = call("files", "list", "--json")
    assert file_id in [file["id"] for file in json.loads(out)]
    code, out = call("files", "get", file_id)
    assert code == 0 and file_id in out and "in.jsonl" in out
    code, out = call("files", "download", file_id, "-o", str(tmp_path / "copy.jsonl"))
    assert code == 0
    assert (tmp_path / "copy.jsonl").read_bytes() == (tmp_path / "in.jsonl").read_bytes()
    code, out = call("files", "delete", file_id)
    assert code == 0 and out.startswith("deleted")
    assert call("files", "get", file_id)[0] == 1


def test_files_upload_of_a_non_utf8_file_name(tmp_path: Path, served: ServedEmulator) -> None:
    """`files upload` of a file whose name is not UTF-8 exits 0; the stored name has U+FFFD."""
    name = os.fsdecode(b"in-\xff.jsonl")
    write_requests(tmp_path / name, 2)
    upload = cli("files", "upload", name, "--json", *connection(served), cwd=tmp_path)
    assert upload.returncode == 0, upload.stderr
    assert json.loads(upload.stdout)["filename"] == "in-\ufffd.jsonl"


def test_batches_results_into_a_closed_pipe_exits_quietly(
    tmp_path: Path, served: ServedEmulator
) -> None:
    """`batches results ID | head -1`: once the reader leaves, the command ends with exit
    code 141 (a SIGPIPE death's, as git's) and says nothing on stderr."""
    write_requests(tmp_path / "in.jsonl", 2000)
    conn = connection(served)
    upload = cli("files", "upload", "in.jsonl", "--json", *conn, cwd=tmp_path)
    created = cli(
        "batches", "create", json.loads(upload.stdout)["id"], "--json", *conn, cwd=tmp_path
    )
    batch_id = json.loads(created.stdout)["id"]
    assert cli("batches", "watch", batch_id, *conn, cwd=tmp_path).returncode == 0
    reader = subprocess.Popen(
        [sys.executable, "-m", "together_async", "batches", "results", batch_id, *conn],
        cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert reader.stdout is not None and reader.stderr is not None
    assert reader.stdout.readline().startswith(b'{"custom_id"')
    reader.stdout.close()  # as `head -1` does once it has its line
    stderr = reader.stderr.read()
    reader.stderr.close()
    assert reader.wait(timeout=RUN_TIMEOUT) == 141
    assert stderr == b""


def test_files_download_to_stdout(tmp_path: Path, served: ServedEmulator) -> None:
    """`files download ID` without -o writes the raw content to stdout."""
    write_requests(tmp_path / "in.jsonl", 4)
    upload = cli("files", "upload", "in.jsonl", "--json", *connection(served), cwd=tmp_path)
    file_id = json.loads(upload.stdout)["id"]
    download = cli("files", "download", file_id, *connection(served), cwd=tmp_path)
    assert download.returncode == 0
    assert download.stdout == (tmp_path / "in.jsonl").read_text()


def test_files_download_dash_is_byte_exact_stdout(tmp_path: Path, served: ServedEmulator) -> None:
    """`files download ID -o -` writes the stored bytes to stdout unchanged: CRLF line endings,
    no final newline, non-UTF-8 bytes."""
    content = b'{"custom_id": "a"}\r\n{"custom_id": "b"}\r\n\xff\x00tail' * 20_000
    (tmp_path / "crlf.jsonl").write_bytes(content)
    upload = cli(
        "files", "upload", "crlf.jsonl", "--no-check", "--json", *connection(served),
        cwd=tmp_path,
    )  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    file_id = json.loads(upload.stdout)["id"]
    download = subprocess.run(
        [sys.executable, "-m", "together_async", "files", "download", file_id, "-o", "-",
         *connection(served)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr
    assert download.stdout == content
    assert not (tmp_path / "-").exists()


def test_batches_subcommands(
    tmp_path: Path, served: ServedEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """create, watch, get, list and results against the served emulator."""
    ids = write_requests(tmp_path / "in.jsonl", 6, bad_rows=(2,))
    conn = connection(served)

    def call(*args: str) -> tuple[int, str]:
        code = run_cli([*args, *conn])
        return code, capsys.readouterr().out

    file_id = json.loads(call("files", "upload", str(tmp_path / "in.jsonl"), "--json")[1])["id"]
    code, out = call("batches", "create", file_id, "--json")
    assert code == 0
    batch_id = json.loads(out)["id"]
    code, out = call("batches", "watch", batch_id, "--poll-interval", "0.05")
    assert code == 0
    assert out.splitlines()[-1].split()[1:3] == [batch_id, "COMPLETED"]
    code, out = call("batches", "get", batch_id, "--json")
    assert json.loads(out)["status"] == "COMPLETED"
    code, out = call("batches", "list", "--json")
    assert batch_id in [job["id"] for job in json.loads(out)]
    code, out = call("batches", "results", batch_id, "-o", str(tmp_path / "res.jsonl"))
    assert code == 1  # one row failed
    rows = read_jsonl(tmp_path / "res.jsonl")
    assert sorted(row["custom_id"] for row in rows) == sorted(ids)
    assert [row["custom_id"] for row in rows if "error" in row] == [ids[2]]


def test_batches_cancel_and_watch_of_a_cancelled_job(
    tmp_path: Path, slow_served: ServedEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batches cancel` stops a running job; `watch` then ends with exit code 1."""
    write_requests(tmp_path / "in.jsonl", 200)
    conn = connection(slow_served)
    assert run_cli(["files", "upload", str(tmp_path / "in.jsonl"), "--json", *conn]) == 0
    file_id = json.loads(capsys.readouterr().out)["id"]
    assert run_cli(["batches", "create", file_id, "--json", *conn]) == 0
    batch_id = json.loads(capsys.readouterr().out)["id"]
    assert run_cli(["batches", "cancel", batch_id, *conn]) == 0
    assert batch_id in capsys.readouterr().out
    assert run_cli(["batches", "watch", batch_id, "--json", "--poll-interval", "0.05", *conn]) == 1
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["status"] == "CANCELLED"


def test_batches_results_of_a_running_job_says_to_wait(
    tmp_path: Path, slow_served: ServedEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batches results` on a job still running exits 1 pointing at `batches watch`."""
    write_requests(tmp_path / "in.jsonl", 200)
    conn = connection(slow_served)
    assert run_cli(["files", "upload", str(tmp_path / "in.jsonl"), "--json", *conn]) == 0
    file_id = json.loads(capsys.readouterr().out)["id"]
    assert run_cli(["batches", "create", file_id, "--json", *conn]) == 0
    batch_id = json.loads(capsys.readouterr().out)["id"]
    assert run_cli(["batches", "results", batch_id, *conn]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"batches watch {batch_id}" in captured.err


# --- output helpers --------------------------------------------------------------------------


def test_result_row_shapes() -> None:
    """A success keeps its body; a failure gets an error object and no body."""
    ok = BatchResult(custom_id="a", status_code=200, body={"x": 1})
    failed = BatchResult(custom_id="b", error_message="Invalid model", error_code="invalid_model")
    assert result_row(ok) == {"custom_id": "a", "status_code": 200, "body": {"x": 1}}
    assert result_row(failed) == {
        "custom_id": "b",
        "status_code": None,
        "error": {"message": "Invalid model", "code": "invalid_model"},
    }


async def test_input_order_writer_restores_input_order(tmp_path: Path) -> None:
    """Results added in any order come out in input order; failures also in the errors file."""
    writer = InputOrderWriter(tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl")
    await writer.open()
    for position in (3, 0, 2, 1):
        if position == 2:
            result = BatchResult(custom_id="c2", status_code=500, error_message="boom")
        else:
            result = BatchResult(custom_id=f"c{position}", status_code=200, body={})
        await writer.add(position, result)
    counts = await writer.commit(4)
    assert (counts.total, counts.ok, counts.failed) == (4, 3, 1)
    assert [row["custom_id"] for row in read_jsonl(tmp_path / "out.jsonl")] == [
        "c0", "c1", "c2", "c3",
    ]  # fmt: skip
    assert [row["custom_id"] for row in read_jsonl(tmp_path / "out.errors.jsonl")] == ["c2"]
    assert names_in(tmp_path) == ["out.errors.jsonl", "out.jsonl"]


async def test_input_order_writer_refuses_a_missing_row(tmp_path: Path) -> None:
    """A row without a result is an error, and no results file is left behind."""
    writer = InputOrderWriter(tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl")
    await writer.open()
    await writer.add(1, BatchResult(custom_id="b", status_code=200, body={}))
    with pytest.raises(RuntimeError, match="no result for input row 1"):
        await writer.commit(2)
    assert names_in(tmp_path) == []


async def test_input_order_writer_discard_leaves_nothing(tmp_path: Path) -> None:
    """After discard() (Ctrl-C) neither the spool nor a results file remains."""
    writer = InputOrderWriter(tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl")
    await writer.open()
    await writer.add(0, BatchResult(custom_id="a", status_code=200, body={}))
    await writer.discard()
    assert names_in(tmp_path) == []


def test_errors_path_sits_beside_the_results() -> None:
    """results.jsonl -> results.errors.jsonl; other names get the suffix appended."""
    assert errors_path_for(Path("out/results.jsonl")) == Path("out/results.errors.jsonl")
    assert errors_path_for(Path("results.txt")) == Path("results.txt.errors.jsonl")


def test_emulator_data_dir_sits_beside_the_state_file() -> None:
    """--emulator --state keeps the emulator's data next to the state, for resume."""
    assert emulator_data_dir(Path("runs/a.state")) == Path("runs/a.state.emulator")


def test_poll_intervals_move_out_of_each_others_way() -> None:
    """Either interval alone adjusts the other's default so the pair stays valid."""
    assert poll_intervals(None, None, default_first=2, default_longest=30) == (2, 30)
    assert poll_intervals(60, None, default_first=2, default_longest=30) == (60, 60)
    assert poll_intervals(None, 1, default_first=2, default_longest=30) == (1, 1)


def test_secrets_are_scrubbed() -> None:
    """Known keys are blanked out of text; very short strings are not treated as keys."""
    secrets = _Secrets("abcdef123456", "x")
    assert secrets.scrub("key=abcdef123456 x") == "key=<api key> x"


def test_run_display_counts_rows_and_jobs() -> None:
    """The live line estimates rows done from job progress and counts jobs done of those
    created, the shards still without a job, and the jobs by status."""
    from together_async import BatchJob, BatchJobStatus

    display = RunDisplay(sys.stderr)
    display.update(BatchJob(id="j1", status=BatchJobStatus.IN_PROGRESS, progress=50.0))
    progress = display.progress(BatchRunSummary(rows=200, shards=2, jobs=1, rows_ok=0))
    assert (progress.rows_done, progress.jobs, progress.jobs_done) == (50, 1, 0)
    assert display.line(progress, width=80, elapsed=0) == (
        " 25% 50/200 rows | jobs 0/1 done, 1 to create (1 IN_PROGRESS) | 00:00"
    )


def test_run_display_draws_from_a_worker_thread() -> None:
    """The display rewrites one line in place, and drawing needs no event loop."""
    from together_async import BatchJob, BatchJobStatus

    stream = io.StringIO()
    display = RunDisplay(stream, width=40)
    display.update(BatchJob(id="j1", status=BatchJobStatus.IN_PROGRESS, progress=50.0))
    progress = display.progress(BatchRunSummary(rows=200, shards=1, jobs=1))
    worker = threading.Thread(target=display.finish, args=(progress,))
    worker.start()
    worker.join()
    assert stream.getvalue() == "\r 50% 100/200 rows | jobs 0/1 done\x1b[K\n"


def test_run_on_a_terminal_shows_live_progress(tmp_path: Path) -> None:
    """With stderr on a terminal, `run` draws a progress line there; stdout keeps the summary."""
    write_requests(tmp_path / "in.jsonl", 200)
    run = cli_on_terminal(
        "run", "in.jsonl", "-o", "out.jsonl", "--emulator", "--emulator-latency", "0.05",
        cwd=tmp_path, env=_clean_env(), columns=120, rows=40, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0
    assert "100% " in run.shown
    assert "200/200 rows | jobs 1/1 done" in run.shown
    assert run.stdout.startswith("Done: 200 requests")


def on_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Run the CLI with stderr on an 80x24 pseudo-terminal; its exit code and what the
    terminal showed."""
    run = cli_on_terminal(*args, cwd=cwd, env=_clean_env(), timeout=RUN_TIMEOUT)
    return run.returncode, run.shown


def error_line(text: str) -> str:
    """The `together-async: error: ...` line of what a command wrote to stderr."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()]
    found = [line for line in lines if line.startswith("together-async: error:")]
    assert found, text
    return re.sub(r"request id \w+", "request id ...", found[-1])


@pytest.mark.parametrize("case", ["bad-input", "wrong-key", "state-mismatch"])
def test_run_errors_read_the_same_on_a_terminal_as_piped(
    tmp_path: Path, served: ServedEmulator, case: str
) -> None:
    """An error during `run` shows the real message on a terminal, exactly as when stderr is
    piped: never a wrapped ExceptionGroup."""
    write_requests(tmp_path / "in.jsonl", 5)
    args = ["run", "in.jsonl", "-o", "out.jsonl"]
    if case == "bad-input":
        (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "body": {}}\nnot json\n')
        args += ["--emulator"]
    elif case == "wrong-key":
        args += ["--base-url", served.base_url, "--api-key", "wrong-key-1c0ffee"]
    else:
        write_requests(tmp_path / "other.jsonl", 7)
        first = cli(
            "run", "other.jsonl", "-o", "o.jsonl", "--emulator", "--state", "s.db", cwd=tmp_path
        )
        assert first.returncode == 0, first.stderr
        args += ["--emulator", "--state", "s.db"]
    piped = cli(*args, cwd=tmp_path)
    code, shown = on_terminal(*args, cwd=tmp_path)
    assert piped.returncode == code == 1
    assert "ExceptionGroup" not in shown and "unexpected" not in shown
    assert error_line(shown) == error_line(piped.stderr)


def run_args(*argv: str) -> argparse.Namespace:
    """`run` arguments as the parser gives them."""
    from together_async.cli import build_parser

    return build_parser().parse_args(["run", *argv])


@pytest.mark.parametrize(
    ("jobs", "words"),
    [
        (1, "1 batch job already created keeps running and is"),
        (2, "2 batch jobs already created keep running and are"),
    ],
)
def test_interrupted_message_agrees_in_number(jobs: int, words: str) -> None:
    """One job "keeps running and is recorded"; two "keep running and are"."""
    args = run_args("in.jsonl", "-o", "out.jsonl", "--state", "s.db", "--base-url", "http://h/v1")
    assert words in interrupted_message(args, jobs)


def test_interrupted_message_without_state_agrees_in_number() -> None:
    """Without --state one job "was cancelled", two "were"."""
    args = run_args("in.jsonl", "-o", "out.jsonl", "--emulator")
    assert "1 batch job this run created was cancelled" in interrupted_message(args, 1)
    assert "2 batch jobs this run created were cancelled" in interrupted_message(args, 2)


def test_resume_command_carries_the_options_and_never_the_key() -> None:
    """The printed command repeats the options the run depends on, quoted, and not the key."""
    args = run_args(
        "my input.jsonl", "-o", "out.jsonl", "--state", "s.db", "--endpoint", "/v1/completions",
        "--model", "m", "--max-requests-per-batch", "10", "--max-attempts", "2",
        "--poll-interval", "0.5", "--base-url", "http://h/v1", "--api-key", "sk-secret-123",
    )  # fmt: skip
    message = interrupted_message(args, 3)
    command = resume_command(args)
    assert shlex.split(command) == [
        "together-async", "run", "my input.jsonl", "-o", "out.jsonl", "--state", "s.db",
        "--endpoint", "/v1/completions", "--model", "m", "--max-requests-per-batch", "10",
        "--max-attempts", "2", "--poll-interval", "0.5", "--base-url", "http://h/v1",
    ]  # fmt: skip
    assert "sk-secret-123" not in message and "TOGETHER_API_KEY" in message


def test_render_summary_names_the_files() -> None:
    """The human summary gives the counts, tokens and where the results are."""
    from together_async._cli_results import RunSummary

    summary = RunSummary(
        input=Path("in.jsonl"), output=Path("out.jsonl"), errors_output=Path("out.errors.jsonl"),
        endpoint="/v1/chat/completions", jobs=2, shards=2, rows=10, rows_ok=9, rows_failed=1,
        resubmitted_rows=0, prompt_tokens=100, completion_tokens=50, total_tokens=150,
        wall_seconds=2.5, resumed=False, emulator=False, state=None,
    )  # fmt: skip
    text = render_summary(summary)
    assert "10 requests in 2 batch jobs, 2.5 s" in text
    assert "failed:       1" in text and "150 (100 prompt + 50 completion)" in text
    assert "out.errors.jsonl" in text


def test_ctrl_c_while_starting_up_exits_130_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C before the command runs (while importing and parsing) is exit 130 with one
    line, not a traceback."""
    import together_async.cli as cli_module

    def interrupted(argv: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "run_cli", interrupted)
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["run", "x.jsonl", "-o", "y.jsonl"])
    assert exited.value.code == 130
