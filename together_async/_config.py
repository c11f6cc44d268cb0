"""Client settings from arguments and the environment: the API key, the base URL forms,
timeouts, the deadline, the answer size cap and the retry policy. Pure: reading it touches
neither the network nor the disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import attrs

from ._errors import InvalidArgumentError
from ._safe_url import is_dns_length

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "ClientConfig",
    "check_api_key",
    "normalise_base_url",
]

DEFAULT_BASE_URL = "https://api.together.ai/v1"
API_KEY_ENV = "TOGETHER_API_KEY"
BASE_URL_ENV = "TOGETHER_BASE_URL"
#: The default cap on an answer read into memory: a batch job or file list is a few KB, and
#: a page of 10,000 jobs well under a MB.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


def normalise_base_url(url: str) -> str:
    """The API root without a trailing slash; a URL with no path means `<host>/v1`.

    The older official SDK reads `TOGETHER_BASE_URL` as ending in `/v1`, the current one as the
    bare host; accepting both lets either form of the variable work here.
    """
    if not isinstance(url, str):
        raise InvalidArgumentError(
            f"base_url must be a str such as {DEFAULT_BASE_URL!r}, got {type(url).__name__}"
        )
    text = url.strip()
    if not text.isascii() or not text.isprintable() or " " in text:
        # An IDN host must be given in its ASCII (punycode) form: the URL is also what the
        # upload guard compares hosts with, and one spelling keeps that comparison exact.
        raise InvalidArgumentError(
            f"base_url must be printable ASCII without spaces (punycode for an IDN host), "
            f"got {url!r}"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"base_url is not a valid URL ({exc}): {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgumentError(
            f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL!r}, got {url!r}"
        )
    if port == 0:
        raise InvalidArgumentError(f"base_url has port 0, which cannot be connected to: {url!r}")
    host = parts.hostname
    if ":" not in host and not is_dns_length(host):
        raise InvalidArgumentError(
            f"base_url's host is not a valid DNS name (labels of 1 to 63 characters, 253 in "
            f"all): {url!r}"
        )
    if parts.query or parts.fragment:
        raise InvalidArgumentError(f"base_url must not carry a query or fragment: {url!r}")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def check_api_key(key: object) -> None:
    """Refuse a key that could not be sent as a header value as it is.

    A CR or LF would split the header (or be refused deep in the HTTP stack with the key in
    the message); other control or non-ASCII characters are never part of a real key and are
    mostly a paste gone wrong. The message says where, never what: the key stays out of it.
    """
    if not isinstance(key, str):
        raise InvalidArgumentError("api_key must be a string")
    for index, char in enumerate(key):
        if not ("\x21" <= char <= "\x7e"):
            what = (
                "a line break"
                if char in "\r\n"
                else "a space"
                if char == " "
                else ("a control character" if char.isascii() else "a non-ASCII character")
            )
            raise InvalidArgumentError(
                f"api_key has {what} at position {index + 1} of {len(key)}; a key is printable "
                "ASCII without spaces (check how it was pasted or exported)"
            )


def _check_positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_deadline(value: float | None) -> None:
    _check_positive("deadline", value)
    if value is not None and value <= 0:
        raise InvalidArgumentError(f"deadline must be > 0 seconds or None, got {value!r}")


def _check_max_response_bytes(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"max_response_bytes must be an int >= 1, got {value!r}")


def _check_retries(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{name} must be an int >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Everything an AsyncTogether needs to know before it sends a request.

    Build it with `ClientConfig.from_arguments(...)`, which applies the environment defaults.
    The key is kept out of repr() on purpose.

    Attributes:
        api_key: the bearer token, or None (the first call that needs it then raises
            MissingAPIKeyError).
        base_url: the API root, always ending in a path such as `/v1`, no trailing slash.
        timeout: an inactivity limit in seconds: to connect, for each piece of a request
            body to be taken by the peer, and between two reads of an answer. A transfer that
            keeps moving never times out, however long it takes.
        deadline: seconds one request may take in all, retries and their waits included, from
            the first connect to the last byte of the answer (of a streamed download too, its
            resumes included, so it counts the time your code spends between chunks): past it
            APITimeoutError; a retry that could not start before it is not waited for (the
            last failure is raised at once). None (the default): no limit, so a large upload
            over a slow link can take as long as it needs.
        max_response_bytes: the most bytes of an answer read into memory (JSON answers and
            error bodies; counted after decompression). A longer one raises
            ResponseTooLargeError. Downloads of file content stream and are not capped.
        max_retries: retries after the first attempt (0 disables retrying).
        retry_wait_initial: the first backoff in seconds; it doubles per retry.
        retry_wait_max: the longest backoff in seconds.
        retry_wait_jitter: up to this many random seconds are added to each backoff.
        retry_after_max: the longest server-requested wait (Retry-After) that is honoured;
            a longer one falls back to the exponential backoff.
        create_reconcile_skew: seconds of clock skew allowed when looking for a job that an
            ambiguously failed `create_batch` may have made.
    """

    api_key: str | None = attrs.field(repr=False, default=None)
    base_url: str = attrs.field(default=DEFAULT_BASE_URL, converter=normalise_base_url)
    timeout: float = 60.0
    deadline: float | None = None
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_retries: int = 5
    retry_wait_initial: float = 0.5
    retry_wait_max: float = 30.0
    retry_wait_jitter: float = 1.0
    retry_after_max: float = 60.0
    create_reconcile_skew: float = 300.0

    def __attrs_post_init__(self) -> None:
        _check_positive("timeout", self.timeout)
        if self.timeout is None or self.timeout <= 0:
            raise InvalidArgumentError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        _check_deadline(self.deadline)
        _check_max_response_bytes(self.max_response_bytes)
        _check_retries("max_retries", self.max_retries)
        for name in (
            "retry_wait_initial",
            "retry_wait_max",
            "retry_wait_jitter",
            "retry_after_max",
            "create_reconcile_skew",
        ):
            _check_positive(name, getattr(self, name))
        if self.api_key is not None:
            check_api_key(self.api_key)

    @classmethod
    def from_arguments(
        cls,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 60.0,
        deadline: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_retries: int = 5,
        environ: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """Arguments first, then `TOGETHER_API_KEY` / `TOGETHER_BASE_URL`, then the defaults.

        An empty environment variable counts as unset.
        """
        env = os.environ if environ is None else environ
        key = api_key if api_key is not None else (env.get(API_KEY_ENV) or None)
        if key is not None:
            if not isinstance(key, str):
                raise InvalidArgumentError("api_key must be a string")
            key = key.strip() or None
        url = base_url if base_url is not None else (env.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
        return cls(
            api_key=key,
            base_url=normalise_base_url(url),
            timeout=timeout,
            deadline=deadline,
            max_response_bytes=max_response_bytes,
            max_retries=max_retries,
        )

    def attempts_for(self, max_retries: int | None) -> int:
        """Total attempts for one call: the per-call override, else the client's setting, plus 1."""
        if max_retries is None:
            return self.max_retries + 1
        _check_retries("max_retries", max_retries)
        return max_retries + 1

    def __str__(self) -> str:
        return repr(self)
