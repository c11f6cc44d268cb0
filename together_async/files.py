"""`client.files`: upload (the presigned flow, with the multipart route as a fallback), retrieve,
list, delete, and downloads that stream to disk or to the caller and resume with Range.

All file I/O runs in worker threads, about 1 MiB at a time; nothing reads a whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import stat as stat_module
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import anyio
import anyio.from_thread
import anyio.to_thread

from ._convert import structure, structure_file_list
from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    InvalidArgumentError,
    NotFoundError,
    TogetherError,
)
from ._jsonl import CHUNK_SIZE, aiter_json, aiter_lines, check_batch_chunks, raise_for_problems
from ._models import DownloadedFile, FileDeleteResponse, FileList, FileObject, FilePurpose
from ._protocol import (
    REDIRECT_STATUSES,
    decode_json,
    error_from_response,
    get_header,
    is_ambiguous_create_failure,
    parse_content_range,
    require_endpoint,
    require_id,
    require_text,
    resolve_location,
    user_agent,
    wire_name,
    with_context,
)
from ._safe_url import check_upload_url
from ._transport import FormField, Response

if TYPE_CHECKING:
    from ._client import AsyncTogether

__all__ = ["Files", "UploadInput"]

logger = logging.getLogger("together_async.files")

#: What `files.upload` accepts: a path, the bytes themselves, or a binary file object.
UploadInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

MAX_UPLOAD_REDIRECTS = 5
# A download that keeps making progress may resume this often before we give up on it.
MAX_DOWNLOAD_RESUMES = 100
_BATCH_API = FilePurpose.BATCH_API.value


class _UploadSource:
    """The bytes to upload, readable from the start as often as needed (once per attempt and
    redirect hop), one chunk at a time in a worker thread."""

    def __init__(
        self,
        *,
        label: str,
        name: str,
        size: int,
        path: Path | None = None,
        data: bytes | None = None,
        fileobj: BinaryIO | None = None,
        start: int = 0,
        temporary: bool = False,
    ) -> None:
        self.label = label
        self.name = name
        self.size = size
        self._path = path
        self._data = data
        self._fileobj = fileobj
        self._start = start
        self._temporary = temporary
        # The scan's sha256: every later read must give exactly these bytes.
        self.checksum: str | None = None
        # Set when a read no longer gives the scanned bytes; no attempt may send after that.
        self.changed: TogetherError | None = None

    @classmethod
    async def open(cls, file: Any, filename: str | None) -> _UploadSource:
        if isinstance(file, (str, os.PathLike)):
            path = Path(file)
            try:
                stat = await anyio.Path(path).stat()
            except OSError as exc:
                raise InvalidArgumentError(f"cannot read {path}: {exc.strerror or exc}") from exc
            except ValueError as exc:  # a NUL in the path
                raise InvalidArgumentError(f"cannot read {str(path)!r}: {exc}") from None
            if not stat_module.S_ISREG(stat.st_mode):
                raise InvalidArgumentError(f"{path} is not a regular file")
            name = filename or wire_name(path.name)
            return cls(label=str(path), name=name, size=stat.st_size, path=path)
        if isinstance(file, (bytes, bytearray, memoryview)):
            data = bytes(file)
            return cls(label="<bytes>", name=filename or "upload.jsonl", size=len(data), data=data)
        if hasattr(file, "read"):
            return await cls._from_fileobj(file, filename)
        raise InvalidArgumentError(
            f"file must be a path, bytes or a binary file object, got {type(file).__name__}"
        )

    @classmethod
    async def _from_fileobj(cls, fileobj: Any, filename: str | None) -> _UploadSource:
        raw_name = getattr(fileobj, "name", None)
        name = filename or (
            wire_name(os.path.basename(raw_name)) if isinstance(raw_name, str) else ""
        )
        name = name or "upload.jsonl"
        label = raw_name if isinstance(raw_name, str) else "<file object>"
        if isinstance(fileobj, io.TextIOBase):
            raise InvalidArgumentError(f"{label}: open the file in binary mode ('rb')")

        def measure() -> tuple[int, int] | None:
            seekable = getattr(fileobj, "seekable", None)
            if seekable is None or not seekable():
                return None
            start = fileobj.tell()
            end = fileobj.seek(0, io.SEEK_END)
            fileobj.seek(start)
            return start, end - start

        measured = await anyio.to_thread.run_sync(measure)
        if measured is not None:
            start, size = measured
            return cls(label=label, name=name, size=size, fileobj=fileobj, start=start)

        # Not seekable: spool it to disk once, so every attempt can re-read it. The spool
        # is made shielded (a cancel arriving meanwhile would lose its name, and the file
        # with it) and removed on any failure, a cancel during the copy included.
        with anyio.CancelScope(shield=True):
            handle, spool_name = await anyio.to_thread.run_sync(
                lambda: tempfile.mkstemp(prefix="together-upload-", suffix=".jsonl")
            )
        path = Path(spool_name)

        def spool() -> int:
            with open(handle, "wb") as spooled:
                size = 0
                while chunk := fileobj.read(CHUNK_SIZE):
                    if isinstance(chunk, str):
                        raise InvalidArgumentError(f"{label}: open the file in binary mode")
                    spooled.write(chunk)
                    size += len(chunk)
                    anyio.from_thread.check_cancelled()  # stop copying a cancelled upload
            return size

        try:
            size = await anyio.to_thread.run_sync(spool)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.Path(path).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise TogetherError(f"reading {label}: {exc.strerror or exc}") from exc
            raise
        return cls(label=label, name=name, size=size, path=path, temporary=True)

    def iter_blocking(self) -> Generator[bytes, None, None]:
        """The bytes in chunks, read on the calling thread (use from a worker thread only)."""
        if self._data is not None:
            view = self._data
            for offset in range(0, len(view), CHUNK_SIZE):
                yield view[offset : offset + CHUNK_SIZE]
            return
        if self._path is not None:
            with open(self._path, "rb") as file:
                while chunk := file.read(CHUNK_SIZE):
                    yield chunk
            return
        assert self._fileobj is not None
        self._fileobj.seek(self._start)
        remaining = self.size
        while remaining > 0:
            chunk = self._fileobj.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _iter_verified_blocking(self) -> Generator[bytes, None, None]:
        """The scanned bytes again, each chunk counted and hashed before it is sent: a file
        cut short raises at its end (the body must not stop short of its Content-Length and
        leave the server waiting), and a file edited since the scan raises before its last
        chunk goes out, so storage never holds a whole body that was not the one checked.
        Bytes appended since are not read."""
        hasher = hashlib.sha256()
        sent = 0
        for chunk in self.iter_blocking():
            if sent + len(chunk) > self.size:
                chunk = chunk[: self.size - sent]
            sent += len(chunk)
            hasher.update(chunk)
            if sent == self.size and hasher.hexdigest() != self.checksum:
                raise self._record_change("its content is not the content that was checked")
            yield chunk
            if sent == self.size:
                return
        if sent < self.size:
            raise self._record_change(f"{sent} of its {self.size} bytes are left")

    def _record_change(self, what: str) -> TogetherError:
        self.changed = TogetherError(
            f"{self.label} changed after it was checked ({what}); not uploading it"
        )
        return self.changed

    def raise_if_changed(self) -> None:
        """Raise the change a stream found, if any (before an attempt, after a failed one)."""
        if self.changed is not None:
            raise self.changed

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes in chunks, each read in a worker thread; a fresh stream every call.
        After `scan`, the stream is verified against what the scan saw."""
        blocking = self.iter_blocking() if self.checksum is None else self._iter_verified_blocking()
        reader = _ThreadChunks(blocking)
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(reader.next)
                if chunk is None:
                    return
                yield chunk
        finally:
            # Closing the generator closes the file it holds open (in a thread: it may flush).
            await anyio.to_thread.run_sync(reader.close)

    async def scan(self, *, validate: bool, endpoint: str | None) -> str:
        """One pass in a worker thread: the sha256 checksum, and the batch-file check when
        `validate` (raising BatchFileError before anything is sent)."""

        def run() -> str:
            if validate:
                report = check_batch_chunks(self.iter_blocking(), endpoint=endpoint, sha256=True)
                raise_for_problems(report, source=self.label)
                if report.sha256 is not None:
                    self._check_scanned_size(report.bytes)
                    return report.sha256
            hasher = hashlib.sha256()
            scanned = 0
            for chunk in self.iter_blocking():
                hasher.update(chunk)
                scanned += len(chunk)
            self._check_scanned_size(scanned)
            return hasher.hexdigest()

        self.checksum = await anyio.to_thread.run_sync(run)
        return self.checksum

    def _check_scanned_size(self, scanned: int) -> None:
        if scanned != self.size:
            raise TogetherError(
                f"{self.label} changed while it was being checked ({self.size} bytes when "
                f"opened, {scanned} read); not uploading it"
            )

    async def aclose(self) -> None:
        if self._temporary and self._path is not None:
            # Shielded: a cancelled upload must not leave its spool behind.
            with anyio.CancelScope(shield=True):
                await anyio.Path(self._path).unlink(missing_ok=True)


class _ThreadChunks:
    """A blocking chunk generator driven from worker threads, one call at a time.

    aiohttp cancels a request's body writer natively when the server answers early (a 503
    before the body is read), and that cancellation does not wait for the read running in a
    thread: without the lock, close() then ran beside it, which raises "generator already
    executing" and can crash CPython 3.11 (its close reads the running frame's stack).
    """

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self._lock = threading.Lock()

    def next(self) -> bytes | None:
        with self._lock:
            return next(self._chunks, None)

    def close(self) -> None:
        with self._lock:  # waits for a read still in flight
            self._chunks.close()


class Files:
    """`client.files`: upload, retrieve, list, delete and download files."""

    def __init__(self, client: AsyncTogether) -> None:
        self._client = client

    # ---- upload ---------------------------------------------------------------------------

    async def upload(
        self,
        file: UploadInput,
        *,
        purpose: str = "batch-api",
        check: bool = True,
        filename: str | None = None,
        endpoint: str | None = None,
        max_retries: int | None = None,
        on_file_id: Callable[[str], Awaitable[object]] | None = None,
    ) -> FileObject:
        """Upload a file and return it as the API stores it.

        With `check=True` a `batch-api` file is validated first (see `validate_batch_file`)
        and BatchFileError lists every problem before anything is sent. The bytes are
        streamed from disk in ~1 MiB chunks read in a worker thread, straight to the storage
        host the API points at (which never sees the API key). A file with the same checksum
        already on the server is reused rather than uploaded again.

        Args:
            file: a path, bytes, or a binary file object (read from its current position).
            purpose: what the file is for; `batch-api` for batch input.
            check: validate a `batch-api` file before uploading it.
            filename: the name to store it under (default: the file's own name).
            endpoint: the batch endpoint the file is for, so lines with another `url` are
                caught by the check.
            max_retries: overrides the client's setting for this call.
            on_file_id: awaited with the id the API assigned to the file before its bytes
                are sent to storage, so a process killed mid-upload leaves a record of the
                incomplete remote file (to delete, or to finish). Not called when the API
                answers with an existing file, or takes the file in one request.

        Example:
            uploaded = await client.files.upload("requests.jsonl")
        """
        purpose_value = (
            str(FilePurpose(require_text(purpose, "purpose"))) if isinstance(purpose, str) else None
        )
        if not purpose_value:
            raise InvalidArgumentError(f"purpose must be a non-empty string, got {purpose!r}")
        if filename is not None and (not require_text(filename, "filename").strip()):
            raise InvalidArgumentError("filename must be a non-empty string")
        endpoint_value = None if endpoint is None else require_endpoint(endpoint)
        source = await _UploadSource.open(file, filename)
        try:
            checksum = await source.scan(
                validate=check and purpose_value == _BATCH_API,
                endpoint=endpoint_value,
            )
            return await self._upload(source, purpose_value, checksum, max_retries, on_file_id)
        finally:
            await source.aclose()

    async def _upload(
        self,
        source: _UploadSource,
        purpose: str,
        checksum: str,
        max_retries: int | None,
        on_file_id: Callable[[str], Awaitable[object]] | None,
    ) -> FileObject:
        client = self._client

        def fields() -> list[FormField]:
            return [
                FormField(name="purpose", value=purpose),
                FormField(name="file_name", value=source.name),
                FormField(name="file_type", value="jsonl"),
                FormField(name="checksum", value=checksum),
            ]

        url = client._url("files")
        response = await client._send(
            "POST",
            url,
            form=fields,
            accept=REDIRECT_STATUSES | {404, 405, 409},
            max_retries=max_retries,
        )
        if response.status in REDIRECT_STATUSES:
            return await self._presigned(source, response, max_retries, on_file_id)
        if response.status == 409:
            return await self._existing(source, response, max_retries)
        if response.status in (404, 405):
            logger.debug("POST /files answered %d: using POST /files/upload", response.status)
            return await self._multipart(source, purpose, max_retries)
        payload = decode_json(response.body, what="POST /files")
        if not isinstance(payload, dict) or "id" not in payload:
            raise APIResponseValidationError(
                "POST /files answered neither a redirect to storage nor a file object"
            )
        uploaded = structure(payload, FileObject)
        if uploaded.bytes is not None and uploaded.bytes != source.size:
            # No byte was sent, yet the API names a file: it must be this one, whole.
            raise APIResponseValidationError(
                f"POST /files answered file {uploaded.id} of {uploaded.bytes:,} bytes without "
                f"an upload step, but {source.label} has {source.size:,}: not this file"
            )
        return uploaded

    async def _existing(
        self, source: _UploadSource, response: Response, max_retries: int | None
    ) -> FileObject:
        try:
            payload = decode_json(response.body, what="POST /files (409)")
        except APIResponseValidationError:
            payload = None
        file_id = payload.get("file_id") if isinstance(payload, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise error_from_response(
                response.status,
                response.headers,
                response.body,
                method="POST",
                url=response.url,
                secret=self._client.config.api_key,
            )
        logger.info("a file with this checksum already exists: reusing %s", file_id)
        existing = await self.retrieve(file_id, max_retries=max_retries)
        if existing.bytes is not None and existing.bytes != source.size:
            # Same checksum, other size: not the same bytes, whatever the server says.
            raise APIResponseValidationError(
                f"POST /files said file {file_id} already holds these bytes (409), but it has "
                f"{existing.bytes:,} bytes and {source.label} has {source.size:,}"
            )
        return existing

    async def _presigned(
        self,
        source: _UploadSource,
        response: Response,
        max_retries: int | None,
        on_file_id: Callable[[str], Awaitable[object]] | None,
    ) -> FileObject:
        client = self._client
        location = get_header(response.headers, "location")
        file_id = get_header(response.headers, "x-together-file-id")
        if not location or not file_id or not file_id.strip():
            raise APIResponseValidationError(
                "POST /files redirected without a Location and an X-Together-File-Id header"
            )
        file_id = file_id.strip()
        storage_url = resolve_location(response.url, location)
        if on_file_id is not None:
            await on_file_id(file_id)
        # A storage that answers 200 but keeps nothing (or a part) shows in the file the API
        # then reports: PUT again, as often as a failed request would be retried.
        attempts = client.config.attempts_for(max_retries)
        for attempt in range(1, attempts + 1):
            try:
                await self._put(source, storage_url, max_retries)
            except TogetherError as exc:
                raise with_context(
                    exc,
                    f"uploading {source.label} failed after POST /files created file "
                    f"{file_id}, which is left without its content (delete it or upload again)",
                ) from exc
            uploaded = await self._preprocess(file_id, max_retries)
            if uploaded.bytes is None or uploaded.bytes == source.size:
                return uploaded
            logger.warning(
                "storage accepted %s but file %s holds %d of its %d bytes (PUT %d of %d)",
                source.label,
                file_id,
                uploaded.bytes,
                source.size,
                attempt,
                attempts,
            )
        raise APIResponseValidationError(
            f"storage accepted {source.label} {attempts} time(s) but file {file_id} holds "
            f"{uploaded.bytes} of its {source.size} bytes (delete it or upload again)"
        )

    async def _preprocess(self, file_id: str, max_retries: int | None) -> FileObject:
        """POST /files/{id}/preprocess: finish a presigned upload; the file as it now is."""
        client = self._client
        preprocessed = await client._send_json(
            "POST",
            client._url("files", file_id, "preprocess"),
            what="POST /files/{id}/preprocess",
            max_retries=max_retries,
        )
        if isinstance(preprocessed, dict) and isinstance(preprocessed.get("file"), dict):
            preprocessed = preprocessed["file"]
        return structure(preprocessed, FileObject)

    async def _put(self, source: _UploadSource, url: str, max_retries: int | None) -> None:
        """PUT the bytes to storage, following at most a few redirects (re-streaming each hop);
        every target passes the safety check first. Never sends the API key."""
        client = self._client
        headers = {
            "User-Agent": user_agent(),
            "Content-Length": str(source.size),
            "Content-Type": "application/octet-stream",
        }
        for _hop in range(MAX_UPLOAD_REDIRECTS + 1):
            check_upload_url(url, api_base_url=client.base_url)
            target = url

            async def attempt(target: str = target) -> Response:
                source.raise_if_changed()  # the same bytes again: no point retrying
                transport = client._ensure_transport()
                try:
                    answer = await transport.request(
                        "PUT", target, headers=headers, content=source.chunks()
                    )
                except Exception:
                    # aiohttp reports a body stream's failure as a connection error.
                    source.raise_if_changed()
                    raise
                source.raise_if_changed()  # storage may answer before the body is sent
                if 200 <= answer.status < 300 or answer.status in REDIRECT_STATUSES:
                    return answer
                raise error_from_response(
                    answer.status, answer.headers, answer.body, method="PUT", url=target
                )

            answer = await client._with_retries(attempt, max_retries=max_retries)
            if answer.status not in REDIRECT_STATUSES:
                return
            location = get_header(answer.headers, "location")
            if not location:
                raise APIResponseValidationError("the storage host redirected without a Location")
            url = resolve_location(target, location)
        raise APIResponseValidationError(
            f"the storage host redirected more than {MAX_UPLOAD_REDIRECTS} times"
        )

    async def _multipart(
        self, source: _UploadSource, purpose: str, max_retries: int | None
    ) -> FileObject:
        def fields() -> list[FormField]:
            source.raise_if_changed()  # built per attempt: a changed file is not sent again
            return [
                FormField(name="purpose", value=purpose),
                FormField(name="file_name", value=source.name),
                FormField(name="file_type", value="jsonl"),
                FormField(
                    name="file",
                    value=source.chunks(),
                    filename=source.name,
                    content_type="application/octet-stream",
                    size=source.size,
                ),
            ]

        client = self._client
        try:
            response = await client._send(
                "POST", client._url("files", "upload"), form=fields, max_retries=max_retries
            )
        except Exception:
            source.raise_if_changed()
            raise
        source.raise_if_changed()
        uploaded = structure(decode_json(response.body, what="POST /files/upload"), FileObject)
        if uploaded.bytes is not None and uploaded.bytes != source.size:
            # Not retried: every POST /files/upload makes another file.
            raise APIResponseValidationError(
                f"POST /files/upload stored {source.label} as file {uploaded.id} of "
                f"{uploaded.bytes} bytes, not {source.size} (delete it or upload again)"
            )
        return uploaded

    # ---- metadata -------------------------------------------------------------------------

    async def retrieve(self, id: str, *, max_retries: int | None = None) -> FileObject:
        """The file with this id."""
        file_id = require_id(id, "file id")
        client = self._client
        payload = await client._send_json(
            "GET", client._url("files", file_id), what="GET /files/{id}", max_retries=max_retries
        )
        return structure(payload, FileObject)

    async def list(self, *, max_retries: int | None = None) -> FileList:
        """Every file of the account (`{"data": [...]}` or a bare array, both accepted)."""
        client = self._client
        payload = await client._send_json(
            "GET", client._url("files"), what="GET /files", max_retries=max_retries
        )
        return structure_file_list(payload)

    async def delete(self, id: str, *, max_retries: int | None = None) -> FileDeleteResponse:
        """Delete the file with this id.

        A retry after an attempt whose answer was lost (a dropped connection, a 5xx) may
        find the file gone: that attempt deleted it, so that 404 is success. A 404 on the
        first attempt is NotFoundError.
        """
        file_id = require_id(id, "file id")
        client = self._client
        url = client._url("files", file_id)
        maybe_deleted = False

        async def attempt() -> FileDeleteResponse:
            nonlocal maybe_deleted
            try:
                response = await client._send_once("DELETE", url)
            except NotFoundError:
                if not maybe_deleted:
                    raise
                logger.info("delete %s: gone on retry, deleted by the attempt that failed", file_id)
                return FileDeleteResponse(id=file_id, deleted=True)
            except APIError as exc:
                maybe_deleted = maybe_deleted or is_ambiguous_create_failure(exc)
                raise
            payload = decode_json(response.body, what="DELETE /files/{id}")
            return structure(payload, FileDeleteResponse)

        return await client._with_retries(attempt, max_retries=max_retries)

    # ---- content --------------------------------------------------------------------------

    async def retrieve_content(
        self,
        id: str,
        *,
        output: str | os.PathLike[str] | None = None,
        max_retries: int | None = None,
    ) -> DownloadedFile:
        """Download a file's content to `output` (default `<id>.jsonl`; a directory means
        `<directory>/<id>.jsonl`).

        The bytes go to a temporary file beside the target, renamed into place only once
        complete, so `output` is never left half-written; a symlink is followed, not
        replaced. An existing target that is not a regular file (`/dev/null`, a FIFO, a
        terminal) is written into directly, as `open(output, "wb")` would. A connection that
        drops mid-body is resumed with a Range request. An id that cannot be a file name
        (a path separator, NUL) is refused when it would name the file.

        Example:
            downloaded = await client.files.retrieve_content(job.output_file_id)
        """
        file_id = require_id(id, "file id")
        given = _output_path(output)
        try:
            if given is None:
                target = Path(_local_name(file_id))
            elif await anyio.Path(given).is_dir():
                target = given / _local_name(file_id)
            else:
                target = given
            try:
                mode = (await anyio.Path(target).stat()).st_mode
            except FileNotFoundError:
                mode = None
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot write to {given}: {exc}") from exc
        if mode is not None and stat_module.S_ISDIR(mode):
            raise InvalidArgumentError(f"cannot write to {target}: it is a directory")
        if mode is not None and not stat_module.S_ISREG(mode):
            try:
                size = await self._stream_into(file_id, target, max_retries=max_retries)
            except OSError as exc:
                raise TogetherError(f"writing {target}: {exc.strerror or exc}") from exc
            return DownloadedFile(id=file_id, path=target, bytes=size)
        # Through a symlink to its file: renaming onto the link would replace the link.
        real = Path(await anyio.to_thread.run_sync(os.path.realpath, target))
        if not await anyio.Path(real.parent).is_dir():
            raise InvalidArgumentError(f"output directory {target.parent} does not exist")
        partial_path = real.with_name(f".{real.name}.{secrets.token_hex(4)}.part")
        try:
            size = await self._stream_into(file_id, partial_path, max_retries=max_retries)
            await anyio.Path(partial_path).replace(real)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.Path(partial_path).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise TogetherError(f"writing {target}: {exc.strerror or exc}") from exc
            raise
        return DownloadedFile(id=file_id, path=target, bytes=size)

    async def _stream_into(self, file_id: str, path: Path, *, max_retries: int | None) -> int:
        """Write the content into `path` (created or truncated; a device or FIFO is just
        opened), flushed to disk if it is a regular file; the number of bytes."""
        size = 0
        async with await anyio.open_file(path, "wb") as sink:
            pending = bytearray()
            chunks = self._content_chunks(file_id, max_retries=max_retries)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    pending += chunk
                    size += len(chunk)
                    if len(pending) >= CHUNK_SIZE:
                        await sink.write(bytes(pending))
                        pending.clear()
            if pending:
                await sink.write(bytes(pending))
            await sink.flush()
            fileno = sink.wrapped.fileno()
            if stat_module.S_ISREG((await anyio.to_thread.run_sync(os.fstat, fileno)).st_mode):
                await anyio.to_thread.run_sync(os.fsync, fileno)
        return size

    def iter_bytes(self, id: str, *, max_retries: int | None = None) -> AsyncGenerator[bytes, None]:
        """The raw bytes of a remote file as they arrive, in chunks of up to ~1 MiB, verified
        and resumed like `retrieve_content` (for writing to a pipe or stdout, say).

        Example:
            async with contextlib.aclosing(client.files.iter_bytes(file_id)) as chunks:
                async for chunk in chunks: ...
        """
        file_id = require_id(id, "file id")
        return self._content_chunks(file_id, max_retries=max_retries)

    def content(self, id: str, *, max_retries: int | None = None) -> AsyncGenerator[bytes, None]:
        """`iter_bytes` under the official SDK's name. The SDK's `content` gives a response
        object to `.read()`; this streams the bytes in chunks (a file can be 100 MB), so
        `b"".join([c async for c in client.files.content(id)])` reads it whole, and
        `retrieve_content(id, output=path)` writes it to disk."""
        return self.iter_bytes(id, max_retries=max_retries)

    def iter_lines(self, id: str, *, max_retries: int | None = None) -> AsyncIterator[bytes]:
        """The lines of a remote file as they arrive (without line endings), resuming with
        Range if the connection drops. Memory does not grow with the file.

        Example:
            async with contextlib.aclosing(client.files.iter_lines(file_id)) as lines:
                async for line in lines: ...
        """
        file_id = require_id(id, "file id")
        return self._iter_lines(file_id, max_retries)

    async def _iter_lines(
        self, file_id: str, max_retries: int | None
    ) -> AsyncGenerator[bytes, None]:
        chunks = self._content_chunks(file_id, max_retries=max_retries)
        lines = aiter_lines(chunks)
        async with contextlib.aclosing(chunks), contextlib.aclosing(lines):
            async for line in lines:
                yield line

    def iter_json(self, id: str, *, max_retries: int | None = None) -> AsyncIterator[Any]:
        """The decoded JSON value of each line of a remote file, as it streams; blank lines are
        skipped and a bad line raises APIResponseValidationError naming the file and line."""
        file_id = require_id(id, "file id")
        return self._iter_json(file_id, max_retries)

    async def _iter_json(self, file_id: str, max_retries: int | None) -> AsyncGenerator[Any, None]:
        chunks = self._content_chunks(file_id, max_retries=max_retries)
        values = aiter_json(chunks, source=f"file {file_id}")
        async with contextlib.aclosing(chunks), contextlib.aclosing(values):
            try:
                async for value in values:
                    yield value
            except ValueError as exc:
                raise APIResponseValidationError(str(exc)) from exc

    async def _content_chunks(
        self, file_id: str, *, max_retries: int | None
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of `GET /files/{id}/content` in order, resuming after a dropped connection
        with `Range: bytes=N-` (and skipping what we have if the server ignores the Range).

        The download is complete only at the length the server declared: a 200's
        Content-Length, a 206's Content-Range total, or else the file object's `bytes`
        (asked for only then). A body that ends early, even one delimited by the close of the
        connection, is resumed like a drop; a drop after the last byte, or a 416 to a Range
        starting at the end, is success."""
        client = self._client
        url = client._url("files", file_id, "content")
        attempts = client.config.attempts_for(max_retries)
        deadline = client._call_deadline()  # one for the whole download, resumes included
        offset = 0
        expected: int | None = None
        resumes = 0
        stalls = 0
        while True:
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            received_before = offset
            cut: APIConnectionError | None = None
            async with AsyncExitStack() as stack:
                # Opening is retried inside; a failure to open propagates from here.
                response = await client._open_stream(
                    "GET",
                    url,
                    headers=headers,
                    accept=frozenset({206, 416}) if offset else frozenset({206}),
                    max_retries=max_retries,
                    stack=stack,
                    deadline=deadline,
                )
                if response.status == 416:
                    # Asked for bytes from `offset` and there are none: done if that is the end.
                    total = _unsatisfied_range_total(response.headers)
                    if expected is None:
                        expected = total
                    if expected is None:
                        expected = await self._declared_size(file_id, max_retries)
                    if expected == offset:
                        return
                    raise APIResponseValidationError(
                        f"file {file_id}: the server refused a Range from byte {offset} "
                        f"(416) before the end of the file"
                    )
                skip, total = _resumed_answer(response.status, response.headers, offset)
                if expected is None:
                    expected = total
                elif total is not None and total != expected:
                    raise APIResponseValidationError(
                        f"file {file_id} changed during the download: {expected} bytes at "
                        f"first, now {total}"
                    )
                try:
                    async for chunk in response.iter_chunks():
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk = chunk[skip:]
                            skip = 0
                        offset += len(chunk)
                        if expected is not None and offset > expected:
                            raise APIResponseValidationError(
                                f"file {file_id}: the server sent more than the {expected} "
                                f"bytes it declared"
                            )
                        yield chunk
                except APIConnectionError as exc:
                    cut = exc
            if expected is None:
                # No answer said how long the file is: an ended body may have been cut short,
                # and a drop may have come after the last byte. The file object says.
                expected = await self._declared_size(file_id, max_retries)
                if expected is None and cut is None:
                    return  # no length anywhere to measure against: the end is the end
            if offset == expected:
                return
            if expected is not None and offset > expected:
                raise APIResponseValidationError(
                    f"file {file_id}: received {offset} bytes, the server declared {expected}"
                )
            if cut is None:
                cut = APIConnectionError(
                    f"file {file_id}: the body ended at byte {offset} of {expected}"
                )
            # With no length known at all, the resumed answer tells: 206, or 416 at the end.
            resumes += 1
            stalls = 0 if offset > received_before else stalls + 1
            if stalls >= attempts or resumes > MAX_DOWNLOAD_RESUMES:
                raise cut
            logger.info("file %s: connection lost at byte %d (%s); resuming", file_id, offset, cut)

    async def _declared_size(self, file_id: str, max_retries: int | None) -> int | None:
        """The file's `bytes` as the API reports it, when no answer said how long it is."""
        size = (await self.retrieve(file_id, max_retries=max_retries)).bytes
        return size if isinstance(size, int) and size >= 0 else None


def _output_path(output: object) -> Path | None:
    """`output` as a Path. The string `-` is refused rather than taken as a file name: it is
    the shell's spelling of stdout, which the CLI handles (the library has iter_bytes)."""
    if output is None:
        return None
    if not isinstance(output, (str, os.PathLike)):
        raise InvalidArgumentError(f"output must be a path, got {type(output).__name__}")
    if output == "-":
        raise InvalidArgumentError(
            "output '-' is not stdout here: stream files.iter_bytes() to it (or pass "
            "Path('-') for a file named '-')"
        )
    path = os.fspath(output)
    if not isinstance(path, str):
        raise InvalidArgumentError("output must be a str path, not bytes")
    if not path:
        raise InvalidArgumentError("output must not be empty")
    return Path(path)


def _local_name(file_id: str) -> str:
    """`<id>.jsonl`, refusing an id that would step out of the directory or cannot be a name."""
    if any(bad in file_id for bad in ("/", "\\", "\0")):
        raise InvalidArgumentError(
            f"file id {file_id!r} cannot be used as a file name (it has a path separator or "
            f"NUL): pass output= the file path to write"
        )
    return f"{file_id}.jsonl"


_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def _unsatisfied_range_total(headers: Any) -> int | None:
    """The file's length from a 416's `Content-Range: bytes */LENGTH`, if it says."""
    match = _UNSATISFIED_RANGE.match(get_header(headers, "content-range") or "")
    return int(match.group(1)) if match else None


def _resumed_answer(status: int, headers: Any, offset: int) -> tuple[int, int | None]:
    """How much of an answer we already have, and the file's whole length if it says.

    Nothing to skip for a matching 206; everything up to `offset` when the server ignored the
    Range and sent the whole file again. A 206 to a request without Range is refused: it is
    not the whole file, whatever its Content-Range says."""
    length = get_header(headers, "content-length")
    declared = int(length) if length is not None and length.strip().isdigit() else None
    if status != 206:
        return offset, declared
    content_range = parse_content_range(get_header(headers, "content-range"))
    if offset == 0:
        raise APIResponseValidationError(
            "the server answered 206 (partial content) to a request for the whole file"
        )
    if content_range is None or content_range[0] > offset:
        raise APIResponseValidationError(
            f"resuming at byte {offset}: the server answered 206 with Content-Range "
            f"{get_header(headers, 'content-range')!r}"
        )
    start, _end, total = content_range
    if total is None and declared is not None:
        total = start + declared
    return offset - start, total
