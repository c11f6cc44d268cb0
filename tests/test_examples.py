"""The shipped examples run as README shows them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

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


# -- examples/notebook.ipynb in a real Jupyter kernel --------------------------------------------

# Run before the notebook's own cells: every warning is shown (ResourceWarning is hidden by
# default), so an unclosed session or a TqdmWarning reaches a cell's stderr, which is checked.
SHOW_WARNINGS = "import warnings\nwarnings.simplefilter('default')"

# Run after them: nothing of ours left behind (collected sessions warn now, not at exit).
LEFT_BEHIND = """\
import asyncio, gc
gc.collect()
ours = [
    task for task in asyncio.all_tasks()
    if task is not asyncio.current_task()
    and any(name in repr(task.get_coro()) for name in ("together_async", "aiohttp"))
]
assert not ours, ours
assert client.is_closed
"""


def _stderr_of(cell: Any) -> str:
    return "".join(
        output.get("text", "")
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream" and output.get("name") == "stderr"
    )


def test_notebook_runs_in_a_kernel_without_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/notebook.ipynb runs top to bottom in an ipykernel: no error, no warning."""
    import nbclient
    import nbformat

    # jupyter_core warns about its path migration unless told which layout to use.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    for name in [name for name in os.environ if name.startswith("TOGETHER_")]:
        monkeypatch.delenv(name)
    notebook = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    shipped = len(notebook.cells)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(SHOW_WARNINGS))
    notebook.cells.append(nbformat.v4.new_code_cell(LEFT_BEHIND))
    runner = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    runner.execute()  # CellExecutionError on the first cell that raises
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(notebook.cells) == shipped + 2
    warned = {
        index: _stderr_of(cell)
        for index, cell in enumerate(code_cells)
        if re.search(r"Warning|Unclosed|Traceback", _stderr_of(cell))
    }
    assert not warned, warned
    outputs = "".join(
        output.get("text", "") for cell in code_cells for output in cell.get("outputs", [])
    )
    assert "COMPLETED" in outputs and "2000 of 2000 succeeded" in outputs
