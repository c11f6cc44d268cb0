"""`together-async run` refuses outputs that would clobber its input or its state, before any
work, and cleans the staging files a killed run left beside its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from together_async._cli_results import remove_stale_staging
from together_async.cli import run_cli

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
