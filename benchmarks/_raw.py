"""The "limit" contenders: the client's wire work, written by hand on bare aiohttp + orjson.

Nothing here retries, validates or builds models; it is the floor a client library can approach.
The upload flow is the one both official SDKs use (POST /files -> 302 to storage, streaming PUT,
POST /files/{id}/preprocess), as described in docs/architecture.md and the API reference.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

CHUNK = 1024 * 1024


def auth_headers(api_key: str) -> dict[str, str]:
    """The headers every call to the API host carries."""
    return {"Authorization": f"Bearer {api_key}"}


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def upload_file(
    session: aiohttp.ClientSession,
    base_url: str,
    api_key: str,
    path: Path,
    *,
    purpose: str = "batch-api",
    checksum: bool = True,
) -> dict[str, Any]:
    """Upload `path` through the presigned flow and return the FileResponse as a dict.

    The body is streamed from disk by aiohttp's file payload (its reads run in a worker thread);
    the checksum, like the client's, is computed in a worker thread before the first request.
    """
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file_name", path.name)
    form.add_field("file_type", "jsonl")
    if checksum:
        form.add_field("checksum", await asyncio.to_thread(_sha256_of, path))
    headers = auth_headers(api_key)
    async with session.post(
        f"{base_url}/files", data=form, headers=headers, allow_redirects=False
    ) as response:
        if response.status == 409:
            file_id = orjson.loads(await response.read())["file_id"]
            async with session.get(f"{base_url}/files/{file_id}", headers=headers) as existing:
                existing.raise_for_status()
                result: dict[str, Any] = orjson.loads(await existing.read())
                return result
        if response.status not in (301, 302, 303, 307, 308):
            raise RuntimeError(f"POST /files answered {response.status}: {await response.text()}")
        location = response.headers["Location"]
        file_id = response.headers["X-Together-File-Id"]
    with path.open("rb") as body:
        size = os.fstat(body.fileno()).st_size
        length = {"Content-Length": str(size)}
        async with session.put(location, data=body, headers=length) as stored:
            stored.raise_for_status()
    async with session.post(f"{base_url}/files/{file_id}/preprocess", headers=headers) as done:
        done.raise_for_status()
        result = orjson.loads(await done.read())
        return result


async def create_batch(
    session: aiohttp.ClientSession, base_url: str, api_key: str, file_id: str, endpoint: str
) -> dict[str, Any]:
    """POST /batches and unwrap the job."""
    async with session.post(
        f"{base_url}/batches",
        data=orjson.dumps({"input_file_id": file_id, "endpoint": endpoint}),
        headers={**auth_headers(api_key), "Content-Type": "application/json"},
    ) as response:
        response.raise_for_status()
        answer = orjson.loads(await response.read())
        job: dict[str, Any] = answer.get("job", answer)
        return job


async def get_json(session: aiohttp.ClientSession, url: str, api_key: str) -> Any:
    """GET a JSON document and decode it with orjson."""
    async with session.get(url, headers=auth_headers(api_key)) as response:
        response.raise_for_status()
        return orjson.loads(await response.read())


async def iter_content_lines(
    session: aiohttp.ClientSession, base_url: str, api_key: str, file_id: str
) -> AsyncIterator[bytes]:
    """The lines of a stored file, streamed (no line kept longer than it takes to yield it)."""
    async with session.get(
        f"{base_url}/files/{file_id}/content", headers=auth_headers(api_key)
    ) as response:
        response.raise_for_status()
        pending = b""
        async for chunk in response.content.iter_chunked(CHUNK):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line:
                    yield line
        if pending:
            yield pending
