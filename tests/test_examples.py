"""The shipped examples run as README shows them."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeEmulator

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


# -- examples/web_service.py ---------------------------------------------------------------------


def _load_web_service() -> ModuleType:
    spec = importlib.util.spec_from_file_location("web_service", EXAMPLES / "web_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


web_service = _load_web_service()


def _chat(question: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": 20}


async def _ndjson(http: aiohttp.ClientSession, path: str) -> list[dict[str, Any]]:
    async with http.get(path) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Transfer-Encoding"] == "chunked"
        return [orjson.loads(line) async for line in response.content if line.strip()]


async def test_web_service_handles_concurrent_submits_polls_and_streams(
    make_emulator: MakeEmulator,
) -> None:
    """Concurrent submits, status polls and waits, streamed results; shutdown closes the client."""
    emu = await make_emulator(latency=0.005)
    app = web_service.make_app(base_url=emu.base_url, api_key=emu.api_key, poll_interval=0.05)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=server.make_url("/")) as http:

            async def submit(number: int) -> str:
                requests = [_chat(f"question {number}.{row}") for row in range(number + 1)]
                async with http.post("/batches", json=requests) as response:
                    assert response.status == 201, await response.text()
                    job = await response.json()
                return str(job["id"])

            async def status(batch_id: str, query: str = "") -> dict[str, Any]:
                async with http.get(f"/batches/{batch_id}{query}") as response:
                    assert response.status == 200, await response.text()
                    job: dict[str, Any] = await response.json()
                    return job

            ids = await asyncio.gather(*(submit(number) for number in range(6)))
            assert len(set(ids)) == 6
            polled = await asyncio.gather(
                *(status(batch_id) for batch_id in ids),
                *(status(batch_id, "?wait=30") for batch_id in ids),
            )
            assert [job["id"] for job in polled] == ids + ids
            assert all(job["status"] == "COMPLETED" for job in polled[6:])
            streamed = await asyncio.gather(
                *(_ndjson(http, f"/batches/{batch_id}/results") for batch_id in ids)
            )
        for number, rows in enumerate(streamed):
            assert sorted(row["custom_id"] for row in rows) == [
                f"request-{row}" for row in range(number + 1)
            ]
            assert all(row["status_code"] == 200 and "choices" in row["body"] for row in rows)
        client = app[web_service.CLIENT]
    finally:
        await server.close()
    assert client.is_closed
    await emu.close()  # its own connection handlers end with it; what is left is the service's
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []


async def test_web_service_answers_bad_requests_in_json(make_emulator: MakeEmulator) -> None:
    """Bad input is 400, an unknown job 404, results of a running job 409, all as JSON errors."""
    emu = await make_emulator(latency=30.0)  # the one job stays IN_PROGRESS for the test
    app = web_service.make_app(base_url=emu.base_url, api_key=emu.api_key)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=server.make_url("/")) as http:
            duplicate = [{"custom_id": "a", "body": _chat("x")}] * 2
            for body, query in [
                ([], ""),
                (["text"], ""),
                (duplicate, ""),
                ([_chat("x")], "?endpoint=/v2"),
            ]:
                async with http.post(f"/batches{query}", json=body) as response:
                    assert response.status == 400, (body, query)
                    assert (await response.json())["error"]
            async with http.get("/batches/no-such-job") as response:
                assert response.status == 404 and (await response.json())["error"]
            async with http.post("/batches", json=[_chat("slow")]) as response:
                running = (await response.json())["id"]
            async with http.get(f"/batches/{running}/results") as response:
                assert response.status == 409
                assert "wait for it to end" in (await response.json())["error"]
    finally:
        await server.close()


def test_web_service_script_serves_on_its_emulator_and_stops_cleanly(tmp_path: Path) -> None:
    """`python examples/web_service.py --emulator` serves, then exits 0 on SIGINT, no warning."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "error",
            str(EXAMPLES / "web_service.py"),
            "--emulator",
            "--port",
            "0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()  # bounded by pytest-timeout if it never comes
        assert ready.startswith("web service ready: "), ready
        base = ready.split()[-1]
        request = urllib.request.Request(
            f"{base}/batches",
            data=orjson.dumps([_chat("hello"), _chat("there")]),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            batch_id = orjson.loads(response.read())["id"]
        with urllib.request.urlopen(f"{base}/batches/{batch_id}?wait=30", timeout=60) as response:
            assert orjson.loads(response.read())["status"] == "COMPLETED"
        with urllib.request.urlopen(f"{base}/batches/{batch_id}/results", timeout=30) as response:
            rows = [orjson.loads(line) for line in response.read().splitlines()]
        assert sorted(row["custom_id"] for row in rows) == ["request-0", "request-1"]
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert not re.search(r"Warning|Unclosed|Traceback|Exception ignored|destroyed", stderr), stderr
