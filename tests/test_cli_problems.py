"""`run` and `validate` word the problems of a bad batch file the same way, line for line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BAD_LINES = [
    json.dumps({"custom_id": "a", "body": {}}),
    "{not json",
    json.dumps({"custom_id": "a", "body": {}}),  # duplicates line 1
    json.dumps({"custom_id": "", "body": "text"}),  # two problems on one line
    json.dumps({"custom_id": "x" * 65, "body": {}}),
    json.dumps({"custom_id": 7, "body": {}}),
    json.dumps({"custom_id": "m", "body": {}, "method": "GET"}),
    json.dumps({"custom_id": "u", "body": {}, "url": "/v1/embeddings"}),
    json.dumps(["not", "an", "object"]),
    json.dumps({"custom_id": "no-body"}),
    "",  # a blank line
    json.dumps({"custom_id": "b", "body": [1]}),
]


def together_async(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOGETHER_")}
    return subprocess.run(
        [sys.executable, "-m", "together_async", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_run_and_validate_list_the_same_problems_alike(tmp_path: Path) -> None:
    """The report `validate` prints is exactly the one `run` gives after its error prefix."""
    (tmp_path / "bad.jsonl").write_text("\n".join(BAD_LINES) + "\n")
    endpoint = ["--endpoint", "/v1/chat/completions"]
    validated = together_async("validate", "bad.jsonl", *endpoint, cwd=tmp_path)
    ran = together_async("run", "bad.jsonl", "-o", "out.jsonl", "--emulator", *endpoint,
                         cwd=tmp_path)  # fmt: skip
    assert validated.returncode == ran.returncode == 1
    report = validated.stdout
    assert report.startswith("bad.jsonl: 12 problems\n  line 2: not valid JSON")
    assert "  line 4: custom_id: is empty\n  line 4: body: must be a JSON object" in report
    assert ran.stdout == ""
    assert ran.stderr == f"together-async: error: invalid input {report}"
