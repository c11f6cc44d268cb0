"""The converter: wire JSON to models and back, without an event loop."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
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
    BatchResult,
    FileObject,
    FilePurpose,
    _convert,
)
from together_async._convert import (
    converter,
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


@given(moment=st.datetimes(timezones=st.just(timezone.utc)), suffix=st.sampled_from(["Z", "z"]))
def test_timestamp_with_trailing_zeros_dropped_parses(moment: datetime, suffix: str) -> None:
    """Go's RFC 3339 form drops trailing zeros of the fraction ("...:00.5Z"): any length from
    1 to 6 digits gives the same moment, on every supported Python."""
    text = moment.replace(tzinfo=None).isoformat(timespec="microseconds").rstrip("0")
    assert parse_timestamp(text.rstrip(".") + suffix) == moment


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


def test_result_with_raw_line_survives_pickle() -> None:
    """A result still holding its raw line keeps its body through pickle (multiprocessing)."""
    lazy = result_from_row(orjson.loads(_OUTPUT_LINE), raw=_OUTPUT_LINE)
    restored = pickle.loads(pickle.dumps(lazy))
    assert restored.body == orjson.loads(_OUTPUT_LINE)["response"]["body"]
    assert restored == lazy


def test_result_with_raw_line_survives_deepcopy() -> None:
    """copy.deepcopy of a result still holding its raw line keeps its body."""
    lazy = result_from_row(orjson.loads(_OUTPUT_LINE), raw=_OUTPUT_LINE)
    assert copy.deepcopy(lazy).text == "hi"


def test_result_unstructures_to_its_public_fields() -> None:
    """unstructure gives a result's public fields, the body decoded even from a raw line."""
    lazy = result_from_row(orjson.loads(_OUTPUT_LINE), raw=_OUTPUT_LINE, batch_id="b")
    assert unstructure(lazy) == {
        "custom_id": "r1",
        "status_code": 200,
        "body": orjson.loads(_OUTPUT_LINE)["response"]["body"],
        "error_message": None,
        "error_code": None,
        "batch_id": "b",
    }


def test_result_round_trips_through_the_converter() -> None:
    """structure(unstructure(result), BatchResult) gives back an equal result, body included."""
    result = BatchResult(custom_id="a", status_code=400, body={"x": 1}, error_message="bad")
    assert structure(unstructure(result), BatchResult) == result


def test_result_usage_reads_integer_counts_only() -> None:
    """BatchResult.usage skips booleans and nulls, as usage_of_row does."""
    result = BatchResult(custom_id="a", status_code=200, body={"usage": {"a": 1, "b": True}})
    assert result.usage == {"a": 1}


def test_usage_of_row_reads_integer_counts_only() -> None:
    """usage_of_row sums nothing but integer counts (booleans and nulls are skipped)."""
    row = {"custom_id": "a", "response": {"body": {"usage": {"a": 1, "b": True, "c": None}}}}
    assert usage_of_row(row) == {"a": 1}


# -- the fast BatchJob / FileObject hooks agree with cattrs' generated ones -----------------

_any_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3)
    ),
    max_leaves=6,
)
_wire_values = (
    _any_json
    | _timestamps
    | st.sampled_from(
        [
            "2024-01-15T14:30:00.123456789Z",
            "2024-01-15T14:30:00z",
            " 2024-01-15T14:30:00+02:00 ",
            "2024-01-15",
            "",
            "not a time",
            "completed",
            "batch-api",
            "Expired",
        ]
    )
    | st.floats(min_value=-1e12, max_value=1e12)
    | st.dictionaries(st.text(max_size=4), st.integers() | st.booleans(), max_size=3)
)


_TYPED_VALUES: dict[Callable[[object], object] | None, st.SearchStrategy[object]] = {
    None: st.text(max_size=8),  # a str field
    _convert._fast_int: st.integers() | st.integers(min_value=-(2**70), max_value=2**70),
    _convert._fast_float: st.floats() | st.integers(min_value=-(2**60), max_value=2**60),
    _convert._fast_bool: st.booleans(),
    _convert._fast_time: _timestamps | _wire_values | st.floats(),
    _convert._fast_status: st.sampled_from([status.value for status in BatchJobStatus]) | st.text(),
    _convert._fast_purpose: st.sampled_from([purpose.value for purpose in FilePurpose]) | st.text(),
    _convert._fast_any: _any_json,
    _convert._fast_int_counts: st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    _convert._fast_json_object: st.dictionaries(st.text(max_size=4), _any_json, max_size=3),
}


def _wire_objects(table: _convert._FieldTable) -> st.SearchStrategy[object]:
    """Objects whose values are mostly of their field's JSON type, sometimes null, sometimes
    anything at all, with unknown keys and sometimes a missing or odd id."""
    keys = sorted(table)
    pairs = st.sampled_from(keys).flatmap(
        lambda key: st.tuples(
            st.just(key), st.one_of(_TYPED_VALUES[table[key][1]], st.none(), _wire_values)
        )
    )
    objects = st.lists(pairs | st.tuples(st.text(max_size=3), _any_json), max_size=8).map(dict)
    ids = st.text(max_size=8) | _any_json
    return objects.flatmap(
        lambda fields: st.one_of(
            ids.map(lambda identifier: {"id": identifier, **fields}),
            ids.map(lambda identifier: {**fields, "id": identifier}),
            st.just(fields),
        )
    )


def _outcome(hook: Callable[[object, type], object], value: object, cls: type) -> str:
    try:
        return repr(hook(value, cls))
    except Exception as exc:
        return f"raises {type(exc).__name__}: {exc}"


@given(value=_wire_objects(_convert._JOB_FIELDS) | _any_json)
def test_fast_job_structuring_matches_cattrs(value: object) -> None:
    """Any input gives the same BatchJob (or a failure) through the fast hook as through
    cattrs' generated one: same coercions of wrong types, same tolerance."""
    fast = _outcome(converter.get_structure_hook(BatchJob), value, BatchJob)
    assert fast == _outcome(_convert._structure_job_generated, value, BatchJob)


@given(value=_wire_objects(_convert._FILE_FIELDS) | _any_json)
def test_fast_file_structuring_matches_cattrs(value: object) -> None:
    """Any input gives the same FileObject (or a failure) through the fast hook as through
    cattrs' generated one, capitalised keys included."""
    fast = _outcome(converter.get_structure_hook(FileObject), value, FileObject)
    assert fast == _outcome(_convert._structure_file_generated, value, FileObject)


_NEAR_MISSES: list[object] = [
    *(None, True, False, 0, 1, -1, 2**60, 2**70, 10**400, 1.5, float("nan"), float("inf"), -1e300),
    *("", "12", "1.5", "x", "true", "completed", "batch-api", "2024-01-15T14:30:00Z"),
    *([], [1], {}, {"a": 1}, {"a": True}, {"a": 1.0}, {"a": "1"}, {1: 2}, {"a": None}),
]


@pytest.mark.parametrize("cls", [BatchJob, FileObject])
def test_fast_hooks_match_cattrs_field_by_field(cls: type) -> None:
    """Every field, given each of a catalogue of right, wrong and edge values, comes out the
    same through the fast hook as through cattrs' generated one."""
    table = _convert._JOB_FIELDS if cls is BatchJob else _convert._FILE_FIELDS
    reference = (
        _convert._structure_job_generated if cls is BatchJob else _convert._structure_file_generated
    )
    fast = converter.get_structure_hook(cls)
    for key in ["id", *table]:
        for value in _NEAR_MISSES:
            wire = {"id": "b", key: value}
            assert _outcome(fast, wire, cls) == _outcome(reference, wire, cls), (key, value)


def test_job_with_every_field_well_typed_parses() -> None:
    """A job carrying every field with its JSON type comes out with every field set."""
    timestamp = "2024-01-15T14:30:00.5Z"
    job = structure(
        {
            **REAL_JOB,
            **SEED_JOB,
            "warning": "w",
            "errors": {"data": []},
            "progress": 3,
            "priority": 1,
            **{f"{name}_at": timestamp for name in ("finalizing", "failed", "expired")},
            **{f"{name}_at": timestamp for name in ("cancelling", "cancelled")},
        },
        BatchJob,
    )
    assert all(value is not None for value in attrs.asdict(job).values())
    assert job.progress == 3.0 and type(job.progress) is float
    assert job.cancelled_at == datetime(2024, 1, 15, 14, 30, 0, 500000, tzinfo=timezone.utc)


def test_parsed_job_is_immutable() -> None:
    """A BatchJob cannot be changed after parsing (frozen, though not slotted)."""
    job = structure(REAL_JOB, BatchJob)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        job.status = BatchJobStatus.FAILED  # type: ignore[misc]
    assert attrs.evolve(job, progress=1.0).progress == 1.0 and job.progress == 75.0


def test_job_with_a_null_id_is_kept_as_cattrs_did() -> None:
    """A null id is turned into the string "None", as cattrs always did (not raised on)."""
    assert structure({"id": None}, BatchJob).id == "None"


def test_job_field_of_the_wrong_type_is_coerced() -> None:
    """A number where a string is expected becomes its string, a numeric string an int."""
    job = structure({"id": 7, "user_id": 5, "file_size_bytes": "12"}, BatchJob)
    assert (job.id, job.user_id, job.file_size_bytes) == ("7", "5", 12)


def test_job_field_that_cannot_be_coerced_names_the_field() -> None:
    """An uncoercible value raises APIResponseValidationError naming the field's path."""
    with pytest.raises(APIResponseValidationError, match=r"\$\.progress"):
        structure({"id": "b", "progress": "most of it"}, BatchJob)


def test_file_key_written_both_ways_takes_the_later_one() -> None:
    """FileType and file_type in one answer: the one that comes later wins."""
    file = structure({"id": "f", "FileType": "csv", "file_type": "jsonl"}, FileObject)
    assert file.file_type == "jsonl"


def test_job_list_uses_the_same_hook() -> None:
    """list[BatchJob] parses each element like a single job, errors naming the index."""
    jobs = structure([REAL_JOB, SEED_JOB], list[BatchJob])
    assert jobs == [structure(REAL_JOB, BatchJob), structure(SEED_JOB, BatchJob)]
    with pytest.raises(APIResponseValidationError, match=r"\$\[1\]\.id"):
        structure([REAL_JOB, {"status": "COMPLETED"}], list[BatchJob])


@given(
    custom_id=st.text(min_size=1),
    status=st.integers(min_value=100, max_value=599),
    # Values orjson writes as they are (it turns infinity into null, refuses huge ints).
    body=st.none()
    | st.dictionaries(
        st.text(),
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
        max_size=3,
    ),
    keep_raw=st.booleans(),
)
def test_fast_path_builds_what_the_general_path_builds(
    custom_id: str, status: int, body: object, keep_raw: bool
) -> None:
    """Any output row gives a result equal to BatchResult(...) built from its fields."""
    row = {"custom_id": custom_id, "response": {"status_code": status, "body": body}}
    raw = orjson.dumps(row) if keep_raw else None
    result = result_from_row(row, batch_id="b", raw=raw)
    expected_error = None if status < 400 else "HTTP " + str(status)
    assert result == BatchResult(
        custom_id=custom_id,
        status_code=status,
        body=body,
        error_message=expected_error,
        batch_id="b",
    )
    assert result.ok == (200 <= status < 300)


def test_fast_job_has_the_instance_dict_of_a_constructed_one() -> None:
    """A parsed job's __dict__ (vars(job)) is what BatchJob(...) builds, keys in field order."""
    job = structure(REAL_JOB, BatchJob)
    constructed = BatchJob(
        **{field.name: getattr(job, field.name) for field in attrs.fields(BatchJob)}
    )
    assert list(vars(job).items()) == list(vars(constructed).items())
