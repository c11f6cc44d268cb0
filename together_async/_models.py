"""The data classes of the files and batches API: frozen, keyword-only attrs classes.

Serialization rules (renamed keys, timestamp forms, tolerant enums) live in `_convert.py`,
not here. API-owned string sets (statuses, purposes) are enums that accept unknown values,
because the server can add a value at any time.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import attrs
import orjson

__all__ = [
    "BatchEndpoint",
    "BatchJob",
    "BatchJobStatus",
    "BatchRequest",
    "BatchResult",
    "DownloadedFile",
    "FileDeleteResponse",
    "FileList",
    "FileObject",
    "FilePurpose",
]


class _TolerantStrEnum(str, enum.Enum):
    """A str enum that parses case-insensitively and keeps unknown values instead of raising."""

    @classmethod
    def _missing_(cls, value: object) -> _TolerantStrEnum | None:
        if not isinstance(value, str):
            return None
        normalised = cls._normalise(value)
        for member in cls:
            if member.value == normalised:
                return member
        aliased = cls._aliases().get(normalised)
        if aliased is not None:
            return cls(aliased)
        # An unknown value: a pseudo-member that keeps the server's raw string.
        pseudo = str.__new__(cls, value)
        pseudo._name_ = value
        pseudo._value_ = value
        return pseudo

    @classmethod
    def _normalise(cls, value: str) -> str:
        return value

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {}

    @property
    def is_known(self) -> bool:
        """False for a value this version of the library has never heard of."""
        return self._name_ in type(self).__members__

    def __str__(self) -> str:
        return str(self.value)


class BatchJobStatus(_TolerantStrEnum):
    """The status of a batch job, as Together spells it (uppercase).

    Parsing is case-insensitive, so the seed docs' OpenAI-style lowercase values work too,
    and an unknown value is kept as it came rather than raising. Comparing with a string is
    case-insensitive and knows the other spellings: `job.status == "COMPLETED"`,
    `== "completed"` and `CANCELLING == "canceling"` are all true. The hash is the canonical
    (uppercase) value's, so `{"COMPLETED": ...}[job.status]` works; a lowercase key in a dict
    or set is another key.
    """

    VALIDATING = "VALIDATING"
    IN_PROGRESS = "IN_PROGRESS"
    FINALIZING = "FINALIZING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    CANCELING = "CANCELING"
    CANCELLED = "CANCELLED"
    #: The seed page's (and British) spellings of CANCELING and CANCELLED, as aliases.
    CANCELLING = "CANCELING"
    CANCELED = "CANCELLED"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BatchJobStatus):
            return self.value == other.value
        if isinstance(other, str):
            return _canonical_status(self.value) == _canonical_status(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def _normalise(cls, value: str) -> str:
        return value.strip().upper()

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return _STATUS_ALIASES

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change: COMPLETED, FAILED, EXPIRED or CANCELLED."""
        return self.value in _TERMINAL


_TERMINAL = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})
_STATUS_ALIASES = {"CANCELLING": "CANCELING", "CANCELED": "CANCELLED"}


def _canonical_status(text: str) -> str:
    normalised = text.strip().upper()
    return _STATUS_ALIASES.get(normalised, normalised)


class FilePurpose(_TolerantStrEnum):
    """What a file is for. Unknown purposes are kept as they came."""

    BATCH_API = "batch-api"
    BATCH_GENERATED = "batch-generated"
    FINE_TUNE = "fine-tune"
    EVAL = "eval"
    EVAL_SAMPLE = "eval-sample"
    EVAL_OUTPUT = "eval-output"
    EVAL_SUMMARY = "eval-summary"
    CALIBRATION = "calibration"

    @classmethod
    def _normalise(cls, value: str) -> str:
        return value.strip().lower()


class BatchEndpoint(str, enum.Enum):
    """The endpoints a batch job can run against."""

    CHAT_COMPLETIONS = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    AUDIO_TRANSCRIPTIONS = "/v1/audio/transcriptions"
    AUDIO_TRANSLATIONS = "/v1/audio/translations"

    def __str__(self) -> str:
        return str(self.value)


EndpointPath = Literal[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
]
"""The endpoint paths as literals, so a type checker catches a typo'd one."""

Endpoint = BatchEndpoint | EndpointPath
"""What an `endpoint=` argument takes: a BatchEndpoint or its path."""


# Not slotted: a frozen slotted class sets each of the 26 fields through object.__setattr__,
# which made building a job cost more than everything else in turning a poll's JSON into
# one. Dict-backed instances are filled by plain dict stores (and take ~120 bytes more).
@attrs.frozen(kw_only=True, slots=False)
class BatchJob:
    """A batch job: Together's fields plus the OpenAI-style fields of the seed docs.

    Everything but `id` may be missing from a given response. `warning` is the server's
    warning from `create_batch`, when it sent one.
    """

    id: str
    status: BatchJobStatus | None = None
    user_id: str | None = None
    input_file_id: str | None = None
    file_size_bytes: int | None = None
    endpoint: str | None = None
    progress: float | None = None
    model_id: str | None = None
    priority: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    created_at: datetime | None = None
    job_deadline: datetime | None = None
    completed_at: datetime | None = None
    # OpenAI-style fields (the seed docs' shape).
    object: str | None = None
    errors: Any = None
    completion_window: str | None = None
    request_counts: dict[str, int] | None = None
    in_progress_at: datetime | None = None
    expires_at: datetime | None = None
    finalizing_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    warning: str | None = None

    @property
    def is_terminal(self) -> bool:
        """True when the status is COMPLETED, FAILED, EXPIRED or CANCELLED."""
        return self.status is not None and self.status.is_terminal


@attrs.frozen(kw_only=True)
class FileObject:
    """A file stored by the API (the spec's FileResponse)."""

    id: str
    object: str | None = "file"
    created_at: datetime | None = None
    filename: str | None = None
    bytes: int | None = None
    purpose: FilePurpose | None = None
    file_type: str | None = None
    processed: bool | None = None
    line_count: int | None = None
    processing_status: str | None = None
    validation_report: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class FileList:
    """The answer of `GET /files`: iterate it or read `.data`."""

    data: list[FileObject] = attrs.field(factory=list)

    def __iter__(self) -> Iterator[FileObject]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> FileObject:
        return self.data[index]


@attrs.frozen(kw_only=True)
class FileDeleteResponse:
    """The answer of `DELETE /files/{id}`."""

    id: str
    deleted: bool = False


@attrs.frozen(kw_only=True)
class DownloadedFile:
    """A remote file written to local disk by `files.retrieve_content`."""

    id: str
    path: Path
    bytes: int

    @property
    def filename(self) -> str:
        """The local path as a string."""
        return str(self.path)


@attrs.frozen(kw_only=True)
class BatchRequest:
    """One line of a batch input file. `method` and `url` are omitted on the wire when unset."""

    custom_id: str
    body: dict[str, Any]
    method: str | None = None
    url: str | None = None


class _Unread:
    """The body of a BatchResult that still holds its raw line: one instance, `_UNREAD`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<body not decoded yet>"

    def __reduce__(self) -> str:
        # Pickle and copy give back the one instance, so a pickled or copied result still
        # knows its body is unread (a bare object() came back as a new object: the body).
        return "_UNREAD"


_UNREAD: Any = _Unread()


@attrs.frozen(kw_only=True, eq=False, repr=False)
class BatchResult:
    """The outcome of one request of a batch, from its output file or its error file.

    A row is `ok` when it has a 2xx status and no error. Rows from the error file carry
    `error_message` and `error_code` and usually no status.

    A result may keep the raw line it came from instead of its decoded body (`raw=`); the body
    is then decoded on first use. gather_batches holds results that way: a million decoded
    chat completions are about 20 million objects that the garbage collector walks again and
    again, while a million raw lines are a million untracked bytes objects.
    """

    custom_id: str
    status_code: int | None = None
    _body: Any = attrs.field(default=_UNREAD, alias="body")
    error_message: str | None = None
    error_code: str | None = None
    batch_id: str | None = None
    _raw: bytes | None = attrs.field(default=None, alias="raw")

    @property
    def body(self) -> Any:
        """The response body (for chat, the chat.completion object), or None."""
        body = self._body
        if body is _UNREAD:
            body = _body_of_line(self._raw)
            # Decode once: keep the body and drop the raw line, so memory does not double.
            object.__setattr__(self, "_body", body)
            object.__setattr__(self, "_raw", None)
        return body

    def _key(self) -> tuple[Any, ...]:
        return (
            self.custom_id,
            self.status_code,
            self.body,
            self.error_message,
            self.error_code,
            self.batch_id,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchResult):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # the body is a dict

    def __repr__(self) -> str:
        return (
            f"BatchResult(custom_id={self.custom_id!r}, status_code={self.status_code!r}, "
            f"body={self.body!r}, error_message={self.error_message!r}, "
            f"error_code={self.error_code!r}, batch_id={self.batch_id!r})"
        )

    @property
    def ok(self) -> bool:
        """True for a 2xx response with no error."""
        return (
            self.error_message is None
            and self.status_code is not None
            and 200 <= self.status_code < 300
        )

    @property
    def text(self) -> str | None:
        """The text of a chat or text completion (first choice), or None."""
        body = self.body
        if not isinstance(body, dict):
            return None
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        first = choices[0]
        message = first.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
        text = first.get("text")
        return text if isinstance(text, str) else None

    @property
    def usage(self) -> dict[str, int]:
        """The response's token usage (empty when it has none)."""
        return usage_of_body(self.body)


def usage_of_body(body: Any) -> dict[str, int]:
    """The integer token counts of a response body's `usage` (booleans and nulls skipped)."""
    if isinstance(body, dict):
        usage = body.get("usage")
        if isinstance(usage, dict):
            return {key: value for key, value in usage.items() if type(value) is int}
    return {}


def _body_of_line(raw: bytes | None) -> Any:
    if raw is None:
        return None
    row = orjson.loads(raw)
    response = row.get("response") if isinstance(row, dict) else None
    return response.get("body") if isinstance(response, dict) else None
