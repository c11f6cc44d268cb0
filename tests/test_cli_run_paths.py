"""`together-async run` refuses outputs that would clobber its input or its state, before any
work, cleans the staging files a killed run left beside its output, and writes into outputs
that are not regular files (a FIFO, a device, stdout) instead of renaming over them."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from together_async._cli_results import OutputTarget, remove_stale_staging, write_result_rows
from together_async._cli_run import interrupted_message
from together_async._models import BatchResult
from together_async.cli import build_parser, run_cli

MODEL = "meta-llama/Llama-3.2-3B-Instruct-Turbo"


def write_requests(path: Path, count: int = 3) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"r{index}",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            }
        )
        for index in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path.read_bytes()


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_run_refuses_an_output_equal_to_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run x -o x` exits 1 naming the clash, and the input is left as it was."""
    source = tmp_path / "in.jsonl"
    before = write_requests(source)
    assert run_cli(["run", str(source), "-o", str(source), "--emulator"]) == 1
    assert "is the input file" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_run_refuses_an_output_that_is_a_hard_link_to_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another name for the input file is the input file."""
    source = tmp_path / "in.jsonl"
    before = write_requests(source)
    os.link(source, tmp_path / "alias.jsonl")
    assert run_cli(["run", str(source), "-o", str(tmp_path / "alias.jsonl"), "--emulator"]) == 1
    assert "is the input file" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_run_refuses_an_output_equal_to_the_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o S --state S` exits 1 before any work: no state, no emulator data are made."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    state = tmp_path / "run.state"
    assert run_cli(["run", str(source), "-o", str(state), "--state", str(state), "--emulator"]) == 1
    assert "is the --state file" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


def test_run_refuses_an_output_inside_the_state_files_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's own files directory is not a place for its results."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    state = tmp_path / "run.state"
    files = tmp_path / "run.state.files"
    files.mkdir()
    code = run_cli(
        ["run", str(source), "-o", str(files / "out.jsonl"), "--state", str(state), "--emulator"]
    )
    assert code == 1
    assert "which the run keeps its files in" in capsys.readouterr().err
    assert not state.exists()


def test_run_refuses_a_state_file_equal_to_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--state` naming the input would turn the batch file into a database."""
    source = tmp_path / "in.jsonl"
    before = write_requests(source)
    out = tmp_path / "out.jsonl"
    assert run_cli(["run", str(source), "-o", str(out), "--state", str(source), "--emulator"]) == 1
    assert "--state" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_a_killed_runs_spool_is_removed_by_the_next_run_on_the_same_output(
    tmp_path: Path,
) -> None:
    """Staging files of a dead process beside the output go; the new run's results land."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    out = tmp_path / "out.jsonl"
    dead = a_dead_pid()
    leftovers = [
        tmp_path / f".out.jsonl.{dead}.spool",
        tmp_path / f".out.jsonl.{dead}.partial",
        tmp_path / f".out.errors.jsonl.{dead}.partial",
    ]
    for path in leftovers:
        path.write_bytes(b"x" * 100)
    assert run_cli(["run", str(source), "-o", str(out), "--emulator"]) == 0
    assert not any(path.exists() for path in leftovers)
    assert len(out.read_text().splitlines()) == 3


def test_staging_files_of_a_live_process_are_kept(tmp_path: Path) -> None:
    """Another run still writing beside the same output keeps its spool."""
    out = tmp_path / "out.jsonl"
    live = tmp_path / f".out.jsonl.{os.getppid()}.spool"
    unrelated = tmp_path / ".out.jsonl.notes"
    live.write_bytes(b"x")
    unrelated.write_bytes(b"x")
    assert remove_stale_staging(out) == []
    assert live.exists() and unrelated.exists()


def test_run_refuses_an_output_that_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run x -o DIR` exits 1 saying it is a directory, and writes nothing into it."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(["run", str(source), "-o", str(out), "--emulator"]) == 1
    assert "is a directory: give a file path" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("option", ["-o", "--state"])
@pytest.mark.parametrize("value", ["", "/"])
def test_run_refuses_an_empty_or_root_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    """An empty or nameless path for -o or --state is a usage error (exit 2) naming the option."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    args = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--emulator"]
    args += [option, value]
    with pytest.raises(SystemExit) as exited:
        run_cli(args)
    assert exited.value.code == 2
    assert "must be a file path" in capsys.readouterr().err


# ---- output targets that are not regular files: FIFOs, devices, stdout, symlinks ----------


def write_mixed_requests(path: Path, count: int, *, bad_rows: tuple[int, ...] = ()) -> list[str]:
    """`count` rows `r0`, `r1`, ...; those in `bad_rows` lack messages (the emulator's 400)."""
    ids = [f"r{index}" for index in range(count)]
    with path.open("w") as file:
        for index, custom_id in enumerate(ids):
            body: dict[str, Any] = {"model": MODEL}
            if index not in bad_rows:
                body["messages"] = [{"role": "user", "content": f"hi {index}"}]
            file.write(json.dumps({"custom_id": custom_id, "body": body}) + "\n")
    return ids


def assert_result_lines(data: bytes, ids: list[str]) -> list[dict[str, Any]]:
    """`data` is exactly one compact JSON line per id, in that order; the rows."""
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    rows = [orjson.loads(line) for line in lines]
    assert [orjson.dumps(row) for row in rows] == lines
    assert [row["custom_id"] for row in rows] == ids
    return rows


class FifoReader:
    """A FIFO at `path` read to its end by a thread, as `cat path` would.

    Its read end is open from the start (so the run never waits for a reader), and the thread
    can be told to stop: a run that never writes into the FIFO (replacing it, say) fails the
    test instead of hanging it.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.data = b""
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_read, select.POLLIN)
        chunks = []
        while True:
            # No POLLHUP before a writer has come and gone: the wait is for the run.
            # The FIFO first: once the run has closed it, it stays ready until its end is read.
            ready = {fd for fd, _ in poller.poll()}
            if self._fd not in ready:
                break  # told to stop
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
        self.data = b"".join(chunks)

    def __enter__(self) -> FifoReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            os.write(self._stop_write, b"x")  # the run ended without closing the FIFO
        self._thread.join()
        for fd in (self._fd, self._stop_read, self._stop_write):
            os.close(fd)


def test_run_into_a_fifo_writes_the_results_into_it_in_input_order(tmp_path: Path) -> None:
    """A FIFO's reader gets exactly the result lines, in input order; it stays a FIFO."""
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 7)
    args = ["run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"]
    with FifoReader(tmp_path / "out.fifo") as reader:
        assert run_cli([*args, "--max-requests-per-batch", "2"]) == 0
    assert_result_lines(reader.data, ids)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out.fifo").st_mode)


def test_run_into_a_fifo_creates_nothing_beside_it(tmp_path: Path) -> None:
    """No errors file, spool or staging file appears beside a FIFO, even with failed rows."""
    source = tmp_path / "in.jsonl"
    write_mixed_requests(source, 4, bad_rows=(1,))
    with FifoReader(tmp_path / "out.fifo"):
        assert run_cli(["run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"]) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.fifo"]


def test_run_into_a_fifo_keeps_failed_rows_in_the_results_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The failed rows are in the stream, and the summary says there is no errors file."""
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 4, bad_rows=(1, 2))
    with FifoReader(tmp_path / "out.fifo") as reader:
        code = run_cli(["run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"])
    assert code == 1
    rows = assert_result_lines(reader.data, ids)
    assert ["error" in row for row in rows] == [False, True, True, False]
    out = capsys.readouterr().out
    assert "Failed requests are in the results only" in out
    assert "Failed requests only:" not in out


def test_run_into_a_fifo_json_summary_has_no_errors_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json says `errors_output: null` when no errors file was written."""
    source = tmp_path / "in.jsonl"
    write_mixed_requests(source, 2)
    with FifoReader(tmp_path / "out.fifo"):
        code = run_cli(
            ["--json", "run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"]
        )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(tmp_path / "out.fifo") and summary["errors_output"] is None


def test_without_state_a_fifos_spool_goes_to_tmpdir_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool of a run into a FIFO is made in TMPDIR and gone once the run ends."""
    spools = tmp_path / "tmpdir"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 3)
    with FifoReader(tmp_path / "out.fifo") as reader:
        assert run_cli(["run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"]) == 0
    assert_result_lines(reader.data, ids)
    assert list(spools.iterdir()) == []


def test_ctrl_c_while_a_fifo_waits_for_its_reader_leaves_it_as_it_was(tmp_path: Path) -> None:
    """No reader yet: the run says it waits; Ctrl-C then ends it (130), FIFO kept, no spool."""
    source = tmp_path / "in.jsonl"
    write_mixed_requests(source, 2)
    os.mkfifo(tmp_path / "out.fifo")
    spools = tmp_path / "tmpdir"
    spools.mkdir()
    with subprocess.Popen(
        [sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "out.fifo",
         "--emulator"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(spools)},
    ) as process:  # fmt: skip
        assert process.stderr is not None
        assert "waiting for a reader to open out.fifo" in process.stderr.readline()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out.fifo").st_mode)
    assert list(spools.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.fifo", "tmpdir"]


def test_a_failed_run_into_a_fifo_ends_its_stream_and_leaves_no_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid input fails the run; the FIFO's reader sees an empty stream end."""
    source = tmp_path / "in.jsonl"
    source.write_text("not json\n")
    state = tmp_path / "run.state"
    args = ["run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"]
    with FifoReader(tmp_path / "out.fifo") as reader:
        assert run_cli([*args, "--state", str(state)]) == 1
    assert "invalid input" in capsys.readouterr().err
    assert reader.data == b""
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".spool")]


def test_a_killed_runs_spool_for_a_fifo_is_removed_from_the_state_directory(
    tmp_path: Path,
) -> None:
    """A FIFO's run spools beside --state; a dead run's spool there goes on the next run."""
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 2)
    leftover = tmp_path / f".together-async-run.{a_dead_pid()}.0123abcd.spool"
    leftover.write_bytes(b"x" * 100)
    args = ["run", str(source), "-o", str(tmp_path / "out.fifo"), "--emulator"]
    with FifoReader(tmp_path / "out.fifo") as reader:
        assert run_cli([*args, "--state", str(tmp_path / "run.state")]) == 0
    assert_result_lines(reader.data, ids)
    assert not leftover.exists()


def test_run_refuses_a_fifo_output_inside_the_state_files_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The path checks apply to a FIFO too, before it is opened."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    files = tmp_path / "run.state.files"
    files.mkdir()
    os.mkfifo(files / "out.fifo")
    args = ["run", str(source), "-o", str(files / "out.fifo"), "--emulator"]
    assert run_cli([*args, "--state", str(tmp_path / "run.state")]) == 1
    assert "which the run keeps its files in" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(files / "out.fifo").st_mode)


def test_run_refuses_a_socket_output_and_leaves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket cannot be opened for writing: a clear error, and it stays a socket."""
    source = tmp_path / "in.jsonl"
    write_requests(source)
    monkeypatch.chdir(tmp_path)  # a short relative name fits a socket address
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind("out.sock")
        assert run_cli(["run", str(source), "-o", "out.sock", "--emulator"]) == 1
    assert "cannot write to a socket" in capsys.readouterr().err
    assert stat.S_ISSOCK(os.lstat(tmp_path / "out.sock").st_mode)


def test_a_character_device_is_written_into_not_renamed_over() -> None:
    """/dev/null is located as a direct target (only stat is called on it here)."""
    target = OutputTarget.locate(Path(os.devnull))
    assert target.direct and target.path == Path(os.devnull)


def test_run_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    """The link stays a link to the same file, which now holds the results."""
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 3)
    (tmp_path / "target.jsonl").write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to("target.jsonl")
    assert run_cli(["run", str(source), "-o", str(link), "--emulator"]) == 0
    assert os.readlink(link) == "target.jsonl"
    assert_result_lines((tmp_path / "target.jsonl").read_bytes(), ids)


def test_run_through_a_symlink_puts_the_errors_file_beside_the_link(tmp_path: Path) -> None:
    """The errors file is named after the path given (the link), as for any output."""
    source = tmp_path / "in.jsonl"
    write_mixed_requests(source, 3, bad_rows=(0,))
    elsewhere = tmp_path / "runs"
    elsewhere.mkdir()
    (elsewhere / "target.jsonl").write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(elsewhere / "target.jsonl")
    assert run_cli(["run", str(source), "-o", str(link), "--emulator"]) == 1
    errors = (tmp_path / "link.errors.jsonl").read_bytes()
    assert_result_lines(errors, ["r0"])
    assert sorted(path.name for path in elsewhere.iterdir()) == ["target.jsonl"]


def test_run_through_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    """A link to a file not there yet gets that file, as `> link` would."""
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 2)
    link = tmp_path / "link.jsonl"
    link.symlink_to("new.jsonl")
    assert run_cli(["run", str(source), "-o", str(link), "--emulator"]) == 0
    assert link.is_symlink()
    assert_result_lines((tmp_path / "new.jsonl").read_bytes(), ids)


def test_run_refuses_a_symlink_to_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link to the input is the input: refused, and the input is left as it was."""
    source = tmp_path / "in.jsonl"
    before = write_requests(source)
    (tmp_path / "link.jsonl").symlink_to(source)
    assert run_cli(["run", str(source), "-o", str(tmp_path / "link.jsonl"), "--emulator"]) == 1
    assert "is the input file" in capsys.readouterr().err
    assert source.read_bytes() == before and (tmp_path / "link.jsonl").is_symlink()


def test_run_to_stdout_writes_only_the_results_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`-o -`: stdout is exactly the result lines, in input order; the summary is on stderr."""
    monkeypatch.chdir(tmp_path)  # were a file named `-` written, it would be here
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 5, bad_rows=(3,))
    args = ["run", str(source), "-o", "-", "--emulator", "--max-requests-per-batch", "2"]
    assert run_cli(args) == 1
    captured = capsysbinary.readouterr()
    assert_result_lines(captured.out, ids)
    assert b"Results (one line per request, in input order): stdout" in captured.err
    assert b"Failed requests are in the results only" in captured.err


def test_run_to_stdout_puts_the_json_summary_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`-o - --json`: the JSON summary goes to stderr, naming `-` and no errors file."""
    monkeypatch.chdir(tmp_path)  # were a file named `-` written, it would be here
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 2)
    assert run_cli(["--json", "run", str(source), "-o", "-", "--emulator"]) == 0
    captured = capsysbinary.readouterr()
    assert_result_lines(captured.out, ids)
    summary = json.loads(captured.err)
    assert summary["output"] == "-" and summary["errors_output"] is None


def test_run_to_stdout_creates_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """No file named `-` or `-.errors.jsonl`, no spool, is left in the working directory."""
    source = tmp_path / "in.jsonl"
    write_mixed_requests(source, 2, bad_rows=(0,))
    monkeypatch.chdir(tmp_path)
    assert run_cli(["run", "in.jsonl", "-o", "-", "--emulator"]) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


def test_run_to_stdout_appended_to_the_input_is_refused(tmp_path: Path) -> None:
    """`run in.jsonl -o - >> in.jsonl` is caught before any work: the input is unchanged."""
    source = tmp_path / "in.jsonl"
    before = write_requests(source)
    with source.open("ab") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "-", "--emulator"],
            cwd=tmp_path,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert "stdout is the input file" in done.stderr
    assert source.read_bytes() == before


def test_run_to_stdout_whose_reader_leaves_exits_quietly(tmp_path: Path) -> None:
    """`run ... -o - | head -c 10`: exit 141 as a pipeline expects, no error printed."""
    source = tmp_path / "in.jsonl"
    write_mixed_requests(source, 1000)  # more than a pipe holds
    read_fd, write_fd = os.pipe()
    with subprocess.Popen(
        [sys.executable, "-m", "together_async", "run", "in.jsonl", "-o", "-", "--emulator",
         "--emulator-latency", "0"],
        cwd=tmp_path, stdout=write_fd, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            assert len(reader.read(10)) == 10
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141
    assert "error" not in stderr


# ---- `batches results -o`: the same rules, for rows written in the order they come ----------


def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def some_results() -> AsyncIterator[BatchResult]:
    yield BatchResult(custom_id="a", status_code=200, body={"n": 1})
    yield BatchResult(custom_id="b", status_code=400, error_message="bad", error_code="x")


async def test_result_rows_into_a_fifo_are_written_into_it(tmp_path: Path) -> None:
    """`batches results -o FIFO` writes the rows into the FIFO, which stays one."""
    with FifoReader(tmp_path / "out.fifo") as reader:
        counts = await write_result_rows(some_results(), tmp_path / "out.fifo")
    assert (counts.total, counts.failed) == (2, 1)
    assert_result_lines(reader.data, ["a", "b"])
    assert names_in(tmp_path) == ["out.fifo"]


async def test_result_rows_through_a_symlink_replace_its_target(tmp_path: Path) -> None:
    """`batches results -o LINK` writes the file the link names; the link stays."""
    (tmp_path / "target.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to("target.jsonl")
    await write_result_rows(some_results(), tmp_path / "link.jsonl")
    assert (tmp_path / "link.jsonl").is_symlink()
    assert_result_lines((tmp_path / "target.jsonl").read_bytes(), ["a", "b"])


async def test_result_rows_to_dash_go_to_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`batches results -o -` is stdout, not a file named `-`."""
    monkeypatch.chdir(tmp_path)
    await write_result_rows(some_results(), Path("-"))
    assert_result_lines(capsysbinary.readouterr().out, ["a", "b"])
    assert names_in(tmp_path) == []


def test_an_errors_file_that_is_a_fifo_gets_the_failed_rows(tmp_path: Path) -> None:
    """`out.errors.jsonl` a FIFO: the failed rows go into it; results land in out.jsonl."""
    source = tmp_path / "in.jsonl"
    ids = write_mixed_requests(source, 4, bad_rows=(2,))
    with FifoReader(tmp_path / "out.errors.jsonl") as reader:
        assert run_cli(["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--emulator"]) == 1
    assert_result_lines(reader.data, ["r2"])
    assert_result_lines((tmp_path / "out.jsonl").read_bytes(), ids)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out.errors.jsonl").st_mode)


def test_ctrl_c_with_stdout_output_suggests_a_state_beside_the_input() -> None:
    """`-o -` has no directory to put a state file in: the hint puts it beside the input."""
    args = build_parser().parse_args(["run", "data/in.jsonl", "-o", "-", "--emulator"])
    message = interrupted_message(args, 1, output_is_file=False)
    assert "--state data/in.jsonl.state" in message and "-.state" not in message
