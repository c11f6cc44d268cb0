"""Talking to the emulator with plain aiohttp in tests: the upload flow, jobs, result rows,
and batch input lines. The fixtures that build on these (`emulator`, `api`) are in conftest.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import yaml

EMULATOR_KEY = "emulator-test-key"
CHAT = "/v1/chat/completions"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"})


def chat_line(custom_id: str, text: str = "hello there", **body: Any) -> dict[str, Any]:
    """One chat request line of a batch input file, as a dict."""
    request_body = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    request_body.update(body)
    return {"custom_id": custom_id, "body": request_body}


def jsonl(rows: Iterable[Any]) -> bytes:
    """Rows as JSON Lines bytes (with a final newline)."""
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def chat_file(count: int, *, prefix: str = "request") -> bytes:
    """A valid chat batch file of `count` requests with ids `<prefix>-0`, `<prefix>-1`, ..."""
    return jsonl(chat_line(f"{prefix}-{i}", f"message number {i}") for i in range(count))


class RawAPI:
    """The emulator's API through a bare aiohttp session (no client library involved)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def start_upload(
        self,
        data: bytes,
        *,
        purpose: str = "batch-api",
        file_name: str = "batch.jsonl",
        checksum: str | None = None,
    ) -> aiohttp.ClientResponse:
        """POST /files (the first step of the presigned flow); the response is read already."""
        form = {
            "purpose": purpose,
            "file_name": file_name,
            "file_type": "jsonl",
            "checksum": checksum if checksum is not None else hashlib.sha256(data).hexdigest(),
        }
        async with self.session.post(
            f"{self.base_url}/files", data=form, allow_redirects=False
        ) as response:
            await response.read()
            return response

    async def put(self, location: str, data: bytes, **headers: str) -> aiohttp.ClientResponse:
        """PUT to a storage URL, with a separate session (no Authorization header)."""
        async with (
            aiohttp.ClientSession() as storage,
            storage.put(location, data=io.BytesIO(data), headers=headers) as response,
        ):
            await response.read()
            return response

    async def upload(
        self, data: bytes, *, purpose: str = "batch-api", file_name: str = "batch.jsonl"
    ) -> dict[str, Any]:
        """The whole presigned upload; returns the FileResponse of the preprocess call."""
        response = await self.start_upload(data, purpose=purpose, file_name=file_name)
        assert response.status == 302, response.status
        put = await self.put(response.headers["Location"], data)
        assert put.status == 200, put.status
        file_id = response.headers["X-Together-File-Id"]
        return await self.json("POST", f"/files/{file_id}/preprocess")

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Any API call: (status, decoded JSON body or None)."""
        async with self.session.request(method, f"{self.base_url}{path}", **kwargs) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """An API call that must answer 2xx; its JSON body."""
        status, body = await self.call(method, path, **kwargs)
        assert 200 <= status < 300, (status, body)
        return body

    async def create_batch(self, file_id: str, endpoint: str = CHAT, **extra: Any) -> Any:
        """POST /batches; the job (unwrapped)."""
        answer = await self.json(
            "POST", "/batches", json={"input_file_id": file_id, "endpoint": endpoint, **extra}
        )
        return answer["job"]

    async def submit(self, data: bytes, endpoint: str = CHAT, **extra: Any) -> Any:
        """Upload `data` and create a batch on it; the job."""
        uploaded = await self.upload(data)
        return await self.create_batch(uploaded["id"], endpoint, **extra)

    async def wait_for(self, job_id: str, *statuses: str, timeout: float = 30.0) -> Any:
        """Poll the job until its status is one of `statuses` (default: terminal)."""
        wanted = frozenset(statuses) if statuses else TERMINAL
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await self.json("GET", f"/batches/{job_id}")
            if job["status"] in wanted:
                return job
            assert job["status"] not in TERMINAL, job
            assert loop.time() < deadline, f"job still {job['status']} after {timeout} s"
            await asyncio.sleep(0.01)

    async def content(self, file_id: str, **headers: str) -> bytes:
        """GET /files/{id}/content, whole."""
        async with self.session.get(
            f"{self.base_url}/files/{file_id}/content", headers=headers
        ) as response:
            assert response.status in (200, 206), response.status
            return await response.read()

    async def rows(self, file_id: str | None) -> list[Any]:
        """The decoded lines of a result file (none for a missing file id)."""
        if file_id is None:
            return []
        return [orjson.loads(line) for line in (await self.content(file_id)).splitlines()]


# -- the OpenAPI subset ---------------------------------------------------------------------------

SPEC_PATH = Path(__file__).parent / "data" / "together-openapi-files-batches.yaml"


def _honour_nullable(node: Any) -> Any:
    """The spec says 3.1 but marks some fields with 3.0's `nullable: true`: read it as
    `type: [<type>, "null"]`, as its authors meant."""
    if isinstance(node, dict):
        node = {key: _honour_nullable(value) for key, value in node.items()}
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [_honour_nullable(item) for item in node]
    return node


# Read once at import, outside any event loop.
SPEC: dict[str, Any] = _honour_nullable(yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")))


def spec_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The JSON schema the spec gives for a response, e.g. ("get", "/batches/{id}", 200)."""
    responses = SPEC["paths"][path][method.lower()]["responses"]
    content = responses[str(status)]["content"]
    return dict(content["application/json"]["schema"])


def component(name: str) -> dict[str, Any]:
    """A reference to one of the spec's schemas, e.g. component("BatchJob")."""
    return {"$ref": f"#/components/schemas/{name}"}


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Why `instance` does not match `schema` (formats such as uuid and date-time checked)."""
    validator = jsonschema.Draft202012Validator(
        {**schema, "components": SPEC["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]
