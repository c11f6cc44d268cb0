"""The shipped examples run as README shows them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_seed_flow_example_runs_on_the_emulator(tmp_path: Path) -> None:
    """examples/seed_flow.py completes the seed docs' flow and writes both results."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_flow.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Status: COMPLETED" in done.stdout
    assert "request-1: ok=True" in done.stdout and "request-2: ok=True" in done.stdout
    rows = [
        orjson.loads(line) for line in (tmp_path / "batch_results.jsonl").read_bytes().splitlines()
    ]
    assert sorted(row["custom_id"] for row in rows) == ["request-1", "request-2"]
