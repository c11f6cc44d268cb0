"""The emulator's HTTP surface: the files and batches routes under /v1, and the storage route.

The API app answers with the real shapes and codes (see the wire-protocol reference); its
middleware does auth, request counting and fault injection. The storage app, on a second
port, takes presigned PUTs: no Authorization wanted, bodies streamed to disk.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import re
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

import attrs
import orjson
from aiohttp import hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import (
    BadContentDispositionHeader,
    BadContentDispositionParam,
    BodyPartReader,
    MultipartReader,
    content_disposition_filename,
    parse_content_disposition,
)

from .engines import SUPPORTED_ENDPOINTS
from .faults import MUTATING_METHODS, FaultDecision, FaultInjector, FaultKind
from .jobs import JobRunner, parse_completion_window
from .storage import (
    IO_CHUNK,
    FileRecord,
    JobRecord,
    Storage,
    UploadSink,
    in_thread,
    is_file_id,
    is_job_id,
    new_file_id,
    new_job_id,
)

__all__ = ["AppContext", "EmulatorStats", "build_api_app", "build_storage_app"]

logger = logging.getLogger("together_async.emulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PURPOSES = frozenset(
    {
        "batch-api",
        "batch-generated",
        "fine-tune",
        "eval",
        "eval-sample",
        "eval-output",
        "eval-summary",
        "calibration",
    }
)
FILE_TYPES = frozenset({"jsonl", "csv", "parquet"})
CANCELLABLE = frozenset({"VALIDATING", "IN_PROGRESS"})
USER_ID = "user-emulator"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_FORM_FIELD = 4096
_MAX_FORM_FIELDS = 64
# RFC 2046 section 5.1.1: a boundary is 1 to 70 characters.
_MAX_BOUNDARY = 70
# Bodies of every route but the multipart upload (JSON, forms) are at most this big.
MAX_BODY_BYTES = 1024 * 1024
# The multipart upload may carry this much beside the file itself (fields, part headers).
_FORM_OVERHEAD = 1024 * 1024
# A priority is stored as an SQLite INTEGER: signed 64 bits.
_PRIORITY_RANGE = range(-(2**63), 2**63)
_UPLOAD_ROUTE = "/upload/{token}"
# How long a cancel call waits for the job to reach CANCELLED before answering.
_CANCEL_WAIT = 5.0


@attrs.define
class EmulatorStats:
    """What the emulator served, for tests to assert on. `reset()` starts counting afresh.

    Attributes:
        requests: calls by (method, route template), e.g. `("POST", "/batches")`; the storage
            port counts as `("PUT", "/upload/{token}")`.
        jobs_created: batch jobs created, by input_file_id (to check "no duplicate job").
        faults_injected: faults that struck, by (method, route template, kind).
        storage_authorization_headers: storage PUTs that carried an Authorization header
            (a correct client sends none).
    """

    requests: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    jobs_created: Counter[str] = attrs.field(factory=Counter)
    faults_injected: Counter[tuple[str, str, str]] = attrs.field(factory=Counter)
    storage_authorization_headers: int = 0

    def __getitem__(self, key: tuple[str, str]) -> int:
        """Calls served for (method, route template): `emu.stats["GET", "/batches/{id}"]`."""
        return self.requests[key]

    def reset(self) -> None:
        """Forget every count."""
        self.requests.clear()
        self.jobs_created.clear()
        self.faults_injected.clear()
        self.storage_authorization_headers = 0


@attrs.define(kw_only=True)
class AppContext:
    """What the handlers share."""

    storage: Storage
    runner: JobRunner
    stats: EmulatorStats
    faults: FaultInjector
    api_key: str | None
    max_upload_bytes: int
    storage_port: int = 0


_CONTEXT = web.AppKey("context", AppContext)
_RESET_MID_BODY = web.RequestKey("reset_mid_body", bool)


# -- wire shapes ----------------------------------------------------------------------------


def iso(timestamp: float) -> str:
    """Unix seconds as ISO-8601 UTC with a Z, like the real service."""
    text = datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def file_to_wire(record: FileRecord) -> dict[str, Any]:
    """A FileResponse, with the real (capitalised) keys."""
    return {
        "id": record.id,
        "object": "file",
        "created_at": record.created_at,
        "filename": record.filename,
        "bytes": record.bytes,
        "purpose": record.purpose,
        "FileType": record.file_type,
        "Processed": record.state == "processed",
        "processing_status": "COMPLETED" if record.state == "processed" else "PENDING",
    }


def job_to_wire(job: JobRecord) -> dict[str, Any]:
    """A BatchJob; absent values are left out (the spec types them as non-null strings)."""
    wire: dict[str, Any] = {
        "id": job.id,
        "user_id": job.user_id,
        "input_file_id": job.input_file_id,
        "file_size_bytes": job.file_size_bytes,
        "status": job.status,
        "job_deadline": iso(job.job_deadline),
        "created_at": iso(job.created_at),
        "endpoint": job.endpoint,
        "progress": job.progress,
    }
    # Beyond the spec's BatchJob, the request's own settings are echoed (as the seed docs'
    # jobs carry completion_window): what a client matches a lost create's job against.
    optional = {
        "model_id": job.model_id,
        "completion_window": job.completion_window,
        "priority": job.priority,
        "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id,
        "error": job.error,
        "completed_at": iso(job.completed_at) if job.completed_at is not None else None,
    }
    wire.update({key: value for key, value in optional.items() if value is not None})
    return wire


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _is_batch_route(path: str) -> bool:
    return path.startswith("/batches") or path.startswith("/v1/batches")


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in the shape of its route family.

    Batch routes answer `{"error": "<message>"}`; file routes answer the OpenAI-style
    `{"error": {"message", "type", "param", "code"}}` (the spec's ErrorData).
    """
    # Messages may quote client input; lone surrogates from undecodable bytes would make
    # the JSON encoder fail, and a failed error answer is a 500.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if _is_batch_route(path):
        return _json({"error": message}, status, headers)
    return _json(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}},
        status,
        headers,
    )


def _route_path(request: web.Request) -> str:
    """The route template without the /v1 prefix, e.g. "/batches/{id}"."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    return canonical[3:] if canonical.startswith("/v1/") else canonical


# -- middleware -----------------------------------------------------------------------------


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) and crashes, in the API's JSON shapes."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason
        prefix = f"{exc.status}: "
        message = message[len(prefix) :] if message.startswith(prefix) else message
        return error_response(request.path, exc.status, message, headers=_retry_headers(exc))
    except ConnectionResetError:
        # The client went away mid-request (a body cut short). Not an emulator error: the
        # answer most likely reaches nobody, and aiohttp would log a re-raise as a crash.
        logger.debug("client disconnected during %s %s", request.method, request.path)
        return error_response(
            request.path, 400, "the connection closed before the request body ended"
        )
    except Exception:
        logger.exception("error while handling %s %s", request.method, request.path)
        return error_response(
            request.path, 500, "internal emulator error", error_type="server_error"
        )


def _retry_headers(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


@web.middleware
async def _gate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts the call, checks the key, then lets the configured faults strike."""
    context = request.app[_CONTEXT]
    method = request.method
    path = _route_path(request)
    context.stats.requests[(method, path)] += 1
    if context.api_key is not None and not _authorized(request, context.api_key):
        return error_response(
            request.path,
            401,
            "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
            error_type="authentication_error",
            code="invalid_api_key",
        )
    decision = context.faults.decide(method, path)
    if decision.delay > 0:
        await asyncio.sleep(decision.delay)
    if decision.kind is None:
        return await handler(request)
    context.stats.faults_injected[(method, path, decision.kind.value)] += 1
    return await _strike(request, handler, decision, path)


def _authorized(request: web.Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # surrogateescape: header bytes that are not UTF-8 arrive as lone surrogates.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), api_key.encode()
    )


@web.middleware
async def _size_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A declared body over the route's limit is refused at once, before a byte is read."""
    declared = request.content_length
    if declared is not None:
        context = request.app[_CONTEXT]
        is_upload = _route_path(request) == "/files/upload"
        limit = context.max_upload_bytes + _FORM_OVERHEAD if is_upload else MAX_BODY_BYTES
        if declared > limit:
            response = error_response(
                request.path,
                413,
                f"the request body is larger than the limit of {limit:,} bytes",
                code="file_too_large" if is_upload else "request_too_large",
            )
            # The rest of the body is not wanted: no keep-alive after it.
            response.force_close()
            return response
    return await handler(request)


async def _strike(
    request: web.Request, handler: Handler, decision: FaultDecision, path: str
) -> web.StreamResponse:
    kind = decision.kind
    if kind is FaultKind.RATE_LIMIT:
        retry_after = decision.retry_after
        return error_response(
            request.path,
            429,
            "rate limit exceeded (injected fault)",
            error_type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={
                "Retry-After": str(max(0, math.ceil(retry_after))),
                "retry-after-ms": str(int(retry_after * 1000)),
            },
        )
    if kind is FaultKind.ERROR:
        if decision.after_effect:
            await handler(request)
        message = "service unavailable" if decision.status == 503 else "internal server error"
        return error_response(
            request.path, decision.status, f"{message} (injected fault)", error_type="server_error"
        )
    # RESET. A mutating call struck before its effect loses the connection untouched;
    # anything else loses it in the middle of the answer.
    if request.method in MUTATING_METHODS and not decision.after_effect:
        _drop_connection(request)
        return web.Response(status=500)
    if path == "/files/{id}/content":
        request[_RESET_MID_BODY] = True
        return await handler(request)
    response = await handler(request)
    if not isinstance(response, web.Response) or response.body is None:
        _drop_connection(request)
        return response
    body = bytes(response.body)  # type: ignore[arg-type]
    partial = web.StreamResponse(status=response.status, headers=response.headers)
    partial.content_length = len(body)
    await partial.prepare(request)
    await partial.write(body[: len(body) // 2])
    _drop_connection(request)
    return partial


def _drop_connection(request: web.Request) -> None:
    # close(), not abort(): bytes already written still reach the client, then the stream
    # ends early. aiohttp treats the failed write of the rest as a client disconnect.
    transport = request.transport
    if transport is not None:
        transport.close()


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("x-request-id", uuid.uuid4().hex)


# -- files ----------------------------------------------------------------------------------


def _file_type_for(file_name: str, declared: str | None) -> str | None:
    if declared:
        return declared if declared in FILE_TYPES else None
    suffix = file_name.rpartition(".")[2].lower()
    return suffix if suffix in FILE_TYPES else "jsonl"


def _check_file_fields(fields: dict[str, str]) -> tuple[str, str, str] | str:
    """(purpose, file_name, file_type), or a message saying what is wrong."""
    purpose = fields.get("purpose", "")
    file_name = fields.get("file_name", "")
    if not purpose:
        return "purpose is required"
    if purpose not in PURPOSES:
        return f"purpose {purpose!r} is not one of {', '.join(sorted(PURPOSES))}"
    if not file_name:
        return "file_name is required"
    if len(file_name) > 255:
        return "file_name is longer than 255 characters"
    file_type = _file_type_for(file_name, fields.get("file_type") or None)
    if file_type is None:
        return f"file_type must be one of {', '.join(sorted(FILE_TYPES))}"
    return purpose, file_name, file_type


# -- multipart/form-data, read strictly ----------------------------------------------------
#
# Anything malformed in a form body is the client's fault and answers 400 in the API's error
# shape, never a 500 (which clients retry): aiohttp's multipart reader signals it with
# ValueError (no or bad boundary, a body ending before the closing boundary), LookupError
# (an unknown charset) and HttpProcessingError (part headers that do not parse).
_MALFORMED_FORM = (ValueError, LookupError, HttpProcessingError)
# aiohttp warns about a Content-Disposition it cannot parse (the reader looks at the first
# part's name itself); where warnings are errors, that is a malformed part too.
_BAD_DISPOSITION = (BadContentDispositionHeader, BadContentDispositionParam)
# Content-Transfer-Encoding is deprecated for form-data (RFC 7578 section 4.7); these
# identity values are harmless, any other would mean bytes we store are not the file.
_IDENTITY_TRANSFER_ENCODINGS = frozenset({"", "binary", "7bit", "8bit"})
_BAD_DISPOSITION_MESSAGE = "a form part's Content-Disposition is not a valid form-data header"


@attrs.frozen
class _FormPart:
    """One part of a form: its field name, the filename if it has one, and its reader."""

    name: str
    filename: str | None
    reader: BodyPartReader


def _bad_form(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


def _malformed(exc: Exception) -> web.HTTPBadRequest:
    detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    detail = " ".join(str(detail).split())[:200]
    return _bad_form(f"malformed multipart/form-data body: {detail}")


def _open_form(request: web.Request) -> MultipartReader:
    """The multipart reader of a form-data request; HTTPBadRequest if it cannot be one."""
    if request.content_type != "multipart/form-data":
        raise _bad_form("send multipart/form-data")
    boundary = parse_mimetype(request.headers.get(hdrs.CONTENT_TYPE, "")).parameters.get("boundary")
    if not boundary:
        raise _bad_form("the multipart/form-data Content-Type has no boundary")
    if len(boundary) > _MAX_BOUNDARY:
        raise _bad_form(f"the multipart boundary is longer than {_MAX_BOUNDARY} characters")
    try:
        return MultipartReader(request.headers, request.content)
    except _MALFORMED_FORM as exc:
        raise _malformed(exc) from None


async def _next_part(reader: MultipartReader) -> _FormPart | None:
    """The next part, checked: a form-data disposition, a UTF-8 name, no transfer coding."""
    try:
        part = await reader.next()
    except _BAD_DISPOSITION:
        raise _bad_form(_BAD_DISPOSITION_MESSAGE) from None
    except _MALFORMED_FORM as exc:
        raise _malformed(exc) from None
    if part is None:
        return None
    if not isinstance(part, BodyPartReader):
        raise _bad_form("nested multipart is not supported")
    name, filename = _disposition(part.headers.get(hdrs.CONTENT_DISPOSITION))
    transfer = part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING, "").strip().lower()
    if transfer not in _IDENTITY_TRANSFER_ENCODINGS:
        raise _bad_form(f"form part {name!r}: Content-Transfer-Encoding is not supported")
    if part.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() != "identity":
        raise _bad_form(f"form part {name!r}: Content-Encoding is not supported")
    return _FormPart(name=name, filename=filename, reader=part)


def _disposition(header: str | None) -> tuple[str, str | None]:
    """(name, filename) of a part's Content-Disposition; HTTPBadRequest unless it is sound."""
    if not header:
        raise _bad_form("a form part has no Content-Disposition header")
    # aiohttp reports a header it cannot parse with a warning and parses it as absent; here it
    # is an error. No await inside, so the global warning filters are not held across a
    # suspension point.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        disposition, params = parse_content_disposition(header)
    bad = [warning for warning in caught if issubclass(warning.category, _BAD_DISPOSITION)]
    if bad or disposition != "form-data":
        raise _bad_form(_BAD_DISPOSITION_MESSAGE)
    name = params.get("name")
    if not name:
        raise _bad_form("a form part has no name")
    filename = content_disposition_filename(params, "filename")
    if not _is_utf8(name) or (filename is not None and not _is_utf8(filename)):
        raise _bad_form("a form part's name or filename is not valid UTF-8")
    return name, filename


def _is_utf8(text: str) -> bool:
    # Header bytes that are not UTF-8 arrive as lone surrogates (surrogateescape).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_chunk(part: BodyPartReader, size: int) -> bytes:
    try:
        return await part.read_chunk(size)
    except _MALFORMED_FORM as exc:
        raise _malformed(exc) from None


async def _read_field(part: BodyPartReader) -> str | None:
    """A field's value as text, or None when it is longer than _MAX_FORM_FIELD bytes."""
    data = bytearray()
    while chunk := await _read_chunk(part, _MAX_FORM_FIELD):
        data += chunk
        if len(data) > _MAX_FORM_FIELD:
            return None
    return data.decode("utf-8", "replace")


async def _read_fields(request: web.Request) -> dict[str, str]:
    """The text fields of a form (urlencoded or multipart); file parts are read and dropped."""
    if request.content_type != "multipart/form-data":
        try:
            form = await request.post()
        except _MALFORMED_FORM as exc:
            raise _bad_form(f"malformed form body: {' '.join(str(exc).split())[:200]}") from None
        return {key: value for key, value in form.items() if isinstance(value, str)}
    reader = _open_form(request)
    fields: dict[str, str] = {}
    received = 0
    while (part := await _next_part(reader)) is not None:
        if part.filename is not None:
            # This route registers a file; its bytes go to the upload URL, not here.
            while chunk := await _read_chunk(part.reader, 256 * 1024):
                received += len(chunk)
                if received > MAX_BODY_BYTES:
                    raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, received)
            continue
        value = await _read_field(part.reader)
        if value is None:
            raise _bad_form(f"form field {part.name} too long")
        fields[part.name] = value
        if len(fields) > _MAX_FORM_FIELDS:
            raise _bad_form(f"more than {_MAX_FORM_FIELDS} form fields")
    return fields


async def create_upload(request: web.Request) -> web.StreamResponse:
    """POST /files: register a file and redirect the client to the storage URL (302)."""
    context = request.app[_CONTEXT]
    fields = await _read_fields(request)
    checked = _check_file_fields(fields)
    if isinstance(checked, str):
        return error_response(request.path, 400, checked)
    purpose, file_name, file_type = checked
    checksum = fields.get("checksum") or None
    if checksum is not None:
        existing = await context.storage.find_duplicate(checksum, purpose)
        if existing is not None:
            return _json(
                {
                    "file_id": existing,
                    "error": {
                        "message": f"a file with this checksum already exists: {existing}",
                        "type": "file_already_exists",
                        "param": "checksum",
                        "code": "file_already_exists",
                    },
                },
                409,
            )
    record = await context.storage.create_pending_file(
        filename=file_name, purpose=purpose, file_type=file_type, checksum=checksum
    )
    host = request.url.host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    location = f"http://{host}:{context.storage_port}/upload/{record.upload_token}"
    return web.Response(status=302, headers={"Location": location, "X-Together-File-Id": record.id})


async def preprocess_file(request: web.Request) -> web.StreamResponse:
    """POST /files/{id}/preprocess: finish the presigned upload; answers the FileResponse."""
    context = request.app[_CONTEXT]
    file_id = request.match_info["id"]
    record = await context.storage.get_file(file_id) if is_file_id(file_id) else None
    if record is None:
        return error_response(request.path, 404, f"file {file_id} not found", code="not_found")
    if record.state == "pending":
        return error_response(
            request.path, 400, f"file {file_id} has no content yet: PUT it to the upload URL"
        )
    processed = await context.storage.mark_processed(file_id)
    if processed is None:
        return error_response(request.path, 404, f"file {file_id} not found", code="not_found")
    return _json(file_to_wire(processed))


async def upload_multipart(request: web.Request) -> web.StreamResponse:
    """POST /files/upload: one multipart request with the fields and the file (streamed)."""
    context = request.app[_CONTEXT]
    reader = _open_form(request)
    fields: dict[str, str] = {}
    sink: UploadSink | None = None
    try:
        # A malformed body raises HTTPBadRequest out of here; `finally` drops the partial file.
        while (part := await _next_part(reader)) is not None:
            if part.name == "file":
                if sink is not None:
                    return error_response(request.path, 400, "more than one file part")
                sink = UploadSink(context.storage.incoming_path())
                await sink.open()
                fields.setdefault("file_name", part.filename or "")
                while chunk := await _read_chunk(part.reader, 256 * 1024):
                    await sink.write(chunk)
                    if sink.size > context.max_upload_bytes:
                        return _too_large(request, context.max_upload_bytes)
            else:
                value = await _read_field(part.reader)
                if value is None:
                    return error_response(request.path, 400, f"form field {part.name} too long")
                fields[part.name] = value
                if len(fields) > _MAX_FORM_FIELDS:
                    return error_response(
                        request.path, 400, f"more than {_MAX_FORM_FIELDS} form fields"
                    )
        if sink is None:
            return error_response(request.path, 400, "the form has no file part")
        checked = _check_file_fields(fields)
        if isinstance(checked, str):
            return error_response(request.path, 400, checked)
        purpose, file_name, file_type = checked
        size, digest = await sink.finish()
        file_id = new_file_id()
        await asyncio.to_thread(_move, sink.path, context.storage.body_path(file_id))
        sink = None
        record = await context.storage.add_file(
            file_id=file_id,
            filename=file_name,
            purpose=purpose,
            file_type=file_type,
            size=size,
            checksum=digest,
        )
        return _json(file_to_wire(record))
    finally:
        if sink is not None:
            await sink.discard()


def _move(source: Path, target: Path) -> None:
    os.replace(source, target)


def _too_large(request: web.Request, limit: int) -> web.Response:
    return error_response(
        request.path,
        413,
        f"the file is larger than the limit of {limit:,} bytes",
        code="file_too_large",
    )


async def list_files(request: web.Request) -> web.StreamResponse:
    """GET /files: `{"data": [FileResponse, ...]}`."""
    records = await request.app[_CONTEXT].storage.list_files()
    return _json({"object": "list", "data": [file_to_wire(record) for record in records]})


async def _visible_file(request: web.Request) -> FileRecord | None:
    file_id = request.match_info["id"]
    if not is_file_id(file_id):
        return None
    record = await request.app[_CONTEXT].storage.get_file(file_id)
    return None if record is None or record.state == "pending" else record


async def retrieve_file(request: web.Request) -> web.StreamResponse:
    """GET /files/{id}: the FileResponse."""
    record = await _visible_file(request)
    if record is None:
        return _file_not_found(request)
    return _json(file_to_wire(record))


def _file_not_found(request: web.Request) -> web.Response:
    return error_response(
        request.path, 404, f"file {request.match_info['id']} not found", code="not_found"
    )


async def delete_file(request: web.Request) -> web.StreamResponse:
    """DELETE /files/{id}: `{"id", "deleted": true}`."""
    file_id = request.match_info["id"]
    if not is_file_id(file_id) or not await request.app[_CONTEXT].storage.delete_file(file_id):
        return _file_not_found(request)
    return _json({"id": file_id, "deleted": True})


_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)", re.IGNORECASE)
# Positions beyond any file; longer digit strings are read as this (int() of thousands of
# digits is refused by Python, and such a position is past the end either way).
_FAR = 10**18
UNSATISFIABLE: Literal["unsatisfiable"] = "unsatisfiable"


def _position(digits: str) -> int:
    return int(digits) if len(digits) < 18 else _FAR


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The byte range `(start, end)` (end exclusive) a Range header asks of `size` bytes.

    None: no Range, or one to ignore. RFC 9110 section 14.2 lets a server ignore a Range, so
    one that is not `bytes`, not a single range (several would need multipart/byteranges),
    has no positions, or ends before it starts, gets the whole file with 200 (which a client
    tells from a 206) rather than an error for what it could not have meant.
    UNSATISFIABLE: a sound range that starts at or past the end, or an empty suffix: 416.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        if not last:
            return None
        suffix = _position(last)
        if suffix == 0:
            return UNSATISFIABLE
        # The suffix of an empty file has no bytes to cut: the (empty) whole is sent.
        return (max(0, size - suffix), size) if size > 0 else None
    start = _position(first)
    if last and _position(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    end = min(size, _position(last) + 1) if last else size
    return start, end


async def file_content(request: web.Request) -> web.StreamResponse:
    """GET /files/{id}/content: the raw bytes, streamed from disk; one Range (`bytes=N-`,
    `bytes=N-M`, `bytes=-N`) answers 206, see `parse_range` for the others."""
    record = await _visible_file(request)
    if record is None:
        return _file_not_found(request)
    size = record.bytes
    start, end = 0, size  # end is exclusive
    status = 200
    wanted = parse_range(request.headers.get("Range"), size)
    if wanted == UNSATISFIABLE:
        return web.Response(
            status=416,
            headers={"Content-Range": f"bytes */{size}"},
            content_type="application/json",
            body=orjson.dumps(
                {
                    "error": {
                        "message": f"range not satisfiable: the file has {size} bytes",
                        "type": "invalid_request_error",
                        "param": "Range",
                        "code": None,
                    }
                }
            ),
        )
    if isinstance(wanted, tuple):
        start, end = wanted
        status = 206
    path = request.app[_CONTEXT].storage.body_path(record.id)
    try:
        handle: BinaryIO = await in_thread(path.open, "rb", on_abandon=_close_file)
    except FileNotFoundError:
        return _file_not_found(request)
    try:
        response = web.StreamResponse(status=status)
        response.content_type = (
            "text/plain" if record.file_type != "parquet" else "application/octet-stream"
        )
        response.content_length = end - start
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["ETag"] = f'"{record.id}-{size}"'
        response.headers["Content-Disposition"] = (
            f'attachment; filename="{_safe_name(record.filename)}"'
        )
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await response.prepare(request)
        stop = start + (end - start) // 2 if request.get(_RESET_MID_BODY) else end
        position = start
        await in_thread(handle.seek, start)
        while position < stop:
            chunk = await in_thread(handle.read, min(IO_CHUNK, stop - position))
            if not chunk:
                break
            await response.write(chunk)
            position += len(chunk)
        if stop < end:
            _drop_connection(request)
            return response
        await response.write_eof()
        return response
    finally:
        await in_thread(handle.close)


def _close_file(handle: BinaryIO) -> None:
    handle.close()


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]
    return cleaned or "file"


# -- batches --------------------------------------------------------------------------------


def _batch_error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


async def create_batch(request: web.Request) -> web.StreamResponse:
    """POST /batches: create a job (201 `{"job": ..., "warning"?: ...}`) and start running it."""
    context = request.app[_CONTEXT]
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _batch_error(400, "the request body is not valid JSON")
    if not isinstance(payload, dict):
        return _batch_error(400, "the request body must be a JSON object")
    input_file_id = payload.get("input_file_id")
    endpoint = payload.get("endpoint")
    window = payload.get("completion_window", "24h")
    priority = payload.get("priority")
    model_id = payload.get("model_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        return _batch_error(400, "input_file_id is required")
    if not isinstance(endpoint, str) or not endpoint:
        return _batch_error(400, "endpoint is required")
    if endpoint not in SUPPORTED_ENDPOINTS:
        return _batch_error(
            400,
            f"endpoint {endpoint!r} is not supported; use one of {', '.join(SUPPORTED_ENDPOINTS)}",
        )
    if not isinstance(window, str):
        return _batch_error(400, 'completion_window must be a string such as "24h"')
    try:
        parse_completion_window(window)
    except ValueError as exc:
        return _batch_error(400, str(exc))
    if priority is not None and (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or priority not in _PRIORITY_RANGE
    ):
        return _batch_error(400, "priority must be an integer (signed 64-bit)")
    if model_id is not None and not isinstance(model_id, str):
        return _batch_error(400, "model_id must be a string")
    record = await context.storage.get_file(input_file_id) if is_file_id(input_file_id) else None
    if record is None or record.state == "pending":
        return _batch_error(400, f"input file {input_file_id} not found")
    if record.purpose != "batch-api":
        return _batch_error(
            400,
            f"input file {input_file_id} has purpose {record.purpose!r}; upload it with "
            "purpose 'batch-api'",
        )
    now = time.time()
    job = JobRecord(
        id=new_job_id(),
        user_id=USER_ID,
        input_file_id=input_file_id,
        file_size_bytes=record.bytes,
        status="VALIDATING",
        endpoint=endpoint,
        model_id=model_id or None,
        completion_window=window,
        priority=priority,
        created_at=now,
        job_deadline=context.runner.deadline_for(now, window),
    )
    await context.storage.insert_job(job)
    context.stats.jobs_created[input_file_id] += 1
    context.runner.launch(job.id)
    answer: dict[str, Any] = {"job": job_to_wire(job)}
    if window.strip().lower() != "24h":
        answer["warning"] = (
            f"completion_window {window!r} is best effort; jobs are scheduled within 24h"
        )
    return _json(answer, 201)


async def list_batches(request: web.Request) -> web.StreamResponse:
    """GET /batches: a bare array of jobs, newest first, unpaginated."""
    jobs = await request.app[_CONTEXT].storage.list_jobs()
    return _json([job_to_wire(job) for job in jobs])


async def _job_or_404(request: web.Request) -> JobRecord | web.Response:
    job_id = request.match_info["id"]
    job = await request.app[_CONTEXT].storage.get_job(job_id) if is_job_id(job_id) else None
    if job is None:
        return _batch_error(404, f"batch job {job_id} not found")
    return job


async def retrieve_batch(request: web.Request) -> web.StreamResponse:
    """GET /batches/{id}: the bare job."""
    job = await _job_or_404(request)
    return job if isinstance(job, web.Response) else _json(job_to_wire(job))


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    """POST /batches/{id}/cancel: stop a VALIDATING or IN_PROGRESS job; finished rows stay."""
    context = request.app[_CONTEXT]
    job = await _job_or_404(request)
    if isinstance(job, web.Response):
        return job
    if job.status not in CANCELLABLE:
        return _batch_error(
            400, f"batch job {job.id} is {job.status} and can no longer be cancelled"
        )
    cancelled = await context.runner.cancel(job.id, wait=_CANCEL_WAIT)
    return _json(job_to_wire(cancelled or job))


# -- storage port ---------------------------------------------------------------------------


def _storage_error(status: int, code: str, message: str) -> web.Response:
    # Object stores answer in XML; a short one keeps clients' error messages readable.
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml")


async def storage_put(request: web.Request) -> web.StreamResponse:
    """PUT /upload/{token}: the presigned upload; the body goes to disk as it arrives."""
    context = request.app[_CONTEXT]
    context.stats.requests[("PUT", _UPLOAD_ROUTE)] += 1
    if "Authorization" in request.headers:
        context.stats.storage_authorization_headers += 1
    record = await context.storage.file_for_token(request.match_info["token"])
    if record is None:
        return _storage_error(403, "AccessDenied", "unknown or expired upload URL")
    expected = request.content_length
    if expected is None:
        return _storage_error(411, "MissingContentLength", "send Content-Length")
    if expected > context.max_upload_bytes:
        return _storage_error(
            413,
            "EntityTooLarge",
            f"the body is larger than the limit of {context.max_upload_bytes} bytes",
        )
    sink: UploadSink | None = UploadSink(context.storage.incoming_path())
    assert sink is not None
    try:
        await sink.open()
        async for chunk in request.content.iter_chunked(256 * 1024):
            await sink.write(chunk)
            if sink.size > expected:
                return _storage_error(400, "IncompleteBody", "more bytes than Content-Length")
        if sink.size != expected:
            return _storage_error(400, "IncompleteBody", "fewer bytes than Content-Length")
        size, digest = await sink.finish()
        checksum = record.checksum
        if checksum is not None and _SHA256_HEX.fullmatch(checksum) and checksum != digest:
            return _storage_error(400, "BadDigest", "the body does not match the sha256 checksum")
        await context.storage.finish_upload(record.id, sink.path, size)
        sink = None
        return web.Response(status=200, headers={"ETag": f'"{digest}"'})
    finally:
        if sink is not None:
            await sink.discard()


# -- apps -----------------------------------------------------------------------------------


def build_api_app(context: AppContext) -> web.Application:
    """The API app: files and batches under /v1."""
    app = web.Application(
        middlewares=[_errors_middleware, _gate_middleware, _size_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[_CONTEXT] = context
    app.on_response_prepare.append(_add_request_id)
    app.add_routes(
        [
            web.post("/v1/files", create_upload),
            web.get("/v1/files", list_files),
            web.post("/v1/files/upload", upload_multipart),
            web.get("/v1/files/{id}", retrieve_file),
            web.delete("/v1/files/{id}", delete_file),
            web.post("/v1/files/{id}/preprocess", preprocess_file),
            web.get("/v1/files/{id}/content", file_content),
            web.post("/v1/batches", create_batch),
            web.get("/v1/batches", list_batches),
            web.get("/v1/batches/{id}", retrieve_batch),
            web.post("/v1/batches/{id}/cancel", cancel_batch),
        ]
    )
    return app


def build_storage_app(context: AppContext) -> web.Application:
    """The storage app: the presigned PUT route, on its own port (another origin)."""
    # No request size limit here: the handler streams and enforces max_upload_bytes itself.
    app = web.Application(client_max_size=0)
    app[_CONTEXT] = context
    app.add_routes([web.put(_UPLOAD_ROUTE, storage_put)])
    return app
