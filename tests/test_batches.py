"""client.batches over real loopback HTTP: request shapes, the {job, warning} envelope, the
create reconciliation (one call, one job, whatever the connection does), and streamed results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from http_fakes import Recorder, job_json

from together_async import (
    APIConnectionError,
    APIResponseValidationError,
    AsyncTogether,
    BatchEndpoint,
    BatchJob,
    BatchJobStatus,
    InternalServerError,
    InvalidArgumentError,
    RateLimitError,
)

pytestmark = pytest.mark.usefixtures("fast_retries")

Serve = Callable[[web.Application], Awaitable[TestServer]]
MakeClient = Callable[..., AsyncTogether]
CHAT = "/v1/chat/completions"


class FakeBatches:
    """A batches API whose POST /batches follows a script of behaviours, one per request:

    "ok" (201 {job, warning?}), "bare" (201 bare job), "create_then_drop" (makes the job,
    then cuts the connection), "create_then_500", "drop" and "500" (fail without making a
    job), "429". After the script runs out, "ok".
    """

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.create_script: list[str] = []
        self.warning: str | None = None
        self.list_status = 200
        self.posts = 0
        self.server: Any = None  # the TestServer of app(), set by the fixture

    def add_job(self, **fields: Any) -> dict[str, Any]:
        job_id = f"batch-{len(self.jobs) + 1}"
        self.jobs[job_id] = job_json(job_id, **fields)
        return self.jobs[job_id]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._get)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        app.router.add_get("/v1/files/{id}/content", self._content)
        return app

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.recorder.record(request, orjson.dumps(body))
        self.posts += 1
        behaviour = self.create_script.pop(0) if self.create_script else "ok"
        if behaviour == "429":
            return web.json_response({"error": "slow down"}, status=429)
        if behaviour in ("drop", "500"):
            return self._fail(request, behaviour)
        job = self.add_job(
            input_file_id=body["input_file_id"],
            endpoint=body["endpoint"],
            created_at=datetime.now(timezone.utc).isoformat(),
        )
        if behaviour == "create_then_drop":
            return self._fail(request, "drop")
        if behaviour == "create_then_500":
            return self._fail(request, "500")
        if behaviour == "bare":
            return web.json_response(job, status=201)
        envelope: dict[str, Any] = {"job": job}
        if self.warning:
            envelope["warning"] = self.warning
        return web.json_response(envelope, status=201)

    @staticmethod
    def _fail(request: web.Request, how: str) -> web.StreamResponse:
        if how == "500":
            return web.json_response({"error": "internal error"}, status=500)
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def _list(self, request: web.Request) -> web.StreamResponse:
        self.recorder.record(request)
        if self.list_status != 200:
            return web.json_response({"error": "list broken"}, status=self.list_status)
        return web.json_response(list(self.jobs.values()))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.recorder.record(request)
        return web.json_response(self.jobs[request.match_info["id"]])

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self.recorder.record(request)
        job = self.jobs[request.match_info["id"]]
        job["status"] = "CANCELLING"
        return web.json_response(job)

    async def _content(self, request: web.Request) -> web.StreamResponse:
        self.recorder.record(request)
        return web.Response(body=self.contents[request.match_info["id"]])


@pytest.fixture
async def fake(serve: Serve) -> FakeBatches:
    """A fake batches API, running."""
    fake = FakeBatches()
    fake.server = await serve(fake.app())
    return fake


@pytest.fixture
def client(fake: FakeBatches, make_client: MakeClient) -> AsyncTogether:
    """A client pointed at the fake batches API."""
    return make_client(fake.server)


# ---- request shapes -------------------------------------------------------------------------


async def test_create_batch_sends_the_documented_body(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """POST /batches carries input_file_id, endpoint and completion_window as JSON."""
    job = await client.batches.create_batch("file-in", CHAT)
    assert isinstance(job, BatchJob) and job.id == "batch-1"
    [post] = fake.recorder.requests
    assert post.headers["Content-Type"] == "application/json"
    assert orjson.loads(post.body) == {
        "input_file_id": "file-in",
        "endpoint": CHAT,
        "completion_window": "24h",
    }


async def test_optional_fields_are_sent_only_when_set(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """model_id and priority appear only when given; a BatchEndpoint is sent as its path."""
    await client.batches.create_batch(
        "file-in", BatchEndpoint.CHAT_COMPLETIONS, model_id="m-1", priority=2
    )
    body = orjson.loads(fake.recorder.requests[0].body)
    assert body["model_id"] == "m-1" and body["priority"] == 2
    assert body["endpoint"] == CHAT


async def test_create_unwraps_the_job_and_keeps_the_warning(
    fake: FakeBatches, client: AsyncTogether, caplog: pytest.LogCaptureFixture
) -> None:
    """{"job": ..., "warning": ...} gives the job with .warning set, and logs the warning."""
    fake.warning = "model is busy, expect delays"
    with caplog.at_level(logging.WARNING, logger="together_async"):
        job = await client.batches.create_batch("file-in", CHAT)
    assert job.status == "VALIDATING" and job.status is BatchJobStatus.VALIDATING
    assert job.warning == "model is busy, expect delays"
    assert any("model is busy" in record.getMessage() for record in caplog.records)


async def test_create_accepts_a_bare_job(fake: FakeBatches, client: AsyncTogether) -> None:
    """A create answer that is the job itself is accepted too."""
    fake.create_script = ["bare"]
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-1" and job.warning is None


async def test_get_list_cancel(fake: FakeBatches, client: AsyncTogether) -> None:
    """get_batch, list_batches and cancel_batch hit their routes and return jobs."""
    fake.add_job(status="IN_PROGRESS")
    fake.add_job(status="COMPLETED")
    assert (await client.batches.get_batch("batch-1")).status == "IN_PROGRESS"
    assert [job.id for job in await client.batches.list_batches()] == ["batch-1", "batch-2"]
    cancelled = await client.batches.cancel_batch("batch-1")
    assert cancelled.status == BatchJobStatus.CANCELING
    assert fake.recorder.paths() == [
        "GET /v1/batches/batch-1",
        "GET /v1/batches",
        "POST /v1/batches/batch-1/cancel",
    ]


async def test_list_accepts_a_data_envelope(serve: Serve, make_client: MakeClient) -> None:
    """An OpenAI-style {"data": [...]} list is accepted as well as the bare array."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [job_json("b1")]})

    app = web.Application()
    app.router.add_get("/v1/batches", listing)
    client = make_client(await serve(app))
    assert [job.id for job in await client.batches.list_batches()] == ["b1"]


@pytest.mark.parametrize("bad", ["", "  ", None, 5])
async def test_bad_ids_are_refused_before_any_request(
    fake: FakeBatches, client: AsyncTogether, bad: Any
) -> None:
    """Empty or non-string ids raise InvalidArgumentError; nothing is sent."""
    with pytest.raises(InvalidArgumentError):
        await client.batches.get_batch(bad)
    with pytest.raises(InvalidArgumentError):
        await client.batches.cancel_batch(bad)
    with pytest.raises(InvalidArgumentError):
        await client.batches.create_batch(bad, CHAT)
    with pytest.raises(InvalidArgumentError):
        client.batches.results(bad)
    assert fake.recorder.requests == []


async def test_bad_endpoint_is_refused(fake: FakeBatches, client: AsyncTogether) -> None:
    """An empty endpoint raises InvalidArgumentError before any request."""
    with pytest.raises(InvalidArgumentError, match="endpoint"):
        await client.batches.create_batch("file-in", "")
    assert fake.recorder.requests == []


# ---- create reconciliation: one call, one job -----------------------------------------------


async def test_dropped_connection_after_create_yields_that_job(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """The server makes the job then drops the connection: the job is found, not remade."""
    fake.create_script = ["create_then_drop"]
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-1"
    assert len(fake.jobs) == 1 and fake.posts == 1
    assert fake.recorder.paths() == ["POST /v1/batches", "GET /v1/batches"]


async def test_5xx_after_create_yields_that_job(fake: FakeBatches, client: AsyncTogether) -> None:
    """A 500 from a server that did make the job: found by listing, exactly one job."""
    fake.create_script = ["create_then_500"]
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-1"
    assert len(fake.jobs) == 1 and fake.posts == 1


async def test_ambiguous_failure_without_a_job_creates_once(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """A drop before the job existed: listing finds nothing, one new POST makes the job."""
    fake.create_script = ["drop"]
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-1"
    assert len(fake.jobs) == 1
    assert fake.recorder.paths() == ["POST /v1/batches", "GET /v1/batches", "POST /v1/batches"]


async def test_rate_limited_create_is_resent_without_listing(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """A 429 means nothing was made: the POST is simply sent again."""
    fake.create_script = ["429"]
    await client.batches.create_batch("file-in", CHAT)
    assert fake.recorder.paths() == ["POST /v1/batches", "POST /v1/batches"]
    assert len(fake.jobs) == 1


async def test_job_made_by_the_last_attempt_is_found(
    fake: FakeBatches, make_client: MakeClient
) -> None:
    """Retries run out on an attempt that did make the job: a last look finds it."""
    fake.create_script = ["500", "create_then_drop"]
    client = make_client(fake.server, max_retries=1)
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-1"
    assert len(fake.jobs) == 1 and fake.posts == 2


async def test_older_job_on_the_same_file_is_not_mistaken(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """A job on the same file from long before this call is not taken for ours."""
    fake.add_job(input_file_id="file-in", endpoint=CHAT, created_at="2020-01-01T00:00:00Z")
    fake.create_script = ["drop"]
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-2"
    assert len(fake.jobs) == 2


async def test_ignored_recent_job_on_the_same_file_is_not_mistaken(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """A fresh job the caller says is not this call's (same file id) is never returned."""
    now = datetime.now(timezone.utc).isoformat()
    earlier = fake.add_job(input_file_id="file-in", endpoint=CHAT, created_at=now)
    fake.create_script = ["drop"]
    job = await client.batches.create_batch("file-in", CHAT, ignore_jobs={earlier["id"]})
    assert job.id == "batch-2"
    assert len(fake.jobs) == 2


async def test_ignore_jobs_given_as_a_string_is_refused(client: AsyncTogether) -> None:
    """A single id passed as a bare string is a mistake caught before any request."""
    with pytest.raises(InvalidArgumentError, match="ignore_jobs"):
        await client.batches.create_batch("file-in", CHAT, ignore_jobs="batch-1")


async def test_job_on_another_file_or_endpoint_is_not_mistaken(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """Fresh jobs on other files or endpoints do not count as ours."""
    now = datetime.now(timezone.utc).isoformat()
    fake.add_job(input_file_id="file-other", endpoint=CHAT, created_at=now)
    fake.add_job(input_file_id="file-in", endpoint="/v1/embeddings", created_at=now)
    fake.create_script = ["500"]
    job = await client.batches.create_batch("file-in", CHAT)
    assert job.id == "batch-3"


async def test_persistent_failure_without_a_job_raises(
    fake: FakeBatches, make_client: MakeClient
) -> None:
    """When every attempt fails and no job exists, the last error is raised; no job made."""
    fake.create_script = ["500"] * 10
    client = make_client(fake.server, max_retries=2)
    with pytest.raises(InternalServerError):
        await client.batches.create_batch("file-in", CHAT)
    assert fake.jobs == {}
    assert fake.posts == 3


async def test_unknown_outcome_is_said_plainly(fake: FakeBatches, make_client: MakeClient) -> None:
    """If the create may have worked and listing fails too, the error says to check first."""
    fake.create_script = ["drop"]
    fake.list_status = 503
    client = make_client(fake.server, max_retries=0)
    with pytest.raises(APIConnectionError, match="may have created a job"):
        await client.batches.create_batch("file-in", CHAT)


async def test_non_retryable_create_error_is_raised_at_once(
    serve: Serve, make_client: MakeClient
) -> None:
    """A 400 on create is raised as is, without listing or resending."""
    recorder = Recorder()

    async def reject(request: web.Request) -> web.Response:
        recorder.record(request)
        return web.json_response({"error": "input file not found"}, status=400)

    app = web.Application()
    app.router.add_post("/v1/batches", reject)
    client = make_client(await serve(app))
    with pytest.raises(Exception, match="input file not found"):
        await client.batches.create_batch("file-x", CHAT)
    assert recorder.paths() == ["POST /v1/batches"]


async def test_rate_limit_exhaustion_raises_rate_limit_error(
    fake: FakeBatches, make_client: MakeClient
) -> None:
    """A create that stays rate limited raises RateLimitError and made no job."""
    fake.create_script = ["429"] * 5
    client = make_client(fake.server, max_retries=1)
    with pytest.raises(RateLimitError):
        await client.batches.create_batch("file-in", CHAT)
    assert fake.jobs == {}


# ---- results ------------------------------------------------------------------------------

OUTPUT = (
    b'{"custom_id": "r1", "response": {"status_code": 200, "body": {"choices": '
    b'[{"message": {"content": "hello"}}]}}}\n'
    b'{"custom_id": "r2", "response": {"status_code": 400, "body": {"error": '
    b'{"message": "too long"}}}}\n'
)
ERRORS = b'{"custom_id": "r3", "error": {"message": "Invalid model", "code": "invalid_model"}}\n'


async def test_results_stream_output_then_error_rows(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """results(id) reads the job, then every row of its output and error files."""
    fake.add_job(status="COMPLETED", output_file_id="out-1", error_file_id="err-1")
    fake.contents = {"out-1": OUTPUT, "err-1": ERRORS}
    results = [result async for result in client.batches.results("batch-1")]
    assert [(r.custom_id, r.ok) for r in results] == [("r1", True), ("r2", False), ("r3", False)]
    assert results[0].text == "hello"
    assert results[1].error_message == "too long"
    assert (results[2].error_message, results[2].error_code) == ("Invalid model", "invalid_model")
    assert {r.batch_id for r in results} == {"batch-1"}
    assert fake.recorder.paths() == [
        "GET /v1/batches/batch-1",
        "GET /v1/files/out-1/content",
        "GET /v1/files/err-1/content",
    ]


async def test_results_of_a_job_object_skip_the_lookup(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """Passing the job itself uses its file ids; a job with only an error file works."""
    job = BatchJob(id="batch-9", status=BatchJobStatus.COMPLETED, error_file_id="err-1")
    fake.contents = {"err-1": ERRORS}
    results = [result async for result in client.batches.results(job)]
    assert [r.custom_id for r in results] == ["r3"]
    assert fake.recorder.paths() == ["GET /v1/files/err-1/content"]


async def test_results_name_the_bad_line(fake: FakeBatches, client: AsyncTogether) -> None:
    """A broken row raises APIResponseValidationError naming the file and the line."""
    fake.add_job(status="COMPLETED", output_file_id="out-1")
    fake.contents = {"out-1": OUTPUT + b'{"custom_id": "r9", "response": \n'}
    with pytest.raises(APIResponseValidationError, match="file out-1 line 3"):
        [result async for result in client.batches.results("batch-1")]


async def test_results_row_without_response_or_error_is_named(
    fake: FakeBatches, client: AsyncTogether
) -> None:
    """A JSON row of the wrong shape is reported with its line too."""
    fake.add_job(status="COMPLETED", output_file_id="out-1")
    fake.contents = {"out-1": b'{"custom_id": "r1"}\n'}
    with pytest.raises(APIResponseValidationError, match="file out-1 line 1"):
        [result async for result in client.batches.results("batch-1")]


async def test_leaving_results_early_releases_the_connection(
    serve: Serve, make_client: MakeClient
) -> None:
    """Breaking out of results() closes the streamed response (the server sees it go)."""
    disconnected = asyncio.Event()
    row = b'{"custom_id": "r", "response": {"status_code": 200, "body": {}}}\n'

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(1_000_000):
                await response.write(row * 100)
        except (ConnectionError, asyncio.CancelledError):
            disconnected.set()
            raise
        return response

    app = web.Application()
    app.router.add_get("/v1/files/{id}/content", endless)
    client = make_client(await serve(app))
    job = BatchJob(id="b", status=BatchJobStatus.COMPLETED, output_file_id="out-big")
    async for _result in client.batches.results(job):
        break
    await asyncio.wait_for(disconnected.wait(), timeout=10)
