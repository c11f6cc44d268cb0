"""Request shapes and error paths of the client against aioresponses (no sockets).

Streaming paths (uploads, downloads, results) are tested over loopback in test_files.py,
test_batches.py and test_flow.py; this file covers what a mocked transport shows well.
"""

from __future__ import annotations

import orjson
import pytest
from aioresponses import aioresponses
from yarl import URL

from together_async import (
    APIConnectionError,
    AsyncTogether,
    AuthenticationError,
    BadRequestError,
    BatchJobStatus,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)

pytestmark = pytest.mark.usefixtures("fast_retries")

BASE = "https://api.example.test/v1"
KEY = "mocked-secret-key"
JOB = {"id": "batch-1", "status": "IN_PROGRESS", "input_file_id": "file-1", "progress": 40.0}


@pytest.fixture
async def client() -> AsyncTogether:
    """A client for the mocked API host, closed at teardown."""
    async with AsyncTogether(api_key=KEY, base_url=BASE, max_retries=2) as together:
        yield together


def sent(mock_http: aioresponses, method: str, url: str) -> list[object]:
    """The requests aioresponses recorded for one method and URL."""
    return list(mock_http.requests.get((method, URL(url)), []))


async def test_get_batch_sends_bearer_key_and_parses(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """GET /batches/{id} carries the Bearer key and parses the bare job."""
    mock_http.get(f"{BASE}/batches/batch-1", payload=JOB)
    job = await client.batches.get_batch("batch-1")
    assert job.status is BatchJobStatus.IN_PROGRESS and job.progress == 40.0
    (request,) = sent(mock_http, "GET", f"{BASE}/batches/batch-1")
    assert request.kwargs["headers"]["Authorization"] == f"Bearer {KEY}"


async def test_create_batch_posts_only_the_given_fields(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """POST /batches sends input_file_id, endpoint and window, and no unset options."""
    mock_http.post(f"{BASE}/batches", status=201, payload={"job": JOB})
    await client.batches.create_batch("file-1", "/v1/chat/completions")
    (request,) = sent(mock_http, "POST", f"{BASE}/batches")
    body = request.kwargs.get("json")
    if body is None:
        body = orjson.loads(request.kwargs["data"])
    assert body == {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }


async def test_string_error_body_gives_its_text(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """A batch endpoint's {"error": "text"} becomes the error's message."""
    mock_http.get(f"{BASE}/batches/nope", status=404, payload={"error": "batch job not found"})
    with pytest.raises(NotFoundError) as raised:
        await client.batches.get_batch("nope")
    assert "batch job not found" in raised.value.message


async def test_object_error_body_gives_its_message(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """An {"error": {"message": ...}} body becomes the error's message."""
    mock_http.get(
        f"{BASE}/files",
        status=401,
        payload={"error": {"message": "Invalid API key", "type": "invalid_request_error"}},
    )
    with pytest.raises(AuthenticationError, match="Invalid API key"):
        await client.files.list()


async def test_html_error_body_gives_a_readable_message(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """A proxy's HTML page still gives a short readable message, and the body is kept."""
    page = "<html><head><title>400 Bad Request</title></head><body>nginx</body></html>"
    mock_http.get(f"{BASE}/batches", status=400, body=page, content_type="text/html")
    with pytest.raises(BadRequestError) as raised:
        await client.batches.list_batches()
    assert "400 Bad Request" in raised.value.message and "<html>" not in raised.value.message


async def test_request_id_is_kept_on_errors(mock_http: aioresponses, client: AsyncTogether) -> None:
    """The x-request-id header of an error answer is kept on the exception."""
    mock_http.get(
        f"{BASE}/batches/b",
        status=400,
        payload={"error": "bad"},
        headers={"x-request-id": "req-42"},
    )
    with pytest.raises(BadRequestError) as raised:
        await client.batches.get_batch("b")
    assert raised.value.request_id == "req-42"


async def test_5xx_is_retried_then_succeeds(mock_http: aioresponses, client: AsyncTogether) -> None:
    """A 503 then a 200: one call, two requests, the job returned."""
    mock_http.get(f"{BASE}/batches/batch-1", status=503, payload={"error": "busy"})
    mock_http.get(f"{BASE}/batches/batch-1", payload=JOB)
    job = await client.batches.get_batch("batch-1")
    assert job.id == "batch-1"
    assert len(sent(mock_http, "GET", f"{BASE}/batches/batch-1")) == 2


async def test_429_retry_after_is_kept_when_retries_run_out(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """Retries spent on 429s raise RateLimitError carrying the server's Retry-After."""
    for _ in range(3):
        mock_http.get(
            f"{BASE}/batches", status=429, payload={"error": "slow"}, headers={"Retry-After": "7"}
        )
    with pytest.raises(RateLimitError) as raised:
        await client.batches.list_batches()
    assert raised.value.retry_after == 7.0
    assert len(sent(mock_http, "GET", f"{BASE}/batches")) == 3


async def test_persistent_500_raises_internal_server_error(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """Every attempt failing with 500 gives InternalServerError after max_retries + 1 tries."""
    for _ in range(3):
        mock_http.get(f"{BASE}/files/f", status=500, payload={"error": "boom"})
    with pytest.raises(InternalServerError):
        await client.files.retrieve("f")
    assert len(sent(mock_http, "GET", f"{BASE}/files/f")) == 3


async def test_connection_error_is_translated(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """An aiohttp connection error never escapes: it becomes APIConnectionError."""
    import aiohttp

    for _ in range(3):
        mock_http.get(f"{BASE}/batches", exception=aiohttp.ClientConnectionError("refused"))
    with pytest.raises(APIConnectionError) as raised:
        await client.batches.list_batches()
    assert not isinstance(raised.value, aiohttp.ClientError)


async def test_per_call_max_retries_overrides_the_client(
    mock_http: aioresponses, client: AsyncTogether
) -> None:
    """max_retries=0 on a call sends exactly one request even though the client allows 2."""
    mock_http.get(f"{BASE}/batches", status=503, payload={"error": "busy"})
    with pytest.raises(InternalServerError):
        await client.batches.list_batches(max_retries=0)
    assert len(sent(mock_http, "GET", f"{BASE}/batches")) == 1
