"""The resume state file: recording steps, refusing other runs, surviving a killed process."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from together_async import InvalidArgumentError, ManifestMismatchError
from together_async.manifest import (
    Manifest,
    NewShard,
    ShardStep,
    decode_positions,
    encode_positions,
)

SETTINGS = {"endpoint": "/v1/chat/completions", "max_requests_per_batch": 10}


def originals(count: int = 2, lines: int = 10) -> list[NewShard]:
    return [
        NewShard(
            input_name=f"shard-{number:05d}.jsonl",
            input_sha256=f"sha-{number}",
            lines=lines,
            bytes=100,
            first_position=number * lines,
        )
        for number in range(count)
    ]


async def open_begun(path: Path, fingerprint: str = "fp-1") -> Manifest:
    manifest = await Manifest.open(path)
    await manifest.begin(fingerprint=fingerprint, rows=20, settings=SETTINGS, shards=originals())
    return manifest


async def test_new_run_records_its_shards_as_written(tmp_path: Path) -> None:
    """begin() on a new file reports a fresh run and records the original shards in order."""
    manifest = await Manifest.open(tmp_path / "state.sqlite")
    try:
        resumed = await manifest.begin(
            fingerprint="fp-1", rows=20, settings=SETTINGS, shards=originals()
        )
        shards = await manifest.shards()
    finally:
        await manifest.aclose()
    assert resumed is False
    assert [(s.id, s.input_name, s.step) for s in shards] == [
        (0, "shard-00000.jsonl", ShardStep.WRITTEN),
        (1, "shard-00001.jsonl", ShardStep.WRITTEN),
    ]
    assert list(shards[1].input_positions()) == list(range(10, 20))


async def test_reopening_the_same_run_resumes_with_its_steps(tmp_path: Path) -> None:
    """A reopened file with the same fingerprint is a resume and keeps every recorded step."""
    path = tmp_path / "state.sqlite"
    manifest = await open_begun(path)
    await manifest.record_uploaded(0, "file-0")
    await manifest.record_create_intent(0)
    await manifest.record_submitted(0, "batch-0")
    await manifest.aclose()

    manifest = await Manifest.open(path)
    try:
        resumed = await manifest.begin(
            fingerprint="fp-1", rows=20, settings=SETTINGS, shards=originals()
        )
        first = await manifest.shard(0)
    finally:
        await manifest.aclose()
    assert resumed is True
    assert (first.step, first.file_id, first.batch_id) == (
        ShardStep.SUBMITTED,
        "file-0",
        "batch-0",
    )


async def test_the_time_of_a_step_survives_reopening(tmp_path: Path) -> None:
    """step_recorded_at is the wall-clock time the step was recorded, read back after reopening."""
    path = tmp_path / "state.sqlite"
    manifest = await open_begun(path)
    await manifest.record_uploaded(0, "file-0")
    before = time.time()
    intent = await manifest.record_create_intent(0)
    after = time.time()
    await manifest.aclose()

    manifest = await Manifest.open(path)
    try:
        reopened = await manifest.shard(0)
    finally:
        await manifest.aclose()
    assert before <= intent.step_recorded_at <= after
    assert reopened.step_recorded_at == intent.step_recorded_at


async def test_a_flag_leaves_the_time_of_the_step(tmp_path: Path) -> None:
    """Recording a cancel request or deleted remote files does not move step_recorded_at."""
    manifest = await open_begun(tmp_path / "state.sqlite")
    try:
        await manifest.record_uploaded(0, "file-0")
        intent = await manifest.record_create_intent(0)
        await manifest.record_cancel_requested([0])
        await manifest.record_remote_files_deleted(0)
        flagged = await manifest.shard(0)
    finally:
        await manifest.aclose()
    assert flagged.cancel_requested and flagged.remote_files_deleted
    assert flagged.step_recorded_at == intent.step_recorded_at


async def test_another_input_is_refused_with_what_differs(tmp_path: Path) -> None:
    """A state file of another dataset raises ManifestMismatchError naming the difference."""
    path = tmp_path / "state.sqlite"
    await (await open_begun(path)).aclose()
    manifest = await Manifest.open(path)
    try:
        with pytest.raises(ManifestMismatchError, match=r"rows 20 -> 30.*another state_path"):
            await manifest.begin(
                fingerprint="fp-2", rows=30, settings=SETTINGS, shards=originals(3)
            )
    finally:
        await manifest.aclose()


async def test_a_file_that_is_not_a_state_file_is_refused(tmp_path: Path) -> None:
    """Pointing state_path at some other file raises ManifestMismatchError, and keeps the file."""
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just notes\n" * 100)
    with pytest.raises(ManifestMismatchError, match="not a together_async state file"):
        await Manifest.open(path)
    assert path.read_text().startswith("not a database")


async def test_a_state_file_of_another_format_version_is_refused(tmp_path: Path) -> None:
    """A state file written with another format version is refused, not misread."""
    path = tmp_path / "state.sqlite"
    await (await open_begun(path)).aclose()
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute("UPDATE run SET format = 999")
    finally:
        connection.close()
    manifest = await Manifest.open(path)
    try:
        with pytest.raises(ManifestMismatchError, match="another version"):
            await manifest.run()
    finally:
        await manifest.aclose()


async def test_a_state_file_in_use_by_another_run_is_refused(tmp_path: Path) -> None:
    """While one run holds the state file, opening it again raises InvalidArgumentError."""
    path = tmp_path / "state.sqlite"
    manifest = await open_begun(path)
    try:
        with pytest.raises(InvalidArgumentError, match="in use by another run"):
            await Manifest.open(path)
    finally:
        await manifest.aclose()
    await (await Manifest.open(path)).aclose()  # free again once closed


async def test_a_step_never_goes_backwards(tmp_path: Path) -> None:
    """Recording an earlier step than the shard's current one raises instead of losing data."""
    manifest = await open_begun(tmp_path / "state.sqlite")
    try:
        await manifest.record_uploaded(0, "file-0")
        await manifest.record_create_intent(0)
        await manifest.record_submitted(0, "batch-0")
        with pytest.raises(RuntimeError, match="cannot go back"):
            await manifest.record_uploaded(0, "file-other")
        assert (await manifest.shard(0)).file_id == "file-0"
    finally:
        await manifest.aclose()


async def test_done_records_the_follow_up_shard_in_the_same_step(tmp_path: Path) -> None:
    """record_done marks the parent DONE and inserts its follow-up with the given positions."""
    manifest = await open_begun(tmp_path / "state.sqlite")
    try:
        follow_up = NewShard(
            input_name="retry-of-00000.jsonl",
            input_sha256="sha-r",
            lines=2,
            bytes=20,
            attempt=2,
            positions=encode_positions([3, 7]),
        )
        child = await manifest.record_done(0, retry_allowed=True, follow_up=follow_up)
        parent = await manifest.shard(0)
    finally:
        await manifest.aclose()
    assert child is not None
    assert (child.id, child.parent_id, child.attempt, child.step) == (2, 0, 2, ShardStep.WRITTEN)
    assert list(child.input_positions()) == [3, 7]
    assert (parent.step, parent.retry_allowed) == (ShardStep.DONE, True)


async def test_a_shard_gets_at_most_one_follow_up(tmp_path: Path) -> None:
    """A second follow-up for the same parent is refused and the parent's state is unchanged."""
    manifest = await open_begun(tmp_path / "state.sqlite")
    follow_up = NewShard(
        input_name="r.jsonl",
        input_sha256="s",
        lines=1,
        bytes=5,
        attempt=2,
        positions=encode_positions([4]),
    )
    try:
        await manifest.record_done(0, retry_allowed=True, follow_up=follow_up)
        with pytest.raises(sqlite3.IntegrityError):
            await manifest.record_done(0, retry_allowed=False, follow_up=follow_up)
        assert (await manifest.shard(0)).retry_allowed is True
        assert len(await manifest.shards()) == 3
    finally:
        await manifest.aclose()


def test_positions_survive_encoding() -> None:
    """Input positions round-trip through their BLOB encoding, large values included."""
    positions = [0, 5, 2**40, 999_999]
    assert list(decode_positions(encode_positions(positions))) == positions


async def test_recorded_steps_survive_a_killed_process(tmp_path: Path) -> None:
    """Steps committed by a process killed with SIGKILL are all there when the file reopens."""
    path = tmp_path / "state.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal, anyio
        from together_async.manifest import Manifest, NewShard

        async def main():
            manifest = await Manifest.open({str(path)!r})
            shards = [NewShard(input_name="a", input_sha256="x", lines=1, bytes=2,
                               first_position=0)]
            await manifest.begin(fingerprint="fp", rows=1, settings={{}}, shards=shards)
            await manifest.record_uploaded(0, "file-0")
            await manifest.record_create_intent(0)
            os.kill(os.getpid(), signal.SIGKILL)

        anyio.run(main)
        """
    )
    completed = await anyio.run_process([sys.executable, "-c", script], check=False)
    assert completed.returncode == -9
    manifest = await Manifest.open(path)
    try:
        shard = await manifest.shard(0)
        run = await manifest.run()
    finally:
        await manifest.aclose()
    assert run is not None and run.fingerprint == "fp"
    assert (shard.step, shard.file_id) == (ShardStep.CREATING, "file-0")


async def test_close_waits_for_a_write_left_running_by_a_cancelled_caller(tmp_path: Path) -> None:
    """A caller cancelled natively mid-write leaves the write running in its thread; closing
    the state file then waits for it instead of closing the connection beside it."""
    manifest = await open_begun(tmp_path / "run.sqlite")
    writing, release = threading.Event(), threading.Event()

    def slow_write() -> None:
        writing.set()
        release.wait(10)
        manifest._db().execute("UPDATE shards SET updated_at = updated_at")

    writer = asyncio.create_task(manifest._call(slow_write))
    await anyio.to_thread.run_sync(writing.wait, 10)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer  # the cancel does not wait for the thread
    closer = asyncio.create_task(manifest.aclose())
    done, _ = await asyncio.wait({closer}, timeout=0.3)
    assert not done  # closing waits for the write still running
    release.set()
    await closer
