"""The exception tree of together_async: every error the public API raises.

    TogetherError                      base of everything raised here
    ├── ClientClosedError              a call on a client after aclose()
    ├── MissingAPIKeyError             no key given and TOGETHER_API_KEY unset
    ├── BatchFileError (ValueError)    a batch input file or request list that fails validation
    ├── InvalidArgumentError (ValueError)  a bad argument, caught before any request
    ├── UnsafeURLError                 a presigned upload URL we refuse to send data to
    ├── ManifestMismatchError          a state file that belongs to another dataset
    ├── WaitTimeoutError (TimeoutError)    batches.wait() ran past its timeout
    ├── BatchNotFinishedError          results asked of a job that has not completed
    └── APIError                       anything that came from talking to the API
        ├── APIStatusError             the server answered with an error status
        │   ├── BadRequestError            400
        │   ├── AuthenticationError        401
        │   ├── PermissionDeniedError      403
        │   ├── NotFoundError              404
        │   ├── ConflictError              409
        │   ├── UnprocessableEntityError   422
        │   ├── RateLimitError             429
        │   └── InternalServerError        >= 500
        ├── APIResponseValidationError a 2xx answer whose body is not what the protocol promises
        ├── ResponseTooLargeError      an answer longer than max_response_bytes (not read)
        ├── APIConnectionError         no usable answer: refused, reset, DNS, TLS
        │   └── APITimeoutError        the request timed out
        └── StatusPollError            watching a batch gave up after a long run of failed polls

No aiohttp exception escapes the public API: the transport translates them at one boundary.
No message built here ever contains the API key.
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchFileError",
    "BatchNotFinishedError",
    "ClientClosedError",
    "ConflictError",
    "InternalServerError",
    "InvalidArgumentError",
    "ManifestMismatchError",
    "MissingAPIKeyError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseTooLargeError",
    "StatusPollError",
    "TogetherError",
    "UnprocessableEntityError",
    "UnsafeURLError",
    "WaitTimeoutError",
    "status_error_class",
]

_E = TypeVar("_E", bound="TogetherError")


class TogetherError(Exception):
    """Base class of every exception raised by together_async.

    Every error survives `pickle` and `copy` with its type and attributes (a worker process
    raising `NotFoundError` hands its parent a `NotFoundError`). Default exception pickling
    calls the class with `self.args` only, which breaks keyword-only constructors, so the
    arguments each error was built with are kept and the copy is rebuilt from them; attributes
    set after construction travel in the instance dict.
    """

    _init_args: tuple[Any, ...]
    _init_kwargs: dict[str, Any]

    def __new__(cls: type[_E], *args: Any, **kwargs: Any) -> _E:
        # Captured in __new__ so that every subclass is covered without code of its own,
        # whatever its __init__ looks like.
        self = super().__new__(cls, *args)
        self._init_args = args
        self._init_kwargs = kwargs
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        state = {
            key: value
            for key, value in self.__dict__.items()
            if key not in ("_init_args", "_init_kwargs")
        }
        return (_rebuild, (type(self), self._init_args, self._init_kwargs), state or None)


def _rebuild(cls: type[_E], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _E:
    """Unpickling helper: a TogetherError subclass built again from its constructor arguments."""
    return cls(*args, **kwargs)


class ClientClosedError(TogetherError):
    """A call was made on an AsyncTogether after it was closed."""


class MissingAPIKeyError(TogetherError):
    """No API key was given and TOGETHER_API_KEY is not set."""


class InvalidArgumentError(TogetherError, ValueError):
    """An argument is invalid; raised before any request is sent."""


class UnsafeURLError(TogetherError):
    """A presigned upload URL that we refuse to send the file to."""


class ManifestMismatchError(TogetherError):
    """A resume state file that was written for another dataset or other settings."""


class WaitTimeoutError(TogetherError, TimeoutError):
    """`batches.wait()` ran past its timeout; the job itself was left untouched.

    Attributes:
        batch_id: the job that was being waited on.
        last_job: the last state seen, or None if no poll succeeded.
    """

    def __init__(self, message: str, *, batch_id: str, last_job: Any = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.last_job = last_job


class BatchNotFinishedError(TogetherError):
    """`batches.results()` of a job that has not COMPLETED: one still running has no result
    files yet, and one that ended otherwise has at most part of them (pass `partial=True`).

    Attributes:
        batch_id: the job.
        status: its status when asked (a BatchJobStatus, or None if the server gave none).
        job: the job as it was read.
    """

    def __init__(self, message: str, *, batch_id: str, status: Any = None, job: Any = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status
        self.job = job


class BatchFileError(TogetherError, ValueError):
    """A batch input failed validation; nothing was uploaded.

    Attributes:
        problems: the problems found, in line order, each with its line number and field
            (capped; see `problem_count` for the total).
        problem_count: how many problems there were in all.
        source: the file name or a description of the input.
    """

    def __init__(self, problems: list[Any], *, problem_count: int, source: str) -> None:
        self.problems = list(problems)
        self.problem_count = problem_count
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        noun = "problem" if self.problem_count == 1 else "problems"
        lines = [f"{self.source}: {self.problem_count} {noun}"]
        lines.extend(f"  {problem}" for problem in self.problems)
        hidden = self.problem_count - len(self.problems)
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)


class APIError(TogetherError):
    """An error that came from talking to the API.

    Attributes:
        message: a human-readable description.
        request_id: the server's request id, when it sent one.
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class APIResponseValidationError(APIError):
    """A success response whose body does not have the shape the protocol promises."""


class ResponseTooLargeError(APIError):
    """An answer whose body is longer than the client's `max_response_bytes`; it is not read
    further (the connection is dropped), whatever its status.

    Attributes:
        status_code: the HTTP status of the answer.
        limit: the cap in bytes (of the decoded body, for a compressed answer).
    """

    def __init__(self, message: str, *, status_code: int, limit: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.limit = limit


class APIConnectionError(APIError):
    """The request got no usable answer: refused, reset, DNS or TLS failure."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class StatusPollError(APIError):
    """Watching a batch gave up: too many status polls in a row failed (the last one is chained).

    A single failed poll never raises this; it only means the API could not be reached for a
    long while. The job itself may be running fine.

    Attributes:
        batch_ids: the jobs that were being watched and are not finished yet.
        failures: how many polls in a row failed.
    """

    def __init__(self, message: str, *, batch_ids: tuple[str, ...], failures: int) -> None:
        super().__init__(message)
        self.batch_ids = batch_ids
        self.failures = failures


class APIStatusError(APIError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status.
        body: the decoded JSON body, or the raw text when it was not JSON.
        retry_after: seconds the server asked us to wait, if it said so.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code}: {self.message}{suffix}"


class BadRequestError(APIStatusError):
    """400 Bad Request."""


class AuthenticationError(APIStatusError):
    """401 Unauthorized: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403 Forbidden."""


class NotFoundError(APIStatusError):
    """404 Not Found."""


class ConflictError(APIStatusError):
    """409 Conflict."""


class UnprocessableEntityError(APIStatusError):
    """422 Unprocessable Entity."""


class RateLimitError(APIStatusError):
    """429 Too Many Requests."""


class InternalServerError(APIStatusError):
    """A 5xx answer."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """The exception class for an HTTP error status."""
    if status_code >= 500:
        return InternalServerError
    return _BY_STATUS.get(status_code, APIStatusError)
