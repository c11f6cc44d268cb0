"""A state_path that cannot hold a run, or a resume that cannot be one, is a clear error
before any work: an empty, NUL-holding, too long or directory path, a file that cannot be
opened, another application's SQLite database (left untouched), an empty input against a
recorded run, a lost or emptied state file beside the run's files, a shard at an unknown step
or any other garbled recorded value; and shard limits above the API's are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from together_async import (
    AsyncTogether,
    InvalidArgumentError,
    ManifestMismatchError,
    gather_batches,
)
from together_async.emulator import Emulator

pytestmark = pytest.mark.timeout(60)

FAST = {"poll_interval": 0.02, "max_interval": 0.1}


def bodies(count: int) -> list[dict[str, Any]]:
    """Chat bodies without a model."""
    return [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(count)]


def names_in(directory: Path) -> list[str]:
    """The sorted names in `directory`."""
    return sorted(path.name for path in directory.iterdir())


async def finished_run(client: AsyncTogether, state: Path, rows: int = 5) -> None:
    """Run `rows` requests to the end with `state` as its state file."""
    results = await gather_batches(client, bodies(rows), model="m", state_path=state, **FAST)
    assert len(results) == rows


@pytest.mark.parametrize("state_path", ["", "   ", b"run.sqlite", 3])
async def test_state_path_that_is_no_path_is_refused(
    client: AsyncTogether, emulator: Emulator, state_path: Any
) -> None:
    """An empty, blank, bytes or int state_path is InvalidArgumentError; nothing is sent."""
    with pytest.raises(InvalidArgumentError, match="state_path"):
        await gather_batches(client, bodies(2), model="m", state_path=state_path)
    assert emulator.stats.jobs_created == {}


async def test_state_path_that_is_a_directory_is_refused(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """A directory as state_path is InvalidArgumentError that suggests a file inside it."""
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidArgumentError, match=r"is a directory.*run\.sqlite"):
        await gather_batches(client, bodies(2), model="m", state_path=work)
    assert names_in(work) == []


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
async def test_state_path_that_cannot_be_created_is_refused(
    client: AsyncTogether, tmp_path: Path, where: str
) -> None:
    """A state file that cannot be created (in /proc, below a regular file) is
    InvalidArgumentError naming it."""
    if where == "proc":
        state = Path("/proc/together-async-state.sqlite")
    else:
        (tmp_path / "plain").write_text("x")
        state = tmp_path / "plain" / "run.sqlite"
    with pytest.raises(InvalidArgumentError, match="cannot open the state file"):
        await gather_batches(client, bodies(2), model="m", state_path=state)


@pytest.mark.parametrize("again", [list, lambda rows: iter([])], ids=["empty-list", "exhausted"])
async def test_empty_input_against_a_recorded_run_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path, again: Any
) -> None:
    """Resuming a recorded run with [] or an exhausted iterator is ManifestMismatchError, not
    an empty result."""
    state = tmp_path / "run.sqlite"
    await finished_run(client, state)
    with pytest.raises(ManifestMismatchError, match=r"records a run of 5 rows.*no requests"):
        await gather_batches(client, again([]), model="m", state_path=state, **FAST)


async def test_empty_input_without_a_recorded_run_is_an_empty_result(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """An empty input with a new state_path returns [] and leaves no state file behind."""
    work = tmp_path / "work"
    work.mkdir()
    assert await gather_batches(client, [], model="m", state_path=work / "run.sqlite") == []
    assert names_in(work) == []


@pytest.mark.parametrize("loss", ["emptied", "deleted"])
async def test_lost_state_beside_the_run_files_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path, loss: str
) -> None:
    """A state file emptied or deleted beside its run's files is ManifestMismatchError, not a
    silent fresh run that bills the input again; a deleted one is not recreated."""
    state = tmp_path / "run.sqlite"
    await finished_run(client, state)
    jobs_before = sum(emulator.stats.jobs_created.values())
    state.unlink()
    if loss == "emptied":
        state.write_bytes(b"")
    with pytest.raises(ManifestMismatchError, match=r"records no run.*holds the files of one"):
        await gather_batches(client, bodies(5), model="m", state_path=state, **FAST)
    assert sum(emulator.stats.jobs_created.values()) == jobs_before
    assert state.exists() == (loss == "emptied")


async def test_shard_at_an_unknown_step_is_refused(client: AsyncTogether, tmp_path: Path) -> None:
    """A state row whose step this version does not know is ManifestMismatchError naming it."""
    state = tmp_path / "run.sqlite"
    await finished_run(client, state)
    with sqlite3.connect(state) as db:
        db.execute("UPDATE shards SET step = 'teleported'")
    db.close()
    with pytest.raises(ManifestMismatchError, match="shard 0 is at step 'teleported'"):
        await gather_batches(client, bodies(5), model="m", state_path=state, **FAST)


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_requests_per_batch", 50_001), ("max_bytes_per_batch", 100 * 1024 * 1024 + 1)],
)
async def test_shard_limit_above_the_api_limit_is_refused(
    client: AsyncTogether, emulator: Emulator, option: str, value: int
) -> None:
    """A shard limit above the Batch API's own is InvalidArgumentError (refused, not clamped)."""
    with pytest.raises(InvalidArgumentError, match=f"{option} is .* above the Batch API's limit"):
        await gather_batches(client, bodies(2), model="m", **{option: value})
    assert emulator.stats.jobs_created == {}


async def test_state_path_with_a_nul_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """A state_path holding a NUL byte is InvalidArgumentError naming it; nothing is sent."""
    with pytest.raises(InvalidArgumentError, match=r"state_path .*run\\x00\.sqlite.* NUL"):
        await gather_batches(client, bodies(2), model="m", state_path=f"{tmp_path}/run\x00.sqlite")
    assert emulator.stats.jobs_created == {}


@pytest.mark.parametrize("length", [300, 250], ids=["state-file", "journal-and-files-dir"])
async def test_state_path_too_long_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path, length: int
) -> None:
    """A state file name too long for the file system (or for its journal beside it) is
    InvalidArgumentError naming the file; nothing is sent and nothing is left behind."""
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidArgumentError, match=f"state file {work}/xxxx"):
        await gather_batches(client, bodies(2), model="m", state_path=work / ("x" * length))
    assert emulator.stats.jobs_created == {}
    assert names_in(work) == []


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ("UPDATE run SET settings = '{not json'", "the run's settings are garbled"),
        ("UPDATE run SET settings = '[1, 2]'", "the run's settings are garbled"),
        ("UPDATE run SET rows = 'many'", "the run's row count is garbled"),
        ("UPDATE shards SET positions = X'00ff'", "shard 0's positions are garbled"),
        ("UPDATE shards SET lines = 'ten'", "shard 0's lines is garbled"),
        ("UPDATE shards SET input_name = '../../elsewhere'", "shard 0's input_name is garbled"),
        ("UPDATE shards SET first_position = NULL", "shard 0 has neither a first position"),
        ("UPDATE shards SET retry_allowed = NULL", "shard 0 is done but has no retry decision"),
    ],
)
async def test_garbled_recorded_value_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path, update: str, problem: str
) -> None:
    """A recorded value this version cannot use is ManifestMismatchError naming the state
    file and what is wrong; no job is made."""
    state = tmp_path / "run.sqlite"
    await finished_run(client, state)
    jobs_before = sum(emulator.stats.jobs_created.values())
    with sqlite3.connect(state) as db:
        db.execute(update)
    db.close()
    with pytest.raises(ManifestMismatchError, match=f"{state} is damaged: {problem}"):
        await gather_batches(client, bodies(5), model="m", state_path=state, **FAST)
    assert sum(emulator.stats.jobs_created.values()) == jobs_before


async def test_another_applications_database_is_refused_untouched(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """An SQLite database of other tables is ManifestMismatchError listing them; its bytes
    are unchanged and nothing is made beside it."""
    work = tmp_path / "work"
    work.mkdir()
    state = work / "app.db"
    with sqlite3.connect(state) as db:
        db.execute("CREATE TABLE customers (name)")
        db.execute("CREATE TABLE orders (id)")
    db.close()
    before = state.read_bytes()
    with pytest.raises(
        ManifestMismatchError,
        match=r"not a together_async state file \(it holds tables "
        r"customers, orders\)",
    ):
        await gather_batches(client, bodies(2), model="m", state_path=state, **FAST)
    assert state.read_bytes() == before
    assert names_in(work) == ["app.db"]
    assert emulator.stats.jobs_created == {}


async def test_a_run_table_of_another_shape_is_refused_untouched(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """A database whose only table is a `run` of other columns is ManifestMismatchError
    naming the table; its bytes are unchanged."""
    state = tmp_path / "app.db"
    with sqlite3.connect(state) as db:
        db.execute("CREATE TABLE run (started TEXT)")
    db.close()
    before = state.read_bytes()
    with pytest.raises(ManifestMismatchError, match="has a run table of another shape"):
        await gather_batches(client, bodies(2), model="m", state_path=state, **FAST)
    assert state.read_bytes() == before


async def test_another_applications_id_is_refused(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """An SQLite database stamped with another application id is ManifestMismatchError."""
    state = tmp_path / "other.db"
    with sqlite3.connect(state) as db:
        db.execute("PRAGMA application_id = 1234")
    db.close()
    with pytest.raises(ManifestMismatchError, match="another application's SQLite database"):
        await gather_batches(client, bodies(2), model="m", state_path=state, **FAST)
    assert emulator.stats.jobs_created == {}


async def test_an_sqlite_database_without_tables_becomes_the_state(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """A valid SQLite file with no tables is taken as a new state file and the run resumes
    from it."""
    state = tmp_path / "run.sqlite"
    with sqlite3.connect(state) as db:
        db.execute("PRAGMA user_version = 7")
    db.close()
    assert state.stat().st_size > 0
    await finished_run(client, state)
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT rows FROM run").fetchone() == (5,)
    db.close()


async def test_a_state_file_without_the_application_id_still_resumes(
    client: AsyncTogether, emulator: Emulator, tmp_path: Path
) -> None:
    """A state file of an earlier version (our tables, application id 0) is resumed: the
    finished run replays without making a job."""
    state = tmp_path / "run.sqlite"
    await finished_run(client, state)
    jobs_before = sum(emulator.stats.jobs_created.values())
    with sqlite3.connect(state) as db:
        db.execute("PRAGMA application_id = 0")
    db.close()
    results = await gather_batches(client, bodies(5), model="m", state_path=state, **FAST)
    assert len(results) == 5
    assert sum(emulator.stats.jobs_created.values()) == jobs_before
