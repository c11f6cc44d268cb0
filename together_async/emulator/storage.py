"""The emulator's durable state: file and job metadata in SQLite (WAL), file bodies on disk.

Layout under the data dir: `emulator.sqlite3`, `files/<file id>` (bodies, named only by ids
this module generates), `incoming/` (uploads in flight), `jobs/<job id>/` (partial results).
Every SQLite call runs on one dedicated worker thread; body I/O runs on worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import attrs

__all__ = [
    "FileRecord",
    "JobRecord",
    "Storage",
    "UploadSink",
    "in_thread",
    "is_file_id",
    "is_job_id",
    "new_file_id",
    "new_job_id",
]

T = TypeVar("T")

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_FILE_ID = re.compile(rf"file-{_UUID}")
_JOB_ID = re.compile(_UUID)
#: Size of the writes and reads of file bodies: big enough to keep thread hops rare.
IO_CHUNK = 1024 * 1024

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    file_type TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    checksum TEXT,
    state TEXT NOT NULL,            -- pending (awaiting its PUT), uploaded, processed
    upload_token TEXT UNIQUE,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_by_checksum ON files (checksum, purpose);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    file_size_bytes INTEGER NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model_id TEXT,
    completion_window TEXT NOT NULL,
    priority INTEGER,
    created_at REAL NOT NULL,
    job_deadline REAL NOT NULL,
    completed_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    output_file_id TEXT,
    error_file_id TEXT,
    error TEXT,
    total_rows INTEGER NOT NULL DEFAULT 0,
    done_rows INTEGER NOT NULL DEFAULT 0,
    output_rows INTEGER NOT NULL DEFAULT 0,
    error_rows INTEGER NOT NULL DEFAULT 0,
    output_bytes INTEGER NOT NULL DEFAULT 0,   -- committed length of the partial output file
    error_bytes INTEGER NOT NULL DEFAULT 0,    -- committed length of the partial error file
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
-- One row per durable commit of finished rows: which input lines they were (uint32 array).
CREATE TABLE IF NOT EXISTS job_commits (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    lines BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


async def in_thread(
    fn: Callable[..., T], *args: Any, on_abandon: Callable[[T], None] | None = None
) -> T:
    """Run `fn(*args)` in a worker thread and wait for it even if the caller is cancelled.

    asyncio.to_thread returns at once on cancellation while the thread runs on: a file it
    opens then leaks, and a close can race a read. Here cancellation waits for the thread,
    hands its result to `on_abandon` (e.g. to close what it opened), then propagates.
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(future)
        if on_abandon is not None and not future.cancelled() and future.exception() is None:
            on_abandon(future.result())
        raise


def new_file_id() -> str:
    """A fresh file id ("file-<uuid4>")."""
    return f"file-{uuid.uuid4()}"


def new_job_id() -> str:
    """A fresh batch job id (a uuid4, as in the OpenAPI spec)."""
    return str(uuid.uuid4())


def is_file_id(value: str) -> bool:
    """True for an id this emulator could have generated (so it is safe in a path)."""
    return _FILE_ID.fullmatch(value) is not None


def is_job_id(value: str) -> bool:
    """True for a well-formed job id."""
    return _JOB_ID.fullmatch(value) is not None


@attrs.frozen(kw_only=True)
class FileRecord:
    """A stored file's metadata."""

    id: str
    filename: str
    purpose: str
    file_type: str
    bytes: int
    created_at: int
    checksum: str | None
    state: str
    upload_token: str | None = None
    deleted: bool = False


@attrs.frozen(kw_only=True)
class JobRecord:
    """A batch job's metadata; times are unix seconds."""

    id: str
    user_id: str
    input_file_id: str
    file_size_bytes: int
    status: str
    endpoint: str
    model_id: str | None
    completion_window: str
    priority: int | None
    created_at: float
    job_deadline: float
    completed_at: float | None = None
    progress: float = 0.0
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    total_rows: int = 0
    done_rows: int = 0
    output_rows: int = 0
    error_rows: int = 0
    output_bytes: int = 0
    error_bytes: int = 0
    cancel_requested: bool = False


_FILE_COLUMNS = [a.name for a in attrs.fields(FileRecord)]
_JOB_COLUMNS = [a.name for a in attrs.fields(JobRecord)]


def _file_from_row(row: Sequence[Any]) -> FileRecord:
    values = dict(zip(_FILE_COLUMNS, row, strict=True))
    values["deleted"] = bool(values["deleted"])
    return FileRecord(**values)


def _job_from_row(row: Sequence[Any]) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS, row, strict=True))
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)


class Storage:
    """Metadata and bodies of files and jobs under one data directory.

    All methods are coroutines that hop to worker threads; none blocks the event loop.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.files_dir = self.data_dir / "files"
        self.incoming_dir = self.data_dir / "incoming"
        self.jobs_dir = self.data_dir / "jobs"
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emulator-db")
        self._conn: sqlite3.Connection | None = None

    # -- plumbing --------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, partial(fn, *args))

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("Storage is not open")
        return self._conn

    async def open(self) -> None:
        """Create the directories and the database if needed; clear abandoned uploads."""
        await asyncio.to_thread(self._prepare_dirs)
        await self._db(self._open_db)

    def _prepare_dirs(self) -> None:
        for directory in (self.files_dir, self.incoming_dir, self.jobs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # An upload cut off by a crash never got a 200: its half-written body is worthless.
        for leftover in self.incoming_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def _open_db(self) -> None:
        conn = sqlite3.connect(
            self.data_dir / "emulator.sqlite3", check_same_thread=False, isolation_level=None
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn
        self._sweep()

    def _sweep(self) -> None:
        """Remove what a crash can leave behind: bodies no row points at, dirs of ended jobs."""
        conn = self._connection
        placeholders = ", ".join("?" * len(TERMINAL_STATUSES))
        unfinished = conn.execute(
            f"SELECT id, input_file_id FROM jobs WHERE status NOT IN ({placeholders})",
            sorted(TERMINAL_STATUSES),
        ).fetchall()
        # A deleted input file keeps its body while a job still reads it.
        known = {row[0] for row in conn.execute("SELECT id FROM files WHERE deleted = 0")}
        known.update(input_file_id for _, input_file_id in unfinished)
        for body in self.files_dir.iterdir():
            if body.name not in known:
                body.unlink(missing_ok=True)
        unfinished_ids = {job_id for job_id, _ in unfinished}
        for job_dir in self.jobs_dir.iterdir():
            if job_dir.name not in unfinished_ids:
                shutil.rmtree(job_dir, ignore_errors=True)

    async def close(self) -> None:
        """Close the database and stop the database thread; safe to call twice."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._db(conn.close)
        # The close above ran after every call queued before it, so nothing is left to wait for.
        self._db_thread.shutdown(wait=False)

    # -- paths -----------------------------------------------------------------------------

    def body_path(self, file_id: str) -> Path:
        """Where a file's body lives. Only generated ids pass, so no name can escape the dir."""
        if not is_file_id(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files_dir / file_id

    def job_dir(self, job_id: str) -> Path:
        """The directory of a job's partial result files."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_dir / job_id

    def incoming_path(self) -> Path:
        """A fresh path for an upload in flight."""
        return self.incoming_dir / f"{uuid.uuid4()}.part"

    # -- files -----------------------------------------------------------------------------

    async def create_pending_file(
        self, *, filename: str, purpose: str, file_type: str, checksum: str | None
    ) -> FileRecord:
        """Register a file that awaits its body on the storage port; it gets an upload token."""
        record = FileRecord(
            id=new_file_id(),
            filename=filename,
            purpose=purpose,
            file_type=file_type,
            bytes=0,
            created_at=int(time.time()),
            checksum=checksum,
            state="pending",
            upload_token=secrets.token_urlsafe(32),
        )
        await self._db(self._insert_file, record)
        return record

    def _insert_file(self, record: FileRecord) -> None:
        values = attrs.astuple(record)
        placeholders = ", ".join("?" * len(values))
        self._connection.execute(
            f"INSERT INTO files ({', '.join(_FILE_COLUMNS)}) VALUES ({placeholders})", values
        )

    async def add_file(
        self,
        *,
        file_id: str,
        filename: str,
        purpose: str,
        file_type: str,
        size: int,
        checksum: str | None,
    ) -> FileRecord:
        """Register a file whose body is already at `body_path(file_id)` (processed at once)."""
        record = FileRecord(
            id=file_id,
            filename=filename,
            purpose=purpose,
            file_type=file_type,
            bytes=size,
            created_at=int(time.time()),
            checksum=checksum,
            state="processed",
        )
        await self._db(self._insert_file, record)
        return record

    async def get_file(self, file_id: str) -> FileRecord | None:
        """A file that is not deleted, in any state; None when unknown."""
        return await self._db(self._get_file, file_id)

    def _get_file(self, file_id: str) -> FileRecord | None:
        row = self._connection.execute(
            f"SELECT {', '.join(_FILE_COLUMNS)} FROM files WHERE id = ? AND deleted = 0",
            (file_id,),
        ).fetchone()
        return _file_from_row(row) if row else None

    async def file_for_token(self, token: str) -> FileRecord | None:
        """The pending or uploaded (not yet processed) file an upload token belongs to."""

        def query() -> FileRecord | None:
            row = self._connection.execute(
                f"SELECT {', '.join(_FILE_COLUMNS)} FROM files"
                " WHERE upload_token = ? AND deleted = 0 AND state != 'processed'",
                (token,),
            ).fetchone()
            return _file_from_row(row) if row else None

        return await self._db(query)

    async def find_duplicate(self, checksum: str, purpose: str) -> str | None:
        """The id of a processed file with this checksum and purpose, if there is one."""

        def query() -> str | None:
            row = self._connection.execute(
                "SELECT id FROM files WHERE checksum = ? AND purpose = ? AND deleted = 0"
                " AND state = 'processed' ORDER BY created_at LIMIT 1",
                (checksum, purpose),
            ).fetchone()
            return str(row[0]) if row else None

        return await self._db(query)

    async def finish_upload(self, file_id: str, incoming: Path, size: int) -> None:
        """Move a completely received body into place and mark the file uploaded."""
        await asyncio.to_thread(_replace_durably, incoming, self.body_path(file_id))

        def update() -> None:
            self._connection.execute(
                "UPDATE files SET bytes = ?, state = 'uploaded' WHERE id = ?", (size, file_id)
            )

        await self._db(update)

    async def mark_processed(self, file_id: str) -> FileRecord | None:
        """Mark an uploaded file processed (its upload token stops working)."""

        def update() -> FileRecord | None:
            self._connection.execute(
                "UPDATE files SET state = 'processed', upload_token = NULL"
                " WHERE id = ? AND state IN ('uploaded', 'processed') AND deleted = 0",
                (file_id,),
            )
            return self._get_file(file_id)

        return await self._db(update)

    async def list_files(self, *, include_pending: bool = False) -> list[FileRecord]:
        """Every file with a body (and with `include_pending`, those still awaiting their
        PUT, which the API does not show), oldest first."""
        where = "deleted = 0" if include_pending else "deleted = 0 AND state != 'pending'"

        def query() -> list[FileRecord]:
            rows = self._connection.execute(
                f"SELECT {', '.join(_FILE_COLUMNS)} FROM files"
                f" WHERE {where} ORDER BY created_at, rowid"
            ).fetchall()
            return [_file_from_row(row) for row in rows]

        return await self._db(query)

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file; its body goes at once unless an unfinished job still reads it."""

        def update() -> tuple[bool, bool]:
            cursor = self._connection.execute(
                "UPDATE files SET deleted = 1, upload_token = NULL WHERE id = ? AND deleted = 0",
                (file_id,),
            )
            in_use = self._input_in_use(file_id)
            return cursor.rowcount > 0, in_use

        deleted, in_use = await self._db(update)
        if deleted and not in_use:
            await asyncio.to_thread(self.body_path(file_id).unlink, True)
        return deleted

    def _input_in_use(self, file_id: str) -> bool:
        placeholders = ", ".join("?" * len(TERMINAL_STATUSES))
        row = self._connection.execute(
            f"SELECT 1 FROM jobs WHERE input_file_id = ? AND status NOT IN ({placeholders})"
            " LIMIT 1",
            (file_id, *sorted(TERMINAL_STATUSES)),
        ).fetchone()
        return row is not None

    async def purge_if_deleted(self, file_id: str) -> None:
        """Remove the body of a file deleted while a job was reading it, once nothing does."""

        def query() -> bool:
            row = self._connection.execute(
                "SELECT deleted FROM files WHERE id = ?", (file_id,)
            ).fetchone()
            return bool(row and row[0]) and not self._input_in_use(file_id)

        if await self._db(query):
            await asyncio.to_thread(self.body_path(file_id).unlink, True)

    # -- jobs ------------------------------------------------------------------------------

    async def insert_job(self, job: JobRecord) -> None:
        """Store a new job."""

        def insert() -> None:
            values = attrs.astuple(job)
            placeholders = ", ".join("?" * len(values))
            self._connection.execute(
                f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({placeholders})", values
            )

        await self._db(insert)

    async def get_job(self, job_id: str) -> JobRecord | None:
        """A job by id; None when unknown."""
        return await self._db(self._get_job, job_id)

    def _get_job(self, job_id: str) -> JobRecord | None:
        row = self._connection.execute(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return _job_from_row(row) if row else None

    async def list_jobs(self) -> list[JobRecord]:
        """Every job, newest first."""

        def query() -> list[JobRecord]:
            rows = self._connection.execute(
                f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs ORDER BY created_at DESC, rowid DESC"
            ).fetchall()
            return [_job_from_row(row) for row in rows]

        return await self._db(query)

    async def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs that are not terminal, oldest first (the ones to resume after a restart)."""

        def query() -> list[JobRecord]:
            placeholders = ", ".join("?" * len(TERMINAL_STATUSES))
            rows = self._connection.execute(
                f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
                f" WHERE status NOT IN ({placeholders}) ORDER BY created_at, rowid",
                sorted(TERMINAL_STATUSES),
            ).fetchall()
            return [_job_from_row(row) for row in rows]

        return await self._db(query)

    async def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Change some fields of a job and return it as stored."""
        for name in fields:
            if name not in _JOB_COLUMNS or name == "id":
                raise ValueError(f"not a job field: {name}")

        def update() -> JobRecord:
            assignments = ", ".join(f"{name} = ?" for name in fields)
            self._connection.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id)
            )
            job = self._get_job(job_id)
            if job is None:
                raise KeyError(job_id)
            return job

        return await self._db(update)

    async def request_cancel(self, job_id: str) -> JobRecord | None:
        """Flag a VALIDATING or IN_PROGRESS job for cancellation; the job as stored after."""

        def update() -> JobRecord | None:
            self._connection.execute(
                "UPDATE jobs SET cancel_requested = 1"
                " WHERE id = ? AND status IN ('VALIDATING', 'IN_PROGRESS')",
                (job_id,),
            )
            return self._get_job(job_id)

        return await self._db(update)

    async def record_commit(
        self,
        job_id: str,
        *,
        lines: bytes,
        output_rows: int,
        error_rows: int,
        output_bytes: int,
        error_bytes: int,
        progress: float,
    ) -> None:
        """Durably note finished rows: which input lines, and the committed result sizes.

        Call it only after the result files were written and fsynced up to these sizes.
        """

        def commit() -> None:
            conn = self._connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO job_commits (job_id, seq, lines) VALUES (?,"
                    " (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_commits WHERE job_id = ?), ?)",
                    (job_id, job_id, lines),
                )
                conn.execute(
                    "UPDATE jobs SET output_rows = ?, error_rows = ?, done_rows = ?,"
                    " output_bytes = ?, error_bytes = ?, progress = ? WHERE id = ?",
                    (
                        output_rows,
                        error_rows,
                        output_rows + error_rows,
                        output_bytes,
                        error_bytes,
                        progress,
                        job_id,
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._db(commit)

    async def committed_lines(self, job_id: str) -> list[bytes]:
        """The line arrays of every commit of a job (to skip finished rows on resume)."""

        def query() -> list[bytes]:
            rows = self._connection.execute(
                "SELECT lines FROM job_commits WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
            return [bytes(row[0]) for row in rows]

        return await self._db(query)

    async def finish_job(
        self, job_id: str, *, new_files: Sequence[FileRecord], **fields: Any
    ) -> JobRecord:
        """Make a job terminal and register its result files, in one transaction."""
        for name in fields:
            if name not in _JOB_COLUMNS or name == "id":
                raise ValueError(f"not a job field: {name}")

        def commit() -> JobRecord:
            conn = self._connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                for record in new_files:
                    self._insert_file(record)
                assignments = ", ".join(f"{name} = ?" for name in fields)
                conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id)
                )
                conn.execute("DELETE FROM job_commits WHERE job_id = ?", (job_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            job = self._get_job(job_id)
            if job is None:
                raise KeyError(job_id)
            return job

        return await self._db(commit)


def _close(handle: BinaryIO) -> None:
    handle.close()


def _replace_durably(source: Path, target: Path) -> None:
    os.replace(source, target)
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UploadSink:
    """Streams a request body to a file under `incoming/`, 1 MiB per write, hashing as it goes.

    The caller feeds chunks with `write`; `finish` flushes, fsyncs and returns the size and the
    sha256 hex digest; `discard` removes the partial file. Nothing is held beyond one write.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._hash = hashlib.sha256()
        self._handle: BinaryIO | None = None

    async def open(self) -> None:
        """Create the file."""
        handle: BinaryIO = await in_thread(self.path.open, "wb", on_abandon=_close)
        self._handle = handle

    async def write(self, chunk: bytes) -> None:
        """Add a chunk; it reaches the disk once about 1 MiB has gathered."""
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        self.size += len(chunk)
        if self._pending_size >= IO_CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        await in_thread(self._write_blocking, data)

    def _write_blocking(self, data: bytes) -> None:
        assert self._handle is not None
        self._handle.write(data)
        self._hash.update(data)

    async def finish(self) -> tuple[int, str]:
        """Write what is left, fsync, close; returns (size, sha256 hex)."""
        await self._flush()

        def close() -> None:
            assert self._handle is not None
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

        await in_thread(close)
        return self.size, self._hash.hexdigest()

    async def discard(self) -> None:
        """Close and remove the partial file."""

        def remove() -> None:
            if self._handle is not None and not self._handle.closed:
                self._handle.close()
            self.path.unlink(missing_ok=True)

        await in_thread(remove)
