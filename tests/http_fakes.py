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
