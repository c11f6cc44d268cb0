"""The durable run state behind gather_batches' resume: one SQLite file per run.

It records, per shard, each step of its life (written, uploaded, create intent, submitted,
finished, downloaded, done) with the ids and local files that step produced, keyed to a
fingerprint of the input so that another dataset can never pick up this run's jobs.

Why SQLite and not a JSON file replaced atomically:
- each step is one small transaction (an UPDATE of one row), where JSON-replace rewrites the
  whole state, which for a million-row run with hundreds of shards is quadratic I/O;
- a transaction is atomic, so "insert the follow-up shard and mark its parent done" happens
  together or not at all, and a SIGKILL at any instant leaves the last committed state (WAL
  mode with synchronous=NORMAL loses nothing on a process crash; only a power cut can roll
  back the last transactions, and every step is safe to redo);
- an exclusive lock keeps two runs from driving the same state file at once (which would
  create every job twice).

The file holds ids, statuses, hashes and local file names, never the API key or request
bodies. Bulky data (the shard input files and the downloaded results) lives in a directory
next to it (`<state file>.files/`); rows name those files relative to that directory.
Every method does its SQLite work in a worker thread, one at a time.
"""

from __future__ import annotations

import builtins
import enum
import os
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import attrs
import orjson

from ._errors import InvalidArgumentError, ManifestMismatchError

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "NewShard",
    "RunRecord",
    "ShardRecord",
    "ShardStep",
    "decode_positions",
    "encode_positions",
]

FORMAT_VERSION = 1
"""Bumped when the schema or the meaning of a recorded value changes; old files are refused."""

APPLICATION_ID = 0x54415359
"""SQLite's application_id of a state file ("TASY"); files of earlier versions have 0."""

T = TypeVar("T")


class ShardStep(str, enum.Enum):
    """How far a shard has come, in order. Each step names what is durably known."""

    WRITTEN = "written"
    """The shard's input file is on local disk; nothing sent."""
    UPLOADED = "uploaded"
    """The input file is uploaded: `file_id` is known."""
    CREATING = "creating"
    """A create_batch call may have been sent: reconcile before creating again."""
    SUBMITTED = "submitted"
    """The job exists: `batch_id` is known."""
    FINISHED = "finished"
    """The job reached a terminal status; its output and error file ids are recorded."""
    DOWNLOADED = "downloaded"
    """The output and error files are on local disk."""
    DONE = "done"
    """Every row is accounted for; the follow-up shard of its retryable rows, if any, exists."""

    @property
    def rank(self) -> int:
        """Position in the life of a shard (WRITTEN is 0)."""
        return _STEP_ORDER.index(self)


_STEP_ORDER = list(ShardStep)


def encode_positions(positions: Sequence[int]) -> bytes:
    """Input positions as little-endian int64s, for a BLOB column."""
    packed = array("q", positions)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def decode_positions(blob: bytes) -> array[int]:
    """The inverse of encode_positions."""
    packed = array("q")
    packed.frombytes(blob)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed


@attrs.frozen(kw_only=True)
class NewShard:
    """A shard to record: its input file and which input rows it holds.

    An original shard holds the consecutive rows `first_position ..
    first_position + lines - 1`; a follow-up shard (`parent_id` set) holds the rows listed in
    `positions` (encoded with encode_positions), in file order.
    """

    input_name: str
    input_sha256: str
    lines: int
    bytes: int
    attempt: int = 1
    parent_id: int | None = None
    first_position: int | None = None
    positions: builtins.bytes | None = None


@attrs.frozen(kw_only=True)
class ShardRecord:
    """A shard as the state file knows it."""

    id: int
    parent_id: int | None
    attempt: int
    input_name: str
    input_sha256: str
    lines: int
    bytes: int
    first_position: int | None
    positions: builtins.bytes | None
    step: ShardStep
    step_recorded_at: float
    """When the current step was recorded (unix seconds, this machine's wall clock); for a
    CREATING shard, when its create intent was. Flags such as cancel_requested leave it."""
    file_id: str | None = None
    batch_id: str | None = None
    job_status: str | None = None
    job_error: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    output_name: str | None = None
    output_bytes: int | None = None
    error_name: str | None = None
    error_bytes: int | None = None
    cancel_requested: bool = False
    retry_allowed: bool | None = None
    remote_files_deleted: bool = False

    def input_positions(self) -> Sequence[int]:
        """The input positions of the shard's rows, in file order."""
        if self.positions is not None:
            return decode_positions(self.positions)
        assert self.first_position is not None, "an original shard has a first position"
        return range(self.first_position, self.first_position + self.lines)


@attrs.frozen(kw_only=True)
class RunRecord:
    """What the state file says about the run as a whole."""

    fingerprint: str
    rows: int
    settings: dict[str, Any]
    created_at: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    format INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    rows INTEGER NOT NULL,
    settings TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER REFERENCES shards(id),
    attempt INTEGER NOT NULL,
    input_name TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    first_position INTEGER,
    positions BLOB,
    step TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    job_status TEXT,
    job_error TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    output_name TEXT,
    output_bytes INTEGER,
    error_name TEXT,
    error_bytes INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    retry_allowed INTEGER,
    remote_files_deleted INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS shards_one_child ON shards(parent_id)
    WHERE parent_id IS NOT NULL;
"""

# updated_at is when the row's step was last set (ShardRecord.step_recorded_at).
_SHARD_COLUMNS = (
    "id, parent_id, attempt, input_name, input_sha256, lines, bytes, first_position, positions, "
    "step, file_id, batch_id, job_status, job_error, output_file_id, error_file_id, "
    "output_name, output_bytes, error_name, error_bytes, cancel_requested, retry_allowed, "
    "remote_files_deleted, updated_at"
)
_SHARD_NAMES = [column.strip() for column in _SHARD_COLUMNS.split(",")]


def _garbled(path: Path, what: str) -> ManifestMismatchError:
    return ManifestMismatchError(
        f"{path} is damaged: {what}. It was edited or corrupted outside together_async; "
        "restore it from a copy to resume, or use another state_path (its jobs are not reused)"
    )


# What each shard column may hold (SQLite keeps any value in any column): (kinds, nullable).
_INT = (int,)
_TEXT = (str,)
_SHARD_KINDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "parent_id": (_INT, True),
    "attempt": (_INT, False),
    "input_name": (_TEXT, False),
    "input_sha256": (_TEXT, False),
    "lines": (_INT, False),
    "bytes": (_INT, False),
    "first_position": (_INT, True),
    "positions": ((builtins.bytes,), True),
    "step": (_TEXT, False),
    "file_id": (_TEXT, True),
    "batch_id": (_TEXT, True),
    "job_status": (_TEXT, True),
    "job_error": (_TEXT, True),
    "output_file_id": (_TEXT, True),
    "error_file_id": (_TEXT, True),
    "output_name": (_TEXT, True),
    "output_bytes": (_INT, True),
    "error_name": (_TEXT, True),
    "error_bytes": (_INT, True),
    "cancel_requested": (_INT, False),
    "retry_allowed": (_INT, True),
    "remote_files_deleted": (_INT, False),
    "updated_at": ((int, float), False),
}


def _check_shard_row(values: dict[str, Any], shard_id: Any, path: Path) -> None:
    """Refuse a row whose values this code could not use (as ManifestMismatchError)."""
    if type(shard_id) is not int:
        raise _garbled(path, f"a shard's id is {shard_id!r}")
    for column, (kinds, nullable) in _SHARD_KINDS.items():
        value = values[column]
        if value is None and nullable:
            continue
        if type(value) not in kinds:
            raise _garbled(path, f"shard {shard_id}'s {column} is garbled ({value!r:.40})")
    for column in ("attempt", "lines", "bytes", "first_position", "output_bytes", "error_bytes"):
        value = values[column]
        if value is not None and value < (1 if column == "attempt" else 0):
            raise _garbled(path, f"shard {shard_id}'s {column} is garbled ({value!r})")
    # The names are joined to the state's files directory: plain file names only.
    for column in ("input_name", "output_name", "error_name"):
        name = values[column]
        if name is not None and (
            name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\x00"))
        ):
            raise _garbled(path, f"shard {shard_id}'s {column} is garbled ({name!r:.40})")
    positions = values["positions"]
    if positions is not None and len(positions) != 8 * values["lines"]:
        raise _garbled(path, f"shard {shard_id}'s positions are garbled")
    if positions is None and values["first_position"] is None:
        raise _garbled(path, f"shard {shard_id} has neither a first position nor positions")


def _shard_from_row(row: tuple[Any, ...], path: Path) -> ShardRecord:
    (
        shard_id, parent_id, attempt, input_name, input_sha256, lines, size, first_position,
        positions, step, file_id, batch_id, job_status, job_error, output_file_id,
        error_file_id, output_name, output_bytes, error_name, error_bytes, cancel_requested,
        retry_allowed, remote_files_deleted, updated_at,
    ) = row  # fmt: skip
    _check_shard_row(dict(zip(_SHARD_NAMES[1:], row[1:], strict=True)), shard_id, path)
    try:
        shard_step = ShardStep(step)
    except ValueError:
        raise ManifestMismatchError(
            f"{path}: shard {shard_id} is at step {step!r}, which this version of "
            "together_async does not know; finish the run with the version that wrote it, "
            "or use another state_path"
        ) from None
    # What the later steps rely on having been recorded with them.
    if shard_step in (ShardStep.UPLOADED, ShardStep.CREATING) and not file_id:
        raise _garbled(path, f"shard {shard_id} is {step} but has no file id")
    if shard_step is ShardStep.SUBMITTED and not batch_id:
        raise _garbled(path, f"shard {shard_id} is {step} but has no batch id")
    if shard_step is ShardStep.DONE and retry_allowed is None:
        raise _garbled(path, f"shard {shard_id} is {step} but has no retry decision")
    return ShardRecord(
        id=shard_id,
        parent_id=parent_id,
        attempt=attempt,
        input_name=input_name,
        input_sha256=input_sha256,
        lines=lines,
        bytes=size,
        first_position=first_position,
        positions=positions,
        step=shard_step,
        step_recorded_at=updated_at,
        file_id=file_id,
        batch_id=batch_id,
        job_status=job_status,
        job_error=job_error,
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        output_name=output_name,
        output_bytes=output_bytes,
        error_name=error_name,
        error_bytes=error_bytes,
        cancel_requested=bool(cancel_requested),
        retry_allowed=None if retry_allowed is None else bool(retry_allowed),
        remote_files_deleted=bool(remote_files_deleted),
    )


class Manifest:
    """The state of one gather run, in a SQLite file, with its files in a sibling directory.

    Open it with `await Manifest.open(path)`, then `await manifest.begin(...)` to create the
    run or check that the state file belongs to this input; close it with `await
    manifest.aclose()`. While open it holds an exclusive lock on the file.

    Example:
        manifest = await Manifest.open("run.sqlite")
        resumed = await manifest.begin(fingerprint=fp, rows=n, settings={}, shards=new_shards)
        for shard in await manifest.shards(): ...
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        """Use `Manifest.open`."""
        self.path = path
        self.directory = Path(f"{path}.files")
        self._connection: sqlite3.Connection | None = connection
        # SQLite calls are serialised: one connection, one worker thread at a time. The lock
        # covers what the limiter cannot: a caller cancelled natively (asyncio's own cancel)
        # gives the limiter back at once, while its call still runs in the thread.
        self._limiter = anyio.CapacityLimiter(1)
        self._thread_lock = threading.Lock()

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Manifest:
        """Open (creating when missing) the state file at `path` and lock it for this run.

        Raises:
            ManifestMismatchError: the file exists but is not a together_async state file, or
                was written by an incompatible version.
            InvalidArgumentError: another run holds the file.
        """
        state_path = Path(path)
        connection = await anyio.to_thread.run_sync(_connect, state_path)
        return cls(state_path, connection)

    async def aclose(self) -> None:
        """Close the file and release its lock; safe to call twice."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await anyio.to_thread.run_sync(self._locked, connection.close, limiter=self._limiter)

    async def begin(
        self,
        *,
        fingerprint: str,
        rows: int,
        settings: dict[str, Any],
        shards: Sequence[NewShard],
    ) -> bool:
        """Record a new run with its original shards, or check that the file is this run's.

        Returns True when the run was already recorded (a resume), False when it was created.

        Raises:
            ManifestMismatchError: the file records a run over another input or settings.
        """
        return await self._call(self._begin, fingerprint, rows, settings, list(shards))

    async def run(self) -> RunRecord | None:
        """The run recorded in the file, or None for a new file."""
        return await self._call(self._run)

    async def shards(self) -> list[ShardRecord]:
        """Every shard, originals first, follow-ups in the order they were made."""
        return await self._call(self._shards)

    async def shard(self, shard_id: int) -> ShardRecord:
        """One shard by id."""
        return await self._call(self._shard, shard_id)

    async def record_upload_started(self, shard_id: int, file_id: str) -> ShardRecord:
        """The API assigned `file_id` to the shard's input; its bytes are not sent yet.

        The shard stays WRITTEN: a resumed run finds the id and finishes or deletes that
        file instead of leaving it behind.
        """
        return await self._update(shard_id, ShardStep.WRITTEN, file_id=file_id)

    async def record_uploaded(self, shard_id: int, file_id: str) -> ShardRecord:
        """The shard's input file was uploaded as `file_id`."""
        return await self._update(shard_id, ShardStep.UPLOADED, file_id=file_id)

    async def record_create_intent(self, shard_id: int) -> ShardRecord:
        """A create_batch call for the shard is about to be sent."""
        return await self._update(shard_id, ShardStep.CREATING)

    async def record_submitted(self, shard_id: int, batch_id: str) -> ShardRecord:
        """The shard's job exists as `batch_id`."""
        return await self._update(shard_id, ShardStep.SUBMITTED, batch_id=batch_id)

    async def record_finished(
        self,
        shard_id: int,
        *,
        status: str,
        error: str | None,
        output_file_id: str | None,
        error_file_id: str | None,
    ) -> ShardRecord:
        """The shard's job reached a terminal status."""
        return await self._update(
            shard_id,
            ShardStep.FINISHED,
            job_status=status,
            job_error=error,
            output_file_id=output_file_id,
            error_file_id=error_file_id,
        )

    async def record_downloaded(
        self,
        shard_id: int,
        *,
        output_name: str | None,
        output_bytes: int | None,
        error_name: str | None,
        error_bytes: int | None,
    ) -> ShardRecord:
        """The job's output and error files are on local disk (names relative to directory)."""
        return await self._update(
            shard_id,
            ShardStep.DOWNLOADED,
            output_name=output_name,
            output_bytes=output_bytes,
            error_name=error_name,
            error_bytes=error_bytes,
        )

    async def record_done(
        self, shard_id: int, *, retry_allowed: bool, follow_up: NewShard | None
    ) -> ShardRecord | None:
        """Every row of the shard is accounted for; record its follow-up shard in the same step.

        `retry_allowed` is kept so that replaying the shard later classifies its rows the same
        way even if max_attempts changed. Returns the follow-up shard's record, if any.
        """
        return await self._call(self._done, shard_id, retry_allowed, follow_up)

    async def record_cancel_requested(self, shard_ids: Sequence[int]) -> None:
        """We asked the server to cancel these shards' jobs (so their rows are not charged an
        attempt when resubmitted)."""
        await self._call(self._mark, list(shard_ids), "cancel_requested")

    async def record_remote_files_deleted(self, shard_id: int) -> None:
        """The shard's remote input, output and error files were deleted."""
        await self._call(self._mark, [shard_id], "remote_files_deleted")

    # --- the worker-thread side ---------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(self._locked, function, *args, limiter=self._limiter)

    def _locked(self, function: Callable[..., T], *args: Any) -> T:
        with self._thread_lock:
            return function(*args)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("the manifest is closed")
        return self._connection

    def _run(self) -> RunRecord | None:
        row = (
            self._db()
            .execute("SELECT fingerprint, rows, settings, created_at, format FROM run WHERE id = 1")
            .fetchone()
        )
        if row is None:
            return None
        fingerprint, rows, settings, created_at, file_format = row
        if file_format != FORMAT_VERSION:
            raise ManifestMismatchError(
                f"{self.path} was written by another version of together_async (state format "
                f"{file_format!r}, this version reads {FORMAT_VERSION}); finish that run with "
                "the version that started it, or use a new state_path"
            )
        if type(fingerprint) is not str or not fingerprint:
            raise _garbled(self.path, f"the run's fingerprint is garbled ({fingerprint!r:.40})")
        if type(rows) is not int or rows < 0:
            raise _garbled(self.path, f"the run's row count is garbled ({rows!r:.40})")
        if type(created_at) not in (int, float):
            raise _garbled(self.path, f"the run's start time is garbled ({created_at!r:.40})")
        try:
            decoded = orjson.loads(settings) if isinstance(settings, (str, bytes)) else None
        except orjson.JSONDecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            raise _garbled(self.path, f"the run's settings are garbled ({settings!r:.40})")
        return RunRecord(
            fingerprint=fingerprint,
            rows=rows,
            settings=decoded,
            created_at=created_at,
        )

    def _begin(
        self,
        fingerprint: str,
        rows: int,
        settings: dict[str, Any],
        shards: list[NewShard],
    ) -> bool:
        existing = self._run()
        if existing is not None:
            if existing.fingerprint != fingerprint:
                raise ManifestMismatchError(
                    _mismatch_message(self.path, existing, fingerprint, rows, settings)
                )
            return True
        db = self._db()
        now = time.time()
        with _transaction(db):
            db.execute(
                "INSERT INTO run (id, format, fingerprint, rows, settings, created_at) "
                "VALUES (1, ?, ?, ?, ?, ?)",
                (FORMAT_VERSION, fingerprint, rows, orjson.dumps(settings).decode(), now),
            )
            for number, shard in enumerate(shards):
                _insert_shard(db, shard, now, shard_id=number)
        return False

    def _shards(self) -> list[ShardRecord]:
        rows = self._db().execute(f"SELECT {_SHARD_COLUMNS} FROM shards ORDER BY id").fetchall()
        return [_shard_from_row(row, self.path) for row in rows]

    def _shard(self, shard_id: int) -> ShardRecord:
        row = (
            self._db()
            .execute(f"SELECT {_SHARD_COLUMNS} FROM shards WHERE id = ?", (shard_id,))
            .fetchone()
        )
        if row is None:
            raise KeyError(f"no shard {shard_id} in {self.path}")
        return _shard_from_row(row, self.path)

    async def _update(self, shard_id: int, step: ShardStep, **values: Any) -> ShardRecord:
        return await self._call(self._set_step, shard_id, step, values)

    def _set_step(self, shard_id: int, step: ShardStep, values: dict[str, Any]) -> ShardRecord:
        db = self._db()
        current = self._shard(shard_id)
        if step.rank < current.step.rank:
            raise RuntimeError(
                f"shard {shard_id} is already {current.step.value}; cannot go back to {step.value}"
            )
        assignments = ", ".join(f"{column} = ?" for column in values)
        separator = ", " if values else ""
        sql = f"UPDATE shards SET step = ?, updated_at = ?{separator}{assignments} WHERE id = ?"
        with _transaction(db):
            db.execute(sql, (step.value, time.time(), *values.values(), shard_id))
        return self._shard(shard_id)

    def _done(
        self, shard_id: int, retry_allowed: bool, follow_up: NewShard | None
    ) -> ShardRecord | None:
        db = self._db()
        now = time.time()
        child_id: int | None = None
        with _transaction(db):
            db.execute(
                "UPDATE shards SET step = ?, retry_allowed = ?, updated_at = ? WHERE id = ?",
                (ShardStep.DONE.value, int(retry_allowed), now, shard_id),
            )
            if follow_up is not None:
                child_id = _insert_shard(db, attrs.evolve(follow_up, parent_id=shard_id), now)
        return None if child_id is None else self._shard(child_id)

    def _mark(self, shard_ids: list[int], column: str) -> None:
        db = self._db()
        with _transaction(db):
            # updated_at stays the step's time: resume compares a CREATING shard's to the
            # creation time of the jobs it may adopt, and a later flag must not move it.
            db.executemany(
                f"UPDATE shards SET {column} = 1 WHERE id = ?",
                [(shard_id,) for shard_id in shard_ids],
            )


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._connection.execute("COMMIT")
        else:
            self._connection.execute("ROLLBACK")


def _insert_shard(
    db: sqlite3.Connection, shard: NewShard, now: float, *, shard_id: int | None = None
) -> int:
    cursor = db.execute(
        "INSERT INTO shards (id, parent_id, attempt, input_name, input_sha256, lines, bytes, "
        "first_position, positions, step, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            shard_id,
            shard.parent_id,
            shard.attempt,
            shard.input_name,
            shard.input_sha256,
            shard.lines,
            shard.bytes,
            shard.first_position,
            shard.positions,
            ShardStep.WRITTEN.value,
            now,
        ),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _connect(path: Path) -> sqlite3.Connection:
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a NUL
        raise InvalidArgumentError(f"cannot use the state file {str(path)!r}: {exc}") from None
    if is_dir:
        raise InvalidArgumentError(
            f"state_path {path} is a directory; give a file path, e.g. {path / 'run.sqlite'}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE), so each
        # step is exactly one transaction. check_same_thread=False: calls come from worker
        # threads, one at a time (the Manifest's limiter).
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=1.0
        )
    except (OSError, sqlite3.Error) as exc:
        raise InvalidArgumentError(f"cannot open the state file {path}: {exc}") from None
    try:
        connection.execute("PRAGMA locking_mode = EXCLUSIVE")
        # Before anything writes (even the journal mode, kept in the file's header): another
        # application's database is refused untouched.
        fresh = _check_ours(connection, path)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        # Taking the write lock now (held until close, by locking_mode) refuses a second run.
        connection.execute("BEGIN IMMEDIATE")
        if fresh:
            connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.executescript(_SCHEMA)  # commits
        _check_tables(connection, path)
    except sqlite3.DatabaseError as exc:
        connection.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise InvalidArgumentError(
                f"{path} is in use by another run; wait for it to end or use another state_path"
            ) from None
        if _cannot_write(exc):
            raise InvalidArgumentError(
                f"cannot write the state file {path} ({exc}); check its permissions and the "
                "free space, or use another state_path"
            ) from None
        raise ManifestMismatchError(
            f"{path} is not a together_async state file ({exc}); use another state_path"
        ) from None
    except BaseException:
        connection.close()
        raise
    return connection


def _cannot_write(exc: sqlite3.DatabaseError) -> bool:
    # SQLite says these in words only; the codes came in Python 3.11 (sqlite_errorname).
    text = str(exc).lower()
    return any(
        words in text
        for words in ("readonly", "read-only", "unable to open", "disk i/o", "full", "permission")
    )


def _check_ours(connection: sqlite3.Connection, path: Path) -> bool:
    """True for an empty database (ours to create); raise for another application's."""
    (application_id,) = connection.execute("PRAGMA application_id").fetchone()
    tables = sorted(
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    )
    # Files of versions before the application id have 0 there, and our tables.
    if application_id not in (0, APPLICATION_ID):
        raise ManifestMismatchError(
            f"{path} is not a together_async state file (it is another application's SQLite "
            f"database, application id {application_id:#x}); use another state_path"
        )
    # Only some of ours: a crash while the schema was made (its statements commit one by one).
    if not (set(tables) <= _TABLES.keys() or _TABLES.keys() <= set(tables)):
        listed = ", ".join(tables[:10]) + (", ..." if len(tables) > 10 else "")
        raise ManifestMismatchError(
            f"{path} is not a together_async state file (it holds tables {listed}); "
            "use another state_path"
        )
    _check_tables(connection, path, [table for table in tables if table in _TABLES])
    return not tables


_TABLES = {
    "run": {"id", "format", "fingerprint", "rows", "settings", "created_at"},
    "shards": set(_SHARD_NAMES),
}


def _check_tables(
    connection: sqlite3.Connection, path: Path, tables: Sequence[str] = tuple(_TABLES)
) -> None:
    for table in tables:
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if not _TABLES[table] <= columns:
            raise ManifestMismatchError(
                f"{path} has a {table} table of another shape; it was not written by this "
                "version of together_async; use another state_path"
            )


def _mismatch_message(
    path: Path, existing: RunRecord, fingerprint: str, rows: int, settings: dict[str, Any]
) -> str:
    differences = [
        f"{key} {existing.settings.get(key)!r} -> {value!r}"
        for key, value in settings.items()
        if existing.settings.get(key) != value
    ]
    if existing.rows != rows:
        differences.insert(0, f"rows {existing.rows:,} -> {rows:,}")
    detail = "; ".join(differences) if differences else "the requests themselves differ"
    return (
        f"{path} belongs to another run (input fingerprint {existing.fingerprint[:12]}, "
        f"this input's is {fingerprint[:12]}: {detail}). Its jobs cannot be reused for this "
        "input: pass another state_path, or delete the file (and its .files directory) to "
        "start over."
    )
