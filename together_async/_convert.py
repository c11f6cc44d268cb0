"""The one cattrs converter of together_async and its hooks (the only module importing cattrs).

Wire JSON -> models: timestamps as ISO strings or unix ints, the capitalised FileResponse keys,
tolerant enums, unknown keys ignored. Models -> wire JSON: unset request fields omitted.
Result lines of batch output/error files are decoded by a plain function, as that is a hot path;
BatchJob and FileObject have fast hooks that leave any unusual input to cattrs.
"""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.orjson import make_converter

from ._errors import APIResponseValidationError
from ._models import (
    _UNREAD,
    BatchJob,
    BatchJobStatus,
    BatchRequest,
    BatchResult,
    FileList,
    FileObject,
    FilePurpose,
    usage_of_body,
)

__all__ = [
    "converter",
    "ok_result",
    "parse_timestamp",
    "result_from_row",
    "structure",
    "unstructure",
    "usage_of_row",
]

T = TypeVar("T")

converter = make_converter()

# Python 3.10's fromisoformat knows no "Z" and only fractions of 3 or 6 digits, while Go
# (RFC 3339 with nanoseconds) writes 1 to 9, trailing zeros dropped.
_FRACTION = re.compile(r"\.(\d+)")


def _six_digit_fraction(match: re.Match[str]) -> str:
    return "." + (match.group(1) + "00000")[:6]


def parse_timestamp(value: Any) -> datetime | None:
    """A timezone-aware datetime from an ISO-8601 string or a unix timestamp; None for empty."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        return _parse_iso(value)
    raise ValueError(f"not a timestamp: {value!r}")


# Python 3.11+ reads a "Z" and any number of fractional digits (cutting them to 6) itself.
_FROMISOFORMAT_READS_Z = sys.version_info >= (3, 11)


def _parse_iso(value: str) -> datetime:
    parsed = None
    if _FROMISOFORMAT_READS_Z:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass  # spaces around it, a lower-case "z": the careful path below
    if parsed is None:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            # Only Python 3.10 needs the fraction made 6 digits long; doing it up front
            # cost every timestamp a regex pass.
            parsed = datetime.fromisoformat(_FRACTION.sub(_six_digit_fraction, text))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _structure_datetime(value: Any, _: Any) -> datetime | None:
    return parse_timestamp(value)


converter.register_structure_hook(datetime, _structure_datetime)
converter.register_unstructure_hook(datetime, lambda dt: dt.isoformat())
converter.register_structure_hook(BatchJobStatus, lambda value, _: BatchJobStatus(str(value)))
converter.register_structure_hook(FilePurpose, lambda value, _: FilePurpose(str(value)))
converter.register_unstructure_hook(BatchJobStatus, lambda status: status.value)
converter.register_unstructure_hook(FilePurpose, lambda purpose: purpose.value)

# FileResponse spells some keys capitalised; accept the snake_case forms too.
_FILE_KEY_ALIASES = {"FileType": "file_type", "Processed": "processed", "LineCount": "line_count"}
_structure_file_plain = converter.get_structure_hook(FileObject)


def _structure_file_generated(value: Any, _: Any) -> FileObject:
    if isinstance(value, dict):
        value = {_FILE_KEY_ALIASES.get(key, key): item for key, item in value.items()}
    return _structure_file_plain(value, FileObject)  # type: ignore[no-any-return]


_structure_job_generated = converter.get_structure_hook(BatchJob)

# BatchJob and FileObject are structured on every poll, so they get fast hooks: cattrs'
# generated ones spend most of their time in per-field Optional dispatch. A response whose
# every field already has its declared JSON type (nearly all of them) is built directly;
# anything else (a wrong type, a missing or non-string id, a bad timestamp) goes to cattrs'
# generated hook, so coercions and error messages stay exactly cattrs'. tests/test_convert.py
# checks that both paths agree on arbitrary input.


_UNUSABLE: Any = object()  # a value the fast path leaves to cattrs

# One function per declared field type: the value if `item` (never None) already has that
# JSON type, else _UNUSABLE.


def _fast_int(item: Any) -> Any:
    return item if type(item) is int else _UNUSABLE  # a bool is not an int here


def _fast_float(item: Any) -> Any:
    item_type = type(item)
    if item_type is float:
        return item
    if item_type is int:
        try:
            return float(item)
        except OverflowError:
            return _UNUSABLE
    return _UNUSABLE


def _fast_bool(item: Any) -> Any:
    return item if type(item) is bool else _UNUSABLE


def _fast_time(item: Any) -> Any:
    item_type = type(item)
    if item_type is str:
        if not item:
            return None
        try:
            return _parse_iso(item)
        except ValueError:
            return _UNUSABLE
    if item_type is int or item_type is float:
        try:
            return parse_timestamp(item)
        except (ValueError, OverflowError, OSError):
            return _UNUSABLE
    return _UNUSABLE


# An enum call costs ~0.4 us; a dict lookup finds the members as the API spells them.
_STATUS_BY_VALUE: dict[str, BatchJobStatus] = {status.value: status for status in BatchJobStatus}
_PURPOSE_BY_VALUE: dict[str, FilePurpose] = {purpose.value: purpose for purpose in FilePurpose}


def _fast_status(item: Any) -> Any:
    if type(item) is not str:
        return _UNUSABLE
    return _STATUS_BY_VALUE.get(item) or BatchJobStatus(item)


def _fast_purpose(item: Any) -> Any:
    if type(item) is not str:
        return _UNUSABLE
    return _PURPOSE_BY_VALUE.get(item) or FilePurpose(item)


def _fast_any(item: Any) -> Any:
    return item


def _fast_int_counts(item: Any) -> Any:
    if type(item) is dict and all(
        type(key) is str and type(count) is int for key, count in item.items()
    ):
        return dict(item)
    return _UNUSABLE


def _fast_json_object(item: Any) -> Any:
    if type(item) is dict and all(type(key) is str for key in item):
        return dict(item)
    return _UNUSABLE


_FAST_BY_TYPE: dict[Any, Callable[[Any], Any] | None] = {
    str: None,  # most fields: checked inline, which saves a call per field
    int: _fast_int,
    float: _fast_float,
    bool: _fast_bool,
    datetime: _fast_time,
    BatchJobStatus: _fast_status,
    FilePurpose: _fast_purpose,
    Any: _fast_any,
    dict[str, int]: _fast_int_counts,
    dict[str, Any]: _fast_json_object,
}

#: Wire key -> (field name, fast function, or None for a str field).
_FieldTable = dict[str, tuple[str, Callable[[Any], Any] | None]]


def _field_table(cls: type[Any], aliases: dict[str, str]) -> _FieldTable:
    """Wire key -> (field name, fast function) for every field of `cls` but `id`.

    Raises at import for a field type the fast path does not know, so a new model field
    cannot silently take a wrong path.
    """
    hints = typing.get_type_hints(cls)
    table: _FieldTable = {}
    for field in attrs.fields(cls):
        if field.name == "id":
            continue  # checked first: it must be a str, never None
        declared = hints[field.name]
        if declared is not Any:
            args = typing.get_args(declared)
            if len(args) != 2 or type(None) not in args:
                raise TypeError(f"{cls.__name__}.{field.name}: expected T | None, got {declared}")
            declared = next(arg for arg in args if arg is not type(None))
        table[field.name] = (field.name, _FAST_BY_TYPE[declared])
    for alias, name in aliases.items():
        table[alias] = table[name]
    return table


def _fast_fields(value: Any, table: _FieldTable) -> dict[str, Any] | None:
    """The constructor arguments for `value`, or None when cattrs must decide."""
    if type(value) is not dict:
        return None
    identifier = value.get("id")
    if type(identifier) is not str:
        return None
    fields: dict[str, Any] = {"id": identifier}
    # A capitalised key and its snake_case form: the later one wins, as with cattrs.
    for key, item in value.items():
        entry = table.get(key)
        if entry is None:
            continue  # "id", or a key this version does not know
        name, fast = entry
        if item is None:
            fields[name] = None
        elif fast is None:
            if type(item) is not str:
                return None
            fields[name] = item
        else:
            item = fast(item)
            if item is _UNUSABLE:
                return None
            fields[name] = item
    return fields


_JOB_FIELDS = _field_table(BatchJob, {})
_FILE_FIELDS = _field_table(FileObject, _FILE_KEY_ALIASES)


def _job_defaults() -> dict[str, Any]:
    # Every field, "id" too (always overwritten), so a job's __dict__ keeps the field order
    # that BatchJob(...) gives it.
    defaults = {field.name: field.default for field in attrs.fields(BatchJob)}
    # Shared by every job built below: only immutable defaults, and nothing for __init__ to
    # run (no converter, validator, __attrs_pre_init__ or __attrs_post_init__). Checked here,
    # at import.
    if any(default is not None for name, default in defaults.items() if name != "id") or any(
        field.converter is not None or field.validator is not None
        for field in attrs.fields(BatchJob)
    ):
        raise TypeError("BatchJob's fast construction needs None defaults and plain fields")
    for hook in ("__attrs_pre_init__", "__attrs_post_init__"):
        if hasattr(BatchJob, hook):
            raise TypeError(f"BatchJob's fast construction cannot run {hook}")
    return defaults


_JOB_DEFAULTS = _job_defaults()
_new_instance = object.__new__
_set_attribute = object.__setattr__


def _structure_job(value: Any, _: Any) -> BatchJob:
    fields = _fast_fields(value, _JOB_FIELDS)
    if fields is None:
        return _structure_job_generated(value, BatchJob)  # type: ignore[no-any-return]
    # What BatchJob(**fields) builds (the class is dict-backed), without the keyword
    # expansion and attrs' __init__: a poll of many jobs builds one per job per tick.
    state = _JOB_DEFAULTS.copy()
    state.update(fields)
    job: BatchJob = _new_instance(BatchJob)
    _set_attribute(job, "__dict__", state)
    return job


def _structure_file(value: Any, _: Any) -> FileObject:
    fields = _fast_fields(value, _FILE_FIELDS)
    if fields is None:
        return _structure_file_generated(value, FileObject)
    return FileObject(**fields)


converter.register_structure_hook(BatchJob, _structure_job)
converter.register_structure_hook(FileObject, _structure_file)
# structure() calls these directly: cattrs' dispatch costs as much as a third of a fast hook.
_FAST_HOOKS: dict[Any, Callable[[Any, Any], Any]] = {
    BatchJob: _structure_job,
    FileObject: _structure_file,
}
converter.register_unstructure_hook(
    BatchRequest,
    make_dict_unstructure_fn(
        BatchRequest,
        converter,
        method=override(omit_if_default=True),
        url=override(omit_if_default=True),
    ),
)


def _unstructure_result(result: BatchResult) -> dict[str, Any]:
    # The public fields under their public names: never the raw line a result may keep, nor
    # the placeholder of a body not decoded yet.
    return {
        "custom_id": result.custom_id,
        "status_code": result.status_code,
        "body": converter.unstructure(result.body),
        "error_message": result.error_message,
        "error_code": result.error_code,
        "batch_id": result.batch_id,
    }


converter.register_unstructure_hook(BatchResult, _unstructure_result)
converter.register_structure_hook(
    BatchResult,
    make_dict_structure_fn(
        BatchResult,
        converter,
        _body=override(rename="body"),
        _raw=override(omit=True),
    ),
)


def structure(value: Any, cls: type[T]) -> T:
    """Turn decoded wire JSON into a model, or raise APIResponseValidationError saying where."""
    try:
        hook = _FAST_HOOKS.get(cls)
        if hook is not None:
            return hook(value, cls)  # type: ignore[no-any-return]
        return converter.structure(value, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            detail = "; ".join(cattrs.transform_error(exc))
        else:
            detail = str(exc)
        raise APIResponseValidationError(
            f"unexpected {cls.__name__} in response: {detail}"
        ) from None


def structure_file_list(value: Any) -> FileList:
    """`GET /files` answers `{"data": [...]}`; a bare array is accepted too."""
    if isinstance(value, list):
        value = {"data": value}
    return structure(value, FileList)


def unstructure(value: Any) -> Any:
    """A model as plain JSON-ready data (datetimes as ISO strings, enums as their values)."""
    return converter.unstructure(value)


# BatchResult's slots, written through their descriptors: for the hot path of every results
# file, what BatchResult(...) does minus attrs' __init__ and object.__setattr__'s lookups (a
# third of the time of building a result; tests/test_convert.py checks the two agree).
_set_custom_id = BatchResult.__dict__["custom_id"].__set__
_set_status_code = BatchResult.__dict__["status_code"].__set__
_set_body = BatchResult.__dict__["_body"].__set__
_set_error_message = BatchResult.__dict__["error_message"].__set__
_set_error_code = BatchResult.__dict__["error_code"].__set__
_set_batch_id = BatchResult.__dict__["batch_id"].__set__
_set_raw = BatchResult.__dict__["_raw"].__set__


def ok_result(
    custom_id: str, status_code: int, body: Any, batch_id: str | None, raw: bytes | None
) -> BatchResult:
    """A 2xx result with no error, as BatchResult(...) would build it (pass `_UNREAD` as the
    body with `raw`). For the hot paths, which have checked the row's shape themselves."""
    result: BatchResult = _new_instance(BatchResult)
    _set_custom_id(result, custom_id)
    _set_status_code(result, status_code)
    _set_body(result, body)
    _set_error_message(result, None)
    _set_error_code(result, None)
    _set_batch_id(result, batch_id)
    _set_raw(result, raw)
    return result


def result_from_row(row: Any, batch_id: str | None = None, raw: bytes | None = None) -> BatchResult:
    """One decoded line of an output or error file as a BatchResult.

    With `raw` (the line `row` was decoded from), the result keeps that line instead of the
    decoded body and decodes it again on first use of `.body` (see BatchResult).

    Output lines: `{"custom_id", "response": {"status_code", "body"}}` (OpenAI-style lines
    also carry `"id"` and `"error": null`). Error lines: `{"custom_id", "error": {"message",
    "code"}}`. Raises ValueError for a line with neither shape.
    """
    # The common row first: a 2xx response and no error, built without the general checks.
    if type(row) is dict:
        response = row.get("response")
        if type(response) is dict and row.get("error") is None:
            code = response.get("status_code")
            custom_id = row.get("custom_id")
            if type(code) is int and 200 <= code < 300 and type(custom_id) is str:
                body: Any = response.get("body")
                if raw is not None and body is not None:
                    return ok_result(custom_id, code, _UNREAD, batch_id, raw)
                return ok_result(custom_id, code, body, batch_id, None)
    if not isinstance(row, dict):
        raise ValueError("result line is not a JSON object")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str):
        raise ValueError("result line has no string custom_id")
    status_code: int | None = None
    body = None
    response = row.get("response")
    if isinstance(response, dict):
        code = response.get("status_code")
        status_code = code if isinstance(code, int) and not isinstance(code, bool) else None
        body = response.get("body")
    error = row.get("error")
    error_message: str | None = None
    error_code: str | None = None
    if isinstance(error, dict):
        message = error.get("message")
        error_message = str(message) if message is not None else "unknown error"
        code_value = error.get("code")
        error_code = str(code_value) if code_value is not None else None
    elif isinstance(error, str):
        error_message = error
    elif response is None and error is None:
        raise ValueError(f"result line for {custom_id!r} has neither response nor error")
    if error_message is None and status_code is not None and status_code >= 400:
        error_message = _message_from_body(body) or f"HTTP {status_code}"
    if raw is not None and body is not None:
        return BatchResult(
            custom_id=custom_id,
            status_code=status_code,
            error_message=error_message,
            error_code=error_code,
            batch_id=batch_id,
            raw=raw,
        )
    return BatchResult(
        custom_id=custom_id,
        status_code=status_code,
        body=body,
        error_message=error_message,
        error_code=error_code,
        batch_id=batch_id,
    )


def usage_of_row(row: Any) -> dict[str, int]:
    """The token usage of a decoded output line (empty when it has none)."""
    response = row.get("response") if isinstance(row, dict) else None
    return usage_of_body(response.get("body") if isinstance(response, dict) else None)


def _message_from_body(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message") is not None:
            return str(error["message"])
        if isinstance(error, str):
            return error
    return None
