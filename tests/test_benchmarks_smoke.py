"""The benchmark runner still runs end to end (tiny sizes), so the benchmarks cannot rot.

No timing is asserted here: benchmarks are not tests. Only that every workload and every
contender produced a figure and that the report was written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "## 0. Context: the emulator itself",
    "## 1. Call overhead",
    "## 2. Upload",
    "## 3. Validation",
    "## 4. Results",
    "## 5. Event-loop health",
    "## 6. End to end",
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_benchmark_runs_and_reports(tmp_path: Path) -> None:
    """`python -m benchmarks --tiny` measures every contender of every workload and writes it."""
    output = tmp_path / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--output", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = output.read_text(encoding="utf-8")
    assert report == completed.stdout.rstrip("\n") + "\n"
    missing = [title for title in SECTIONS if title not in report]
    assert not missing, f"sections missing from the report: {missing}\n{report}"
    broken = [line for line in report.splitlines() if "failed:" in line or "not measured" in line]
    assert not broken, "\n".join(broken)
