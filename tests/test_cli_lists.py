"""`files list` and `batches list`: newest first by created_at, `--oldest-first` reversed,
entries without a time last, the same order in the table and in `--json`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import pytest

from together_async import BatchJob, BatchJobStatus
from together_async._models import FileList, FileObject
from together_async.cli import by_creation, run_cli

START = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
# The server's order on purpose: neither newest nor oldest first, one entry without a time.
CREATED = {"b": START + timedelta(hours=1), "none": None, "c": START + timedelta(hours=2),
           "a": START}  # fmt: skip
NEWEST_FIRST = ["c", "b", "a", "none"]
OLDEST_FIRST = ["a", "b", "c", "none"]


class FakeClient:
    """Stands in for AsyncTogether: lists the same four files and jobs, in CREATED's order."""

    def __init__(self, **_: Any) -> None:
        self.files = self
        self.batches = self

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def list(self) -> FileList:
        return FileList(
            data=[
                FileObject(id=f"file-{name}", filename=f"{name}.jsonl", created_at=when)
                for name, when in CREATED.items()
            ]
        )

    async def list_batches(self) -> Sequence[BatchJob]:
        return [
            BatchJob(id=f"batch-{name}", status=BatchJobStatus.COMPLETED, created_at=when)
            for name, when in CREATED.items()
        ]


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("together_async.cli.AsyncTogether", FakeClient)


def listed(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[list[str], list[str]]:
    """The ids `argv` lists as a table, and as JSON."""
    assert run_cli([*argv, "--api-key", "k"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert run_cli([*argv, "--api-key", "k", "--json"]) == 0
    objects = json.loads(capsys.readouterr().out)
    return [line.split()[0] for line in table[1:]], [item["id"] for item in objects]


@pytest.mark.parametrize("kind", ["files", "batches"])
def test_list_is_newest_first_in_the_table_and_the_json(
    kind: str, fake_client: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both lists show the newest first, the undated last, the same in table and JSON."""
    prefix = "file" if kind == "files" else "batch"
    expected = [f"{prefix}-{name}" for name in NEWEST_FIRST]
    assert listed(capsys, kind, "list") == (expected, expected)


@pytest.mark.parametrize("option", ["--oldest-first", "--reverse"])
@pytest.mark.parametrize("kind", ["files", "batches"])
def test_list_oldest_first_reverses_the_dated_entries(
    kind: str, option: str, fake_client: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """--oldest-first (alias --reverse) lists the oldest first; the undated stay last."""
    prefix = "file" if kind == "files" else "batch"
    expected = [f"{prefix}-{name}" for name in OLDEST_FIRST]
    assert listed(capsys, kind, "list", option) == (expected, expected)


def test_by_creation_keeps_the_server_order_among_equal_times() -> None:
    """Entries created in the same second keep the order the server gave them."""
    jobs = [BatchJob(id=name, created_at=START) for name in ("x", "y", "z")]
    assert [job.id for job in by_creation(jobs)] == ["x", "y", "z"]
    assert [job.id for job in by_creation(jobs, oldest_first=True)] == ["x", "y", "z"]


def test_by_creation_orders_naive_and_aware_times_together() -> None:
    """A naive created_at (a hand-made object) sorts with aware ones instead of raising."""
    naive = datetime(2030, 1, 1)
    jobs = [BatchJob(id="aware", created_at=START), BatchJob(id="naive", created_at=naive)]
    assert [job.id for job in by_creation(jobs)] == ["naive", "aware"]
