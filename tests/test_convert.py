"""The converter: wire JSON to models and back, without an event loop."""

from __future__ import annotations

from datetime import datetime, timezone

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from together_async import (
    APIResponseValidationError,
    BatchJob,
    BatchJobStatus,
    BatchRequest,
    FileObject,
    FilePurpose,
)
from together_async._convert import (
    parse_timestamp,
    result_from_row,
    structure,
    structure_file_list,
    unstructure,
    usage_of_row,
)

REAL_JOB = {
    "id": "01234567-8901-2345-6789-012345678901",
    "user_id": "user_789xyz012",
    "input_file_id": "file-input123abc456def",
    "file_size_bytes": 1048576,
    "status": "IN_PROGRESS",
    "job_deadline": "2024-01-15T15:30:00Z",
    "created_at": "2024-01-15T14:30:00Z",
    "endpoint": "/v1/chat/completions",
    "progress": 75.0,
    "model_id": "Qwen/Qwen3.5-9B",
    "output_file_id": "file-output789xyz012ghi",
    "error_file_id": "file-errors456def789jkl",
    "error": "",
    "completed_at": "2024-01-15T15:45:30Z",
}

SEED_JOB = {
    "id": "batch-abc",
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "errors": None,
    "input_file_id": "file-1",
    "completion_window": "24h",
    "status": "in_progress",
    "created_at": 1714000000,
    "in_progress_at": 1714000010,
    "expires_at": 1714086400,
    "request_counts": {"total": 10, "completed": 3, "failed": 0},
}

REAL_FILE = {
    "id": "file-1",
    "object": "file",
    "created_at": 1714000000,
    "filename": "batch.jsonl",
    "bytes": 1234,
    "purpose": "batch-api",
    "FileType": "jsonl",
    "Processed": True,
    "LineCount": 7,
}


def test_real_batch_job_parses() -> None:
    """Together's own BatchJob shape parses with ISO timestamps as aware datetimes."""
    job = structure(REAL_JOB, BatchJob)
    assert job.status is BatchJobStatus.IN_PROGRESS
    assert job.created_at == datetime(2024, 1, 15, 14, 30, tzinfo=timezone.utc)
    assert job.progress == 75.0


def test_seed_batch_job_parses() -> None:
    """The seed docs' OpenAI-style shape parses: lowercase status, unix timestamps."""
    job = structure(SEED_JOB, BatchJob)
    assert job.status == "IN_PROGRESS"
    assert job.expires_at == datetime.fromtimestamp(1714086400, tz=timezone.utc)
    assert job.request_counts == {"total": 10, "completed": 3, "failed": 0}


def test_status_compares_equal_to_uppercase_string() -> None:
    """`batch.status == "COMPLETED"` holds for a completed job, as in the seed docs."""
    job = structure({"id": "b", "status": "completed"}, BatchJob)
    assert job.status == "COMPLETED"
    assert job.is_terminal


def test_unknown_status_is_kept() -> None:
    """A status this library never heard of is kept as sent, not raised on."""
    job = structure({"id": "b", "status": "PAUSED_FOR_MAINTENANCE"}, BatchJob)
    assert job.status == "PAUSED_FOR_MAINTENANCE"
    assert job.status is not None and not job.status.is_known
    assert not job.is_terminal


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cancelling", BatchJobStatus.CANCELING),
        ("CANCELING", BatchJobStatus.CANCELING),
        ("finalizing", BatchJobStatus.FINALIZING),
        ("Expired", BatchJobStatus.EXPIRED),
    ],
)
def test_status_aliases(raw: str, expected: BatchJobStatus) -> None:
    """Status spellings of both API families map to one member."""
    assert BatchJobStatus(raw) is expected


def test_terminal_statuses() -> None:
    """Exactly COMPLETED, FAILED, EXPIRED and CANCELLED are terminal."""
    terminal = {status for status in BatchJobStatus if status.is_terminal}
    assert terminal == {
        BatchJobStatus.COMPLETED,
        BatchJobStatus.FAILED,
        BatchJobStatus.EXPIRED,
        BatchJobStatus.CANCELLED,
    }


def test_file_object_reads_capitalised_keys() -> None:
    """FileType, Processed and LineCount map to snake_case attributes."""
    file = structure(REAL_FILE, FileObject)
    assert (file.file_type, file.processed, file.line_count) == ("jsonl", True, 7)
    assert file.purpose is FilePurpose.BATCH_API


def test_unknown_purpose_is_kept() -> None:
    """A purpose added by the server later is kept, not raised on."""
    file = structure({**REAL_FILE, "purpose": "distillation"}, FileObject)
    assert file.purpose == "distillation"


def test_file_list_accepts_bare_array() -> None:
    """GET /files may answer {"data": [...]} or a bare array."""
    assert len(structure_file_list({"data": [REAL_FILE]})) == 1
    assert len(structure_file_list([REAL_FILE, REAL_FILE])) == 2


def test_missing_id_raises_validation_error_with_path() -> None:
    """A job without an id is a protocol violation that names the field."""
    with pytest.raises(APIResponseValidationError, match="id"):
        structure({"status": "COMPLETED"}, BatchJob)


def test_timestamp_with_nanoseconds() -> None:
    """Go-style timestamps with nine fractional digits parse on every supported Python."""
    parsed = parse_timestamp("2024-01-15T14:30:00.123456789Z")
    assert parsed == datetime(2024, 1, 15, 14, 30, 0, 123456, tzinfo=timezone.utc)


@given(
    moment=st.datetimes(timezones=st.just(timezone.utc)),
    extra_digits=st.text("0123456789", max_size=3),
    suffix=st.sampled_from(["Z", "z", "+00:00"]),
)
def test_timestamp_fraction_is_cut_to_microseconds(
    moment: datetime, extra_digits: str, suffix: str
) -> None:
    """Up to nine fractional digits and any UTC spelling give the same microsecond-exact
    moment (digits past the sixth are cut, not rounded)."""
    text = moment.replace(tzinfo=None).isoformat(timespec="microseconds") + extra_digits
    assert parse_timestamp(text + suffix) == moment


def test_naive_timestamp_is_taken_as_utc() -> None:
    """A timestamp without an offset is read as UTC, so every datetime is aware."""
    parsed = parse_timestamp("2024-01-15T14:30:00")
    assert parsed is not None and parsed.tzinfo is timezone.utc


def test_batch_request_omits_unset_fields() -> None:
    """Request models leave method and url off the wire when unset."""
    request = BatchRequest(custom_id="r1", body={"model": "m"})
    assert unstructure(request) == {"custom_id": "r1", "body": {"model": "m"}}


def test_job_unstructures_to_plain_json() -> None:
    """A job round-trips to JSON-ready data with plain strings for enums."""
    data = unstructure(structure(REAL_JOB, BatchJob))
    assert data["status"] == "IN_PROGRESS" and type(data["status"]) is str
    assert data["created_at"] == "2024-01-15T14:30:00+00:00"


def test_result_from_output_line() -> None:
    """An output line becomes an ok result with the completion text."""
    result = result_from_row(
        {
            "custom_id": "r1",
            "response": {
                "status_code": 200,
                "body": {"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 5}},
            },
        }
    )
    assert result.ok and result.text == "hi" and result.usage == {"total_tokens": 5}


def test_result_from_error_line() -> None:
    """An error-file line becomes a failed result with message and code."""
    result = result_from_row(
        {
            "custom_id": "r7",
            "error": {"message": "Invalid model specified", "code": "invalid_model"},
        }
    )
    assert not result.ok
    assert (result.error_message, result.error_code) == ("Invalid model specified", "invalid_model")


def test_result_with_error_status_and_no_error_is_failed() -> None:
    """An output row with status >= 400 and no error object still counts as failed."""
    result = result_from_row(
        {
            "custom_id": "r2",
            "response": {"status_code": 429, "body": {"error": {"message": "slow down"}}},
            "error": None,
        }
    )
    assert not result.ok and result.error_message == "slow down"


def test_result_line_without_custom_id_raises() -> None:
    """A result line with no custom_id is rejected with a clear message."""
    with pytest.raises(ValueError, match="custom_id"):
        result_from_row({"response": {"status_code": 200}})


_JOB_FIELDS = {field.name for field in attrs.fields(BatchJob)}
_FILE_FIELDS = {field.name for field in attrs.fields(FileObject)} | {
    "FileType",
    "Processed",
    "LineCount",
}
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_timestamps = (
    st.none()
    | st.integers(min_value=0, max_value=4_000_000_000)
    | st.datetimes(timezones=st.just(timezone.utc)).map(
        lambda dt: dt.isoformat().replace("+00:00", "Z")
    )
)

_schema_jobs = st.fixed_dictionaries(
    {"id": st.text(min_size=1)},
    optional={
        "user_id": st.text(),
        "input_file_id": st.text(),
        "file_size_bytes": st.integers(min_value=0),
        "status": st.sampled_from(
            ["VALIDATING", "IN_PROGRESS", "COMPLETED", "FAILED", "EXPIRED", "CANCELLED"]
        )
        | st.text(),
        "job_deadline": _timestamps,
        "created_at": _timestamps,
        "endpoint": st.text(),
        "progress": st.floats(min_value=0, max_value=100),
        "model_id": st.text(),
        "output_file_id": st.text(),
        "error_file_id": st.text(),
        "error": st.text(),
        "completed_at": _timestamps,
    },
)


@given(
    job=_schema_jobs,
    extra=st.dictionaries(
        st.text(min_size=1).filter(lambda key: key not in _JOB_FIELDS), _json_scalars, max_size=4
    ),
)
def test_any_schema_valid_job_parses(job: dict[str, object], extra: dict[str, object]) -> None:
    """Any schema-valid BatchJob, with unknown statuses and extra keys, parses."""
    payload = {**extra, **job}
    parsed = structure(payload, BatchJob)
    assert parsed.id == job["id"]
    if "status" in job:
        assert parsed.status == job["status"].strip().upper() or parsed.status == job["status"]


_schema_files = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1),
        "object": st.just("file"),
        "created_at": st.integers(min_value=0, max_value=4_000_000_000),
        "filename": st.text(),
        "bytes": st.integers(min_value=0),
        "purpose": st.sampled_from(
            [
                "fine-tune",
                "eval",
                "eval-sample",
                "eval-output",
                "eval-summary",
                "batch-generated",
                "batch-api",
            ]
        )
        | st.text(),
        "FileType": st.sampled_from(["csv", "jsonl", "parquet"]),
        "Processed": st.booleans(),
    }
)


@given(
    file=_schema_files,
    extra=st.dictionaries(
        st.text(min_size=1).filter(lambda key: key not in _FILE_FIELDS), _json_scalars, max_size=4
    ),
)
def test_any_schema_valid_file_parses(file: dict[str, object], extra: dict[str, object]) -> None:
    """Any schema-valid FileResponse, with unknown purposes and extra keys, parses."""
    parsed = structure({**extra, **file}, FileObject)
    assert parsed.id == file["id"] and parsed.file_type == file["FileType"]


_OUTPUT_LINE = (
    b'{"custom_id":"r1","response":{"status_code":200,"body":'
    b'{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"total_tokens":5}}}}'
)


def test_result_with_raw_line_decodes_its_body_on_use() -> None:
    """A result kept as its raw line has the same body, text and usage as a decoded one."""
    row = orjson.loads(_OUTPUT_LINE)
    lazy = result_from_row(row, raw=_OUTPUT_LINE)
    assert lazy.text == "hi" and lazy.usage == {"prompt_tokens": 3, "total_tokens": 5}
    assert lazy == result_from_row(row)


def test_result_with_raw_line_repr_shows_the_body() -> None:
    """repr of a lazily decoded result shows the body, not the raw bytes."""
    lazy = result_from_row(orjson.loads(_OUTPUT_LINE), raw=_OUTPUT_LINE)
    assert "'content': 'hi'" in repr(lazy) and "raw" not in repr(lazy)


def test_usage_of_row_reads_integer_counts_only() -> None:
    """usage_of_row sums nothing but integer counts (booleans and nulls are skipped)."""
    row = {"custom_id": "a", "response": {"body": {"usage": {"a": 1, "b": True, "c": None}}}}
    assert usage_of_row(row) == {"a": 1}
