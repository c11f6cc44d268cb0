"""The pure part of the wire protocol: URLs, headers, error mapping from (status, headers, body),
Retry-After parsing and retry decisions. (Whether a URL is a safe place to send a file is
_safe_url.py's concern.)

Nothing here does I/O or needs an event loop, so all of it is tested synchronously.
"""

from __future__ import annotations

import email.utils
import functools
import html
import os
import platform
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, quote, urljoin, urlsplit

import orjson

from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    InvalidArgumentError,
    TogetherError,
    UnsafeURLError,
    status_error_class,
)
from ._models import BatchEndpoint, EndpointPath
from ._safe_url import host_for_message

__all__ = [
    "RETRYABLE_STATUSES",
    "APIOrigin",
    "api_url",
    "auth_headers",
    "decode_json",
    "error_from_response",
    "get_header",
    "require_endpoint",
    "is_ambiguous_create_failure",
    "is_api_url",
    "is_retryable_status",
    "parse_content_range",
    "parse_retry_after",
    "request_id_from",
    "require_id",
    "resolve_location",
    "require_text",
    "retry_backoff",
    "secrets_of",
    "unwrap_job",
    "wire_name",
    "user_agent",
    "with_context",
]

RETRYABLE_STATUSES = frozenset({408, 409, 429})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MESSAGE_LIMIT = 500


@functools.lru_cache(maxsize=1)
def user_agent() -> str:
    """The User-Agent sent with every request (computed once: it is sent on every call)."""
    from . import __version__

    return f"together-async/{__version__} Python/{platform.python_version()}"


def auth_headers(api_key: str) -> dict[str, str]:
    """The headers that authenticate a request to the API host (and only to it)."""
    return {"Authorization": f"Bearer {api_key}"}


def require_text(value: object, what: str) -> str:
    """Return `value` if it is a str that can be sent (as UTF-8), else raise InvalidArgumentError.

    A lone surrogate is what a name read with `errors="surrogateescape"` (a non-UTF-8 file
    name, a misdecoded argv) carries: it cannot go on the wire, and failing here says where
    instead of deep in the JSON encoder or the HTTP stack.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{what} {value!r} has a character that is not valid Unicode "
            f"({value[exc.start]!r} at position {exc.start + 1}); was it decoded from bytes "
            "that are not UTF-8?"
        ) from None
    if "\x00" in value:
        raise InvalidArgumentError(f"{what} {value!r} contains a NUL character")
    return value


def wire_name(name: str) -> str:
    """A local file name as it can be sent: undecodable bytes become U+FFFD.

    For a name taken from the file system (not one the caller chose), refusing would make a
    file impossible to upload for a name that is only metadata.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", errors="replace")
    return name


def require_id(value: object, what: str) -> str:
    """Return `value` if it is a usable id, else raise InvalidArgumentError before any request."""
    require_text(value, what)
    assert isinstance(value, str)
    if not value.strip():
        raise InvalidArgumentError(f"{what} must not be empty")
    if value in (".", ".."):
        # Percent-quoting leaves dots alone, and URL normalisation would turn the segment
        # into a step up the path: another route, e.g. cancel_batch("..") -> POST /v1/cancel.
        raise InvalidArgumentError(f"{what} must not be {value!r}")
    return value


_KNOWN_ENDPOINTS = tuple(endpoint.value for endpoint in BatchEndpoint)


def require_endpoint(value: object) -> EndpointPath:
    """The endpoint as a string if it is one Together's Batch API serves, else raise.

    Checked before any request: a typo ("/v1/chat/completion", "chat/completions") would
    otherwise cost an upload and a failed job. The list is `BatchEndpoint`.
    """
    endpoint = value.value if isinstance(value, BatchEndpoint) else value
    if not isinstance(endpoint, str):
        raise InvalidArgumentError(
            f"endpoint must be a string such as '/v1/chat/completions', got {type(value).__name__}"
        )
    if endpoint not in _KNOWN_ENDPOINTS:
        raise InvalidArgumentError(
            f"unknown batch endpoint {endpoint!r}; the Batch API serves "
            + ", ".join(repr(known) for known in _KNOWN_ENDPOINTS)
        )
    return cast(EndpointPath, endpoint)


# The characters quote() never changes: a segment made of them alone (nearly every id and
# route name) is used as it is, which saves a quote() call per segment and request.
_UNRESERVED_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]*")


@functools.lru_cache(maxsize=4096)  # a poll builds the same URL again and again
def api_url(base_url: str, *segments: str) -> str:
    """`base_url` joined with path segments, each percent-quoted (so an id cannot add a path)."""
    if all(map(_UNRESERVED_SEGMENT.fullmatch, segments)):
        path = "/".join(segments)
    else:
        path = "/".join(quote(segment, safe="") for segment in segments)
    return f"{base_url.rstrip('/')}/{path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def is_api_url(url: str, base_url: str) -> bool:
    """True when `url` has the API's scheme, host and port: only then may it carry the key."""
    return _origin(url) == _origin(base_url)


class APIOrigin:
    """`is_api_url` for one base URL, parsed once (a client asks it on every request)."""

    def __init__(self, base_url: str) -> None:
        self._origin = _origin(base_url)
        # A URL made by api_url (nearly every request) needs no parsing: when the base URL
        # names a host, text up to a "/" after the whole base URL holds its scheme, host and
        # port. A base without one ("", "http:") could be followed by a host: no shortcut.
        self._prefix = base_url.rstrip("/") + "/" if urlsplit(base_url).netloc else None

    def __contains__(self, url: str) -> bool:
        if self._prefix is not None and url.startswith(self._prefix):
            return True
        return _origin(url) == self._origin


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value by case-insensitive name, or None."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, item in headers.items():
        if key.lower() == lowered:
            return item
    return None


def request_id_from(headers: Mapping[str, str]) -> str | None:
    """The server's request id: `x-request-id`, else `cf-ray` (what older clients read)."""
    for name in ("x-request-id", "request-id", "cf-ray"):
        value = get_header(headers, name)
        if value:
            return value.strip()
    return None


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, else `Retry-After` (seconds or an
    HTTP date). None when absent or unreadable; never negative."""
    millis = get_header(headers, "retry-after-ms")
    if millis is not None:
        try:
            value = float(millis.strip()) / 1000.0
        except ValueError:
            value = None
        if value is not None and value == value and value >= 0 and value != float("inf"):
            return value
    raw = get_header(headers, "retry-after")
    if raw is None:
        return None
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds == float("inf"):
            return None
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = now if now is not None else datetime.now(timezone.utc)
    return max((when - current).total_seconds(), 0.0)


def is_retryable_status(status: int) -> bool:
    """408, 409, 429 and every 5xx are worth another attempt."""
    return status in RETRYABLE_STATUSES or status >= 500


def retry_backoff(exc: Exception, *, retry_after_max: float) -> bool | float:
    """The stamina backoff hook: False to give up, True for the exponential backoff, or the
    seconds the server asked for (Retry-After) when that is at most `retry_after_max`."""
    if isinstance(exc, APIStatusError):
        if not is_retryable_status(exc.status_code):
            return False
        wait = exc.retry_after
        if wait is not None and 0 <= wait <= retry_after_max:
            return float(wait)
        return True
    return isinstance(exc, APIConnectionError)


def is_ambiguous_create_failure(exc: Exception) -> bool:
    """True when a failed POST may still have been acted on by the server: a timeout, a dropped
    connection or a 5xx. A 408 or 429 means the server did not process it."""
    if isinstance(exc, APIStatusError):
        return exc.status_code >= 500
    return isinstance(exc, APIConnectionError)


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _shorten(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    if len(text) > _MESSAGE_LIMIT:
        return text[: _MESSAGE_LIMIT - 3] + "..."
    return text


def _message_from_json(payload: Any) -> str | None:
    if isinstance(payload, str):
        return payload or None
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, str) and error:
        return error
    if isinstance(error, dict):
        message = error.get("message")
        if message:
            return str(message)
        for key in ("type", "code"):
            if error.get(key):
                return str(error[key])
    for key in ("message", "detail", "msg"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            return value
        if value:
            return orjson.dumps(value).decode()
    return None


def _message_from_text(body: bytes) -> str | None:
    title = _TITLE.search(body)
    if title:
        text = html.unescape(title.group(1).decode("utf-8", "replace"))
        if text.strip():
            return _shorten(text)
    text = body.decode("utf-8", "replace")
    if "<" in text and ">" in text:
        text = html.unescape(_TAG.sub(" ", text))
    shortened = _shorten(text)
    return shortened or None


def _decode_error_body(body: bytes) -> tuple[Any, str | None]:
    if not body.strip():
        return None, None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace"), _message_from_text(body)
    return payload, _message_from_json(payload)


# Query values shorter than this are not blanked: "1" or "3600" would mangle the message,
# and a credential is never that short.
_MIN_QUERY_SECRET = 4


def secrets_of(key: str | None, url: str) -> list[tuple[str, str]]:
    """What to blank out of an error built from an answer to `url`: the API key, and the
    values of the URL's query (a presigned URL's signature and credential), in the spellings a
    server may echo; longest first, so a value inside another is not half-blanked."""
    found: dict[str, str] = {}
    # Split by hand: urlsplit refuses some URLs (a bad IPv6 host), whose query still counts.
    query = url.partition("?")[2].partition("#")[0]
    if query:
        if "=" not in query and len(query) >= _MIN_QUERY_SECRET:
            found[query] = "<hidden>"  # a bare token: the whole query is the credential
        for _name, value in parse_qsl(query, keep_blank_values=False):
            for spelling in {value, quote(value, safe=""), quote(value, safe="/")}:
                if len(spelling) >= _MIN_QUERY_SECRET:
                    found[spelling] = "<hidden>"
    if key:
        found[key] = "<api key>"
    return sorted(found.items(), key=lambda item: -len(item[0]))


def _scrubbed(value: Any, secrets: list[tuple[str, str]]) -> Any:
    """`value` (a decoded error body, or a text) with each secret blanked out of every string
    in it."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret, shown in secrets:
            if secret in value:
                value = value.replace(secret, shown)
        return value
    if isinstance(value, dict):
        return {_scrubbed(k, secrets): _scrubbed(item, secrets) for k, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item, secrets) for item in value]
    return value


def _route(method: str, url: str) -> str:
    # The path only: a presigned URL's query string is a credential.
    try:
        path = urlsplit(url).path
    except ValueError as exc:
        raise UnsafeURLError(
            f"{method.upper()} to {host_for_message(url)}: not a valid URL ({exc})"
        ) from None
    return f"{method.upper()} {path or '/'}"


# Routes with no id in them: a 404 there says the base URL is wrong, not that a thing is gone.
_COLLECTIONS = ("/files", "/batches", "/files/upload")


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str = "",
    url: str = "",
    now: datetime | None = None,
    secret: str | None = None,
) -> APIStatusError:
    """The exception for an error answer, with the server's message in all three body shapes:
    `{"error": "text"}`, `{"error": {"message": ...}}`, and non-JSON text or HTML.

    `secret` (the API key) is blanked out of the message and of the kept body: some
    gateways echo the Authorization header back in their error pages.
    """
    decoded, message = _decode_error_body(body)
    if message is None:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = f"HTTP {status}"
    # Blanked after decoding, so an escaped spelling (JSON's \u0073k-...) is caught too, and
    # in the headers kept as well: a gateway may echo the Authorization header, a storage host
    # the presigned URL, into X-Request-Id.
    secrets_in = secrets_of(secret, url)
    decoded = _scrubbed(decoded, secrets_in)
    message = _scrubbed(message, secrets_in)
    request_id = request_id_from(headers)
    if request_id is not None:
        request_id = _scrubbed(request_id, secrets_in)
    if method and url:
        route = _route(method, url)
        message = f"{message} ({route})"
        if status == 404 and route.endswith(_COLLECTIONS):
            message += (
                f": this route always exists on Together's API, so the base URL's path is "
                f"probably wrong (Together's is https://api.together.ai/v1; this request went "
                f"to {host_for_message(url)}{route.split(' ', 1)[1]}; check base_url, "
                "--base-url or TOGETHER_BASE_URL)"
            )
    return status_error_class(status)(
        message,
        status_code=status,
        body=decoded,
        request_id=request_id,
        retry_after=parse_retry_after(headers, now=now),
    )


def with_context(exc: TogetherError, context: str) -> TogetherError:
    """An error of the same kind whose message starts with `context` (what was left behind,
    what to do), keeping the status, body, request id and Retry-After."""
    text = f"{context}: {exc}"
    if isinstance(exc, APIStatusError):
        # Its message, not str(exc): the status and request id are added again by the copy.
        return type(exc)(
            f"{context}: {exc.message}",
            status_code=exc.status_code,
            body=exc.body,
            request_id=exc.request_id,
            retry_after=exc.retry_after,
        )
    if isinstance(exc, (APIConnectionError, APIResponseValidationError)):
        return type(exc)(text, request_id=exc.request_id)
    if isinstance(exc, APIError):
        return APIError(text, request_id=exc.request_id)
    if isinstance(exc, UnsafeURLError):
        return UnsafeURLError(text)
    return TogetherError(text)


def decode_json(body: bytes, *, what: str) -> Any:
    """Decode a success body, or raise APIResponseValidationError naming what was expected."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        preview = _shorten(body[:200].decode("utf-8", "replace"))
        raise APIResponseValidationError(
            f"{what}: the response is not JSON ({exc}): {preview!r}"
        ) from None


def unwrap_job(payload: Any) -> tuple[Any, str | None]:
    """`POST /batches` answers `{"job": {...}, "warning": "..."}`; a bare job is accepted too.
    Returns the job's JSON and the warning (None when there is none)."""
    if isinstance(payload, dict) and isinstance(payload.get("job"), dict):
        warning = payload.get("warning")
        return payload["job"], (str(warning) if warning else None)
    return payload, None


def resolve_location(current_url: str, location: str) -> str:
    """A redirect's absolute target (a Location may be relative to the URL that answered).

    A Location no URL parser accepts (an unclosed `[`, say) is UnsafeURLError naming its host,
    never its query: a presigned URL's signature is a credential."""
    try:
        return urljoin(current_url, location.strip())
    except ValueError as exc:
        raise UnsafeURLError(
            f"refusing to follow a malformed Location to {host_for_message(location)} ({exc})"
        ) from None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes START-END/TOTAL` as (start, end, total or None); None if absent or malformed."""
    if not value:
        return None
    match = _CONTENT_RANGE.match(value)
    if not match:
        return None
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if end < start:
        return None
    return start, end, total
