"""Small building blocks for tests that stand up their own aiohttp.web servers: a request
recorder and JSON shapes of the API's objects. The fixtures that use them are in conftest.py."""

from __future__ import annotations

from typing import Any

import attrs
from aiohttp import web

SECRET_KEY = "sk-test-0123456789-SECRET"


@attrs.frozen
class SeenRequest:
    """What a fake server saw of one request."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@attrs.define
class Recorder:
    """Collects the requests a fake server received, in order."""

    requests: list[SeenRequest] = attrs.field(factory=list)

    def record(self, request: web.Request, body: bytes = b"") -> SeenRequest:
        seen = SeenRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=dict(request.headers),
            body=body,
        )
        self.requests.append(seen)
        return seen

    def paths(self) -> list[str]:
        return [f"{seen.method} {seen.path}" for seen in self.requests]


def job_json(job_id: str, **fields: Any) -> dict[str, Any]:
    """A BatchJob as the API spells it (uppercase status, ISO timestamps)."""
    job: dict[str, Any] = {
        "id": job_id,
        "user_id": "u1",
        "input_file_id": "file-in",
        "endpoint": "/v1/chat/completions",
        "status": "VALIDATING",
        "created_at": "2030-01-01T00:00:00Z",
        "progress": 0,
    }
    job.update(fields)
    return job


def file_json(file_id: str, **fields: Any) -> dict[str, Any]:
    """A FileResponse as the API spells it (capitalised FileType / Processed)."""
    data: dict[str, Any] = {
        "id": file_id,
        "object": "file",
        "created_at": 1_700_000_000,
        "filename": "batch.jsonl",
        "bytes": 10,
        "purpose": "batch-api",
        "FileType": "jsonl",
        "Processed": True,
    }
    data.update(fields)
    return data


def batch_lines(count: int) -> bytes:
    """A valid chat batch input file of `count` lines."""
    return b"".join(
        b'{"custom_id": "r%d", "body": {"model": "m", "messages": '
        b'[{"role": "user", "content": "hi %d"}]}}\n' % (i, i)
        for i in range(count)
    )


class FakeFiles:
    """A files API on one server and a storage host on another, each behaviour switchable.

    `upload_mode`: "presigned" (302 to storage), "exists" (409 with a file id), "direct"
    (200 with the file object), "missing" (404, so the client falls back to /files/upload).
    Storage answers `storage_failures` 503s first; `storage_redirects` maps a path to the
    Location it redirects to. Content downloads honour Range; `drop_after` cuts the first
    `len(drop_after)` downloads after that many bytes; `ignore_range` answers 200 to a Range;
    `content_failures` 503s come before any content.
    """

    def __init__(self) -> None:
        self.api = Recorder()
        self.storage = Recorder()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.upload_mode = "presigned"
        self.storage_failures = 0
        self.storage_status = 503
        self.storage_redirects: dict[str, str] = {}
        self.storage_url = ""
        self.location_override: str | None = None
        self.drop_after: list[int] = []
        self.ignore_range = False
        self.content_failures = 0
        self.forms: list[dict[str, Any]] = []
        self.api_server: Any = None  # the TestServer of api_app(), set by the fixture
        self._next_id = 0

    def add_file(self, content: bytes, **fields: Any) -> str:
        self._next_id += 1
        file_id = f"file-{self._next_id}"
        self.files[file_id] = file_json(file_id, bytes=len(content), **fields)
        self.contents[file_id] = content
        return file_id

    def api_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/files", self._create)
        app.router.add_post("/v1/files/upload", self._multipart_upload)
        app.router.add_get("/v1/files", self._list)
        app.router.add_get("/v1/files/{id}", self._retrieve)
        app.router.add_delete("/v1/files/{id}", self._delete)
        app.router.add_post("/v1/files/{id}/preprocess", self._preprocess)
        app.router.add_get("/v1/files/{id}/content", self._content)
        return app

    def storage_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_put("/{tail:.*}", self._put)
        return app

    async def _create(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post())
        self.api.record(request)
        self.forms.append(form)
        if self.upload_mode == "exists":
            existing = self.add_file(b"{}\n")
            # The form says nothing of the size, so the fake's file does not claim one either
            # (a size that differs from the upload's is an error the client reports).
            del self.files[existing]["bytes"]
            return web.json_response({"file_id": existing}, status=409)
        if self.upload_mode == "missing":
            return web.json_response({"error": "not found"}, status=404)
        file_id = self.add_file(b"", filename=form.get("file_name"), Processed=False)
        if self.upload_mode == "direct":
            del self.files[file_id]["bytes"]  # as for "exists": the fake cannot know it
            return web.json_response(self.files[file_id])
        location = self.location_override or f"{self.storage_url}/upload/{file_id}?sig=S3CRET"
        return web.Response(
            status=302, headers={"Location": location, "X-Together-File-Id": file_id}
        )

    async def _put(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.storage.record(request, body)
        if self.storage_failures > 0:
            self.storage_failures -= 1
            return web.json_response({"error": "storage busy"}, status=self.storage_status)
        if request.path in self.storage_redirects:
            raise web.HTTPTemporaryRedirect(self.storage_redirects[request.path])
        file_id = request.path.rsplit("/", 1)[-1]
        if file_id in self.files:
            self.contents[file_id] = body
            self.files[file_id]["bytes"] = len(body)
        return web.Response(status=200)

    async def _multipart_upload(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        self.api.record(request)
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        content = upload.file.read()
        self.forms.append(dict(form))
        file_id = self.add_file(content, filename=str(form.get("file_name")))
        return web.json_response(self.files[file_id])

    async def _preprocess(self, request: web.Request) -> web.StreamResponse:
        self.api.record(request)
        file_id = request.match_info["id"]
        self.files[file_id]["Processed"] = True
        return web.json_response(self.files[file_id])

    async def _list(self, request: web.Request) -> web.StreamResponse:
        self.api.record(request)
        return web.json_response({"data": list(self.files.values())})

    async def _retrieve(self, request: web.Request) -> web.StreamResponse:
        self.api.record(request)
        file_id = request.match_info["id"]
        if file_id not in self.files:
            return web.json_response({"error": {"message": "file not found"}}, status=404)
        return web.json_response(self.files[file_id])

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        self.api.record(request)
        file_id = request.match_info["id"]
        self.files.pop(file_id, None)
        return web.json_response({"id": file_id, "deleted": True})

    async def _content(self, request: web.Request) -> web.StreamResponse:
        self.api.record(request)
        file_id = request.match_info["id"]
        if file_id not in self.contents:
            return web.json_response({"error": "file not found"}, status=404)
        if self.content_failures > 0:
            self.content_failures -= 1
            return web.json_response({"error": "try again"}, status=503)
        content = self.contents[file_id]
        start = 0
        status = 200
        headers = {"Content-Type": "application/octet-stream"}
        range_header = request.headers.get("Range")
        if range_header and not self.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        body = content[start:]
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if self.drop_after:
            cut = self.drop_after.pop(0)
            await response.write(body[:cut])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(body)
        await response.write_eof()
        return response
