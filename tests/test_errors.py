"""The exception tree: classes per status and messages."""

from __future__ import annotations

import pytest

import together_async
from together_async import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    BatchFileError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    TogetherError,
)
from together_async._errors import status_error_class


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (400, "BadRequestError"),
        (401, "AuthenticationError"),
        (403, "PermissionDeniedError"),
        (404, "NotFoundError"),
        (409, "ConflictError"),
        (422, "UnprocessableEntityError"),
        (429, "RateLimitError"),
        (500, "InternalServerError"),
        (503, "InternalServerError"),
        (418, "APIStatusError"),
    ],
)
def test_status_error_class(status: int, name: str) -> None:
    """Each documented status maps to its own exported subclass."""
    cls = status_error_class(status)
    assert cls is getattr(together_async, name)
    assert issubclass(cls, APIStatusError)


def test_tree_roots() -> None:
    """Every API error is a TogetherError, and timeouts are connection errors."""
    assert issubclass(APIStatusError, APIError)
    assert issubclass(APITimeoutError, APIConnectionError)
    assert issubclass(APIConnectionError, APIError)
    assert issubclass(APIError, TogetherError)
    assert issubclass(RateLimitError, APIStatusError)


def test_status_error_carries_fields() -> None:
    """A status error keeps status, message, request id, body and retry-after."""
    error = NotFoundError(
        "no such batch", status_code=404, body={"error": "no such batch"}, request_id="req-1"
    )
    assert (error.status_code, error.message, error.request_id) == (404, "no such batch", "req-1")
    assert error.body == {"error": "no such batch"}
    assert str(error) == "404: no such batch (request id req-1)"


def test_internal_server_error_keeps_retry_after() -> None:
    """A server error can carry the wait the server asked for."""
    error = InternalServerError("busy", status_code=503, retry_after=2.5)
    assert error.retry_after == 2.5


def test_batch_file_error_lists_problems_and_count() -> None:
    """A BatchFileError names its source, its problems and how many more were hidden."""
    error = BatchFileError(
        ["line 2: body: missing", "line 9: custom_id: too long"], problem_count=5, source="in.jsonl"
    )
    text = str(error)
    assert text.splitlines()[0] == "in.jsonl: 5 problems"
    assert "line 9: custom_id: too long" in text
    assert text.endswith("... and 3 more")
    assert isinstance(error, ValueError)
