"""Every emulator response checked against Together's OpenAPI subset (tests/data), with
formats (uuid, date-time) enforced, in success and error cases and in every job status."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from conftest import MakeEmulator
from emulator_helpers import (
    EMULATOR_KEY,
    SPEC,
    SPEC_PATH,
    RawAPI,
    chat_file,
    chat_line,
    component,
    jsonl,
    schema_errors,
    spec_schema,
)

from together_async.emulator import Emulator, Fault

pytestmark = pytest.mark.timeout(60)

MISSING_JOB = "00000000-0000-4000-8000-000000000000"
# Newer FileResponse fields the current SDK reads but this (older) spec subset lacks.
FILE_EXTRAS = frozenset({"processing_status"})
# A job's request settings, echoed beyond the spec (the seed docs' jobs carry
# completion_window) so a client can tell a lost create's job by them.
JOB_EXTRAS = frozenset({"completion_window", "priority"})


def _check(instance: Any, schema: dict[str, Any]) -> None:
    errors = schema_errors(instance, schema)
    assert not errors, errors


def _check_keys(instance: dict[str, Any], name: str, extras: frozenset[str] = frozenset()) -> None:
    """No key the spec does not know (catches misspellings the schema would let through)."""
    known = set(SPEC["components"]["schemas"][name]["properties"]) | extras
    assert set(instance) <= known, set(instance) - known


async def test_file_responses_match_the_spec(api: RawAPI) -> None:
    """Preprocess, list, retrieve and delete answers validate, with no unknown keys."""
    uploaded = await api.upload(chat_file(2))
    _check(uploaded, component("FileResponse"))
    _check_keys(uploaded, "FileResponse", FILE_EXTRAS)
    listing = await api.json("GET", "/files")
    _check(listing, spec_schema("get", "/files", 200))
    _check(
        await api.json("GET", f"/files/{uploaded['id']}"), spec_schema("get", "/files/{id}", 200)
    )
    deleted = await api.json("DELETE", f"/files/{uploaded['id']}")
    _check(deleted, spec_schema("delete", "/files/{id}", 200))
    _check_keys(deleted, "FileDeleteResponse")


async def test_multipart_upload_matches_the_spec(api: RawAPI) -> None:
    """POST /files/upload: 200 FileResponse, and its 400 in the ErrorData shape."""
    form = aiohttp.FormData()
    form.add_field("purpose", "batch-api")
    form.add_field("file_name", "x.jsonl")
    form.add_field("file", chat_file(1), filename="x.jsonl")
    status, body = await api.call("POST", "/files/upload", data=form)
    assert status == 200
    _check(body, spec_schema("post", "/files/upload", 200))
    bad = aiohttp.FormData()
    bad.add_field("purpose", "batch-api")
    bad.add_field("file", b"{}\n", filename="")
    status, body = await api.call("POST", "/files/upload", data=bad)
    assert status == 400
    _check(body, spec_schema("post", "/files/upload", 400))


async def test_file_content_is_text_plain(api: RawAPI) -> None:
    """GET /files/{id}/content answers the spec's text/plain content type."""
    file_id = (await api.upload(chat_file(1)))["id"]
    async with api.session.get(f"{api.base_url}/files/{file_id}/content") as response:
        assert response.status == 200
        assert (
            response.content_type
            in SPEC["paths"]["/files/{id}/content"]["get"]["responses"]["200"]["content"]
        )


async def test_create_and_list_match_the_spec(api: RawAPI) -> None:
    """POST /batches 201 (BatchJobWithWarning, with and without warning) and GET /batches."""
    file_id = (await api.upload(chat_file(1)))["id"]
    for extra in ({}, {"completion_window": "12h"}):
        status, body = await api.call(
            "POST",
            "/batches",
            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", **extra},
        )
        assert status == 201
        _check(body, spec_schema("post", "/batches", 201))
        _check_keys(body, "BatchJobWithWarning")
        _check_keys(body["job"], "BatchJob", JOB_EXTRAS)
    _check(await api.json("GET", "/batches"), spec_schema("get", "/batches", 200))


async def test_jobs_in_every_terminal_status_match_the_spec(
    make_emulator: MakeEmulator,
) -> None:
    """COMPLETED (with both files), FAILED, CANCELLED and EXPIRED jobs all validate."""
    emulator = await make_emulator(latency=0.01, concurrency=2, time_factor=1e-5)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as session:
        api = RawAPI(session, emulator.base_url)
        expired = await api.wait_for((await api.submit(chat_file(300)))["id"])
        assert expired["status"] == "EXPIRED"
    quick = await make_emulator(latency=0.01, concurrency=2)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as session:
        api = RawAPI(session, quick.base_url)
        mixed = jsonl([chat_line("ok"), {"custom_id": "bad", "body": {}}])
        completed = await api.wait_for((await api.submit(mixed))["id"])
        assert "output_file_id" in completed and "error_file_id" in completed
        failed = await api.wait_for((await api.submit(b"not json\n"))["id"])
        assert failed["status"] == "FAILED"
        running = await api.submit(chat_file(300))
        cancelled = await api.json("POST", f"/batches/{running['id']}/cancel")
        assert cancelled["status"] == "CANCELLED"
        _check(cancelled, spec_schema("post", "/batches/{id}/cancel", 200))
        for job in (expired, completed, failed, cancelled):
            _check(job, spec_schema("get", "/batches/{id}", 200))
            _check_keys(job, "BatchJob", JOB_EXTRAS)
        _check(await api.json("GET", "/batches"), spec_schema("get", "/batches", 200))


@pytest.mark.parametrize(
    ("method", "path", "spec_path", "status"),
    [
        ("GET", f"/batches/{MISSING_JOB}", "/batches/{id}", 404),
        ("POST", f"/batches/{MISSING_JOB}/cancel", "/batches/{id}/cancel", 404),
        ("POST", "/batches", "/batches", 400),
    ],
)
async def test_batch_errors_match_the_spec(
    api: RawAPI, method: str, path: str, spec_path: str, status: int
) -> None:
    """Batch errors are BatchErrorResponse: {"error": "<string>"}."""
    got, body = await api.call(method, path, json={})
    assert got == status
    _check(body, spec_schema(method, spec_path, status))
    assert isinstance(body["error"], str)


async def test_cancel_of_a_finished_job_matches_the_spec(api: RawAPI) -> None:
    """The 400 of cancelling a COMPLETED job is a BatchErrorResponse."""
    done = await api.wait_for((await api.submit(chat_file(1)))["id"])
    status, body = await api.call("POST", f"/batches/{done['id']}/cancel")
    assert status == 400
    _check(body, spec_schema("post", "/batches/{id}/cancel", 400))


async def test_unauthorized_answers_match_the_spec(emulator: Emulator) -> None:
    """401s: BatchErrorResponse on batch routes, ErrorData on file routes."""
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer wrong"}) as session:
        api = RawAPI(session, emulator.base_url)
        status, body = await api.call("GET", "/batches")
        assert status == 401
        _check(body, spec_schema("get", "/batches", 401))
        status, body = await api.call("POST", "/files/upload", data={"purpose": "batch-api"})
        assert status == 401
        _check(body, spec_schema("post", "/files/upload", 401))


async def test_injected_faults_match_the_spec(emulator: Emulator, api: RawAPI) -> None:
    """Injected 429 and 500 on POST /batches are BatchErrorResponse too."""
    emulator.faults.add(Fault(kind="rate_limit", routes=["POST /batches"], times=1))
    emulator.faults.add(Fault(kind="error", status=500, routes=["POST /batches"], times=1))
    for status in (429, 500):
        got, body = await api.call("POST", "/batches", json={})
        assert got == status
        _check(body, spec_schema("post", "/batches", status))


def test_the_spec_copy_keeps_its_license() -> None:
    """The OpenAPI subset in tests/data names its MIT license, and the license text is there."""
    header = SPEC_PATH.read_text(encoding="utf-8").splitlines()[:4]
    assert any("MIT License" in line for line in header)
    license_text = (SPEC_PATH.parent / "LICENSE-together-openapi.txt").read_text(encoding="utf-8")
    assert "Copyright (c) TogetherAI" in license_text
