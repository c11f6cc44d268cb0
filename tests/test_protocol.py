"""The pure protocol layer: URLs, headers, error mapping, Retry-After, retry decisions and
redirect targets. Plain synchronous tests: no event loop, no network. (The upload guard is
tests/test_safe_url.py.)"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from together_async import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchEndpoint,
    ConflictError,
    InternalServerError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    UnsafeURLError,
)
from together_async._protocol import (
    APIOrigin,
    api_url,
    auth_headers,
    decode_json,
    error_from_response,
    is_ambiguous_create_failure,
    is_api_url,
    is_retryable_status,
    parse_content_range,
    parse_retry_after,
    request_id_from,
    require_endpoint,
    require_id,
    resolve_location,
    retry_backoff,
    unwrap_job,
    user_agent,
    with_context,
)

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
HTTPS_API = "https://api.together.ai/v1"


# ---- URLs and headers ---------------------------------------------------------------------


def test_api_url_quotes_each_segment() -> None:
    """An id with a slash or a query character cannot change the path."""
    assert api_url(HTTPS_API, "files", "a/b?c") == "https://api.together.ai/v1/files/a%2Fb%3Fc"


def test_api_url_joins_without_double_slash() -> None:
    """A base URL with a trailing slash still gives one slash."""
    assert api_url("https://h/v1/", "batches") == "https://h/v1/batches"


@given(segments=st.lists(st.text() | st.from_regex(r"[A-Za-z0-9_.~-]*", fullmatch=True)))
def test_api_url_quotes_every_segment_like_quote(segments: list[str]) -> None:
    """Each segment appears exactly as urllib's quote(segment, safe="") gives it."""
    expected = "/".join(quote(segment, safe="") for segment in segments)
    assert api_url(HTTPS_API, *segments) == f"{HTTPS_API}/{expected}"


@pytest.mark.parametrize("bad", ["", "   ", None, 5, b"id", ".", ".."])
def test_require_id_rejects_empty_and_non_strings(bad: object) -> None:
    """Empty or non-string ids raise InvalidArgumentError naming what they are."""
    with pytest.raises(InvalidArgumentError, match="batch id"):
        require_id(bad, "batch id")


def test_auth_headers_are_a_bearer_token() -> None:
    """The key goes in an Authorization: Bearer header."""
    assert auth_headers("k") == {"Authorization": "Bearer k"}


def test_user_agent_names_the_library() -> None:
    """The User-Agent starts with together-async/<version>."""
    assert user_agent().startswith("together-async/")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.together.ai/v1/files", True),
        ("https://API.together.ai:443/v1/batches", True),
        ("http://api.together.ai/v1/files", False),
        ("https://api.together.ai:8443/v1/files", False),
        ("https://storage.example/bucket/x", False),
    ],
)
def test_is_api_url_compares_scheme_host_and_port(url: str, expected: bool) -> None:
    """Only the API's own origin may receive the key."""
    assert is_api_url(url, HTTPS_API) is expected


_URL_PIECES = ["http", "https", "HTTPS", ":", "//", "/", "api.together.ai", "API.together.ai"]
_URL_PIECES += [":443", ":8443", ":80", ":", "@", "evil.example", "v1", "?", "#", "\\", "."]


@given(
    base=st.lists(st.sampled_from(_URL_PIECES), max_size=7).map("".join)
    | st.sampled_from([HTTPS_API, HTTPS_API + "/", "http://127.0.0.1:8080", "https://h:x/v1"]),
    tail=st.lists(st.sampled_from(_URL_PIECES), max_size=5).map("".join),
    from_base=st.booleans(),
)
@example(base="", tail="//evil.example/v1", from_base=False)
@example(base="http://", tail="http://evil.example/v1", from_base=False)
@example(base="https://h:x/v1", tail="https://h:x/v1/files", from_base=False)
def test_api_origin_agrees_with_is_api_url(base: str, tail: str, from_base: bool) -> None:
    """APIOrigin (parsed once per client) decides like is_api_url for any URL, those built
    from the base URL included."""
    url = api_url(base, tail) if from_base else tail
    assert (url in APIOrigin(base)) is is_api_url(url, base)


# ---- error mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, InternalServerError),
        (418, APIStatusError),
    ],
)
def test_status_maps_to_its_error_class(status: int, cls: type[APIStatusError]) -> None:
    """Each status gets its subclass, carrying the status code."""
    error = error_from_response(status, {}, b'{"error": "x"}')
    assert type(error) is cls
    assert error.status_code == status


def test_string_error_body_gives_the_message() -> None:
    """{"error": "text"} (the batch endpoints' shape) gives that text."""
    error = error_from_response(400, {}, b'{"error": "input_file_id is required"}')
    assert error.message == "input_file_id is required"
    assert error.body == {"error": "input_file_id is required"}


def test_object_error_body_gives_its_message() -> None:
    """{"error": {"message": ...}} gives the nested message."""
    body = b'{"error": {"message": "Invalid API key", "type": "auth", "code": "invalid_key"}}'
    error = error_from_response(401, {}, body)
    assert error.message == "Invalid API key"
    assert error.body["error"]["code"] == "invalid_key"


def test_html_error_body_gives_its_title() -> None:
    """A proxy's HTML page gives its <title>, not the markup."""
    body = b"<html><head><title>502 Bad Gateway</title></head><body><h1>nginx</h1></body></html>"
    error = error_from_response(502, {}, body)
    assert error.message == "502 Bad Gateway"
    assert isinstance(error.body, str)


def test_plain_text_error_body_is_the_message() -> None:
    """A plain-text body is the message, whitespace collapsed."""
    error = error_from_response(503, {}, b"upstream   connect error\n")
    assert error.message == "upstream connect error"


def test_empty_error_body_gives_the_reason_phrase() -> None:
    """No body at all still gives a readable message."""
    assert error_from_response(404, {}, b"").message == "Not Found"


def test_long_text_body_is_shortened() -> None:
    """A huge text body does not become a huge message."""
    error = error_from_response(500, {}, b"x" * 10_000)
    assert len(error.message) <= 500


def test_message_names_the_route_without_the_query() -> None:
    """The route is in the message, but not a query string (it may hold a signature)."""
    error = error_from_response(
        404, {}, b'{"error": "no such file"}', method="get", url="https://h/v1/files/f1?sig=SECRET"
    )
    assert "GET /v1/files/f1" in error.message
    assert "SECRET" not in str(error)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Request-Id": "req-1", "cf-ray": "ray-1"}, "req-1"),
        ({"cf-ray": "ray-1"}, "ray-1"),
        ({}, None),
    ],
)
def test_request_id_from_headers(headers: dict[str, str], expected: str | None) -> None:
    """x-request-id is preferred, cf-ray is the fallback, header names are case-insensitive."""
    assert request_id_from(headers) == expected


def test_error_carries_request_id_and_retry_after() -> None:
    """The mapped error keeps the request id and the server's Retry-After."""
    error = error_from_response(429, {"x-request-id": "r9", "retry-after": "7"}, b"{}")
    assert (error.request_id, error.retry_after) == ("r9", 7.0)
    assert "r9" in str(error)


def test_decode_json_rejects_non_json_success_bodies() -> None:
    """A 2xx body that is not JSON raises APIResponseValidationError naming the call."""
    with pytest.raises(APIResponseValidationError, match="GET /batches"):
        decode_json(b"<html>", what="GET /batches")


def test_unwrap_job_handles_wrapped_and_bare_jobs() -> None:
    """{"job": ..., "warning": ...} and a bare job both give the job; the warning is kept."""
    assert unwrap_job({"job": {"id": "b1"}, "warning": "slow"}) == ({"id": "b1"}, "slow")
    assert unwrap_job({"job": {"id": "b1"}}) == ({"id": "b1"}, None)
    assert unwrap_job({"id": "b2", "status": "VALIDATING"}) == (
        {"id": "b2", "status": "VALIDATING"},
        None,
    )


def test_with_context_keeps_kind_and_fields() -> None:
    """A re-raised error keeps its class, status, body and request id, with more context."""
    original = error_from_response(503, {"x-request-id": "r1"}, b'{"error": "busy"}')
    wrapped = with_context(original, "file f-1 left without content")
    assert type(wrapped) is InternalServerError
    assert isinstance(wrapped, APIStatusError)
    assert (wrapped.status_code, wrapped.request_id) == (503, "r1")
    assert "file f-1" in str(wrapped) and "busy" in str(wrapped)
    timeout = with_context(APITimeoutError("timed out"), "ctx")
    assert type(timeout) is APITimeoutError


# ---- Retry-After and retry decisions ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"Retry-After": "-4"}, 0.0),
        ({"Retry-After": "Wed, 01 Jan 2025 12:00:30 GMT"}, 30.0),
        ({"Retry-After": "Wed, 01 Jan 2025 11:00:00 GMT"}, 0.0),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "whenever"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms first, then Retry-After as seconds or an HTTP date; junk gives None."""
    assert parse_retry_after(headers, now=NOW) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (408, True),
        (409, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (422, False),
    ],
)
def test_retryable_statuses(status: int, expected: bool) -> None:
    """408, 409, 429 and 5xx are retried; other 4xx are not."""
    assert is_retryable_status(status) is expected


def test_backoff_honours_retry_after() -> None:
    """A retryable error with Retry-After waits exactly that long."""
    error = error_from_response(429, {"retry-after": "2"}, b"{}")
    assert retry_backoff(error, retry_after_max=60) == 2.0


def test_backoff_ignores_an_excessive_retry_after() -> None:
    """A Retry-After beyond the cap falls back to the exponential backoff."""
    error = error_from_response(503, {"retry-after": "3600"}, b"{}")
    assert retry_backoff(error, retry_after_max=60) is True


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (error_from_response(500, {}, b""), True),
        (error_from_response(400, {}, b""), False),
        (error_from_response(401, {}, b""), False),
        (APIConnectionError("reset"), True),
        (APITimeoutError("slow"), True),
        (ValueError("bug"), False),
        (InvalidArgumentError("bad id"), False),
    ],
)
def test_backoff_decides_what_is_retried(error: Exception, expected: bool) -> None:
    """Connection errors, timeouts and retryable statuses are retried; nothing else."""
    assert retry_backoff(error, retry_after_max=60) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (error_from_response(500, {}, b""), True),
        (error_from_response(502, {}, b""), True),
        (APIConnectionError("reset"), True),
        (APITimeoutError("slow"), True),
        (error_from_response(429, {}, b""), False),
        (error_from_response(408, {}, b""), False),
        (error_from_response(400, {}, b""), False),
    ],
)
def test_ambiguous_create_failures(error: Exception, expected: bool) -> None:
    """Timeouts, resets and 5xx may have created a job; 408 and 429 did not."""
    assert is_ambiguous_create_failure(error) is expected


# ---- redirect targets ---------------------------------------------------------------------


def test_relative_location_is_resolved() -> None:
    """A relative Location is taken relative to the URL that answered."""
    assert resolve_location("https://s.example/a/b", "/c?d=1") == "https://s.example/c?d=1"


@pytest.mark.parametrize(
    "location", ["https://[::1/upload?sig=SECRET", "https://[zz::1]/upload?sig=SECRET"]
)
def test_malformed_location_is_an_unsafe_url_error(location: str) -> None:
    """A Location urllib cannot parse is UnsafeURLError (host shown, query not), not ValueError."""
    with pytest.raises(UnsafeURLError, match="malformed Location") as caught:
        resolve_location("https://api.example/v1/files", location)
    assert "SECRET" not in str(caught.value)


def test_error_for_a_malformed_url_is_an_unsafe_url_error() -> None:
    """Mapping an answer for a URL urllib cannot parse gives UnsafeURLError, not ValueError."""
    with pytest.raises(UnsafeURLError, match=r"PUT to \[zz::1\]: not a valid URL") as caught:
        error_from_response(500, {}, b"", method="PUT", url="https://[zz::1]/k?sig=SECRET")
    assert "SECRET" not in str(caught.value)


# ---- Content-Range ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 100-199/200", (100, 199, 200)),
        ("bytes 0-9/*", (0, 9, None)),
        ("bytes 5-2/10", None),
        ("items 0-1/2", None),
        (None, None),
    ],
)
def test_parse_content_range(value: str | None, expected: object) -> None:
    """`bytes START-END/TOTAL` parses; anything else gives None."""
    assert parse_content_range(value) == expected


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"])
def test_known_endpoints_pass(endpoint: str) -> None:
    """Every endpoint the Batch API serves is accepted as a plain string."""
    assert require_endpoint(endpoint) == endpoint


def test_endpoint_enum_member_passes() -> None:
    """A BatchEndpoint member gives its path."""
    assert require_endpoint(BatchEndpoint.EMBEDDINGS) == "/v1/embeddings"


@pytest.mark.parametrize("endpoint", ["/v1/chat/completion", "chat/completions", "", "/v2/x"])
def test_unknown_endpoint_is_refused_naming_the_known_ones(endpoint: str) -> None:
    """A typo in the endpoint is refused with the list of endpoints that exist."""
    with pytest.raises(InvalidArgumentError, match="'/v1/chat/completions'"):
        require_endpoint(endpoint)
