"""The file work behind gather, without a server: shard writing and per-row accounting."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from together_async import BatchFileError, BatchResult
from together_async._convert import result_from_row, usage_of_row
from together_async._jsonl import check_batch_file
from together_async._sharding import (
    InputSharder,
    ShardAccounting,
    _add_usage,
    ids_path,
    is_retryable,
)
from together_async.manifest import decode_positions

CHAT = "/v1/chat/completions"


def sharder(directory: Path, *, source: str | None = None, **limits: int) -> InputSharder:
    return InputSharder(
        directory,
        endpoint=CHAT,
        model="m",
        max_lines=limits.get("max_lines", 50_000),
        max_bytes=limits.get("max_bytes", 100 * 1024 * 1024),
        source=source,
        fingerprint_settings={"endpoint": CHAT},
    )


def body(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def settle_file(accounting: ShardAccounting, path: Path) -> list[tuple[int, BatchResult]]:
    """Settle a small results file in one go (gather reads real ones a chunk at a time)."""
    return accounting.settle(path.read_bytes().splitlines(), source=path.name)


def test_rows_are_normalised_into_request_lines(tmp_path: Path) -> None:
    """Bare bodies are wrapped with a generated id and the default model, custom_id first."""
    writer = sharder(tmp_path)
    writer.add_items([body("a"), {"custom_id": "x", "body": {"model": "own", **body("b")}}])
    writer.finish()
    assert (tmp_path / "shard-00000.jsonl").read_bytes().splitlines() == [
        b'{"custom_id":"request-0","body":{"model":"m","messages":[{"role":"user","content":"a"}]}}',
        b'{"custom_id":"x","body":{"model":"own","messages":[{"role":"user","content":"b"}]}}',
    ]


def test_shards_never_pass_either_limit(tmp_path: Path) -> None:
    """Shards split at max_lines or before max_bytes, whichever comes first."""
    writer = sharder(tmp_path, max_lines=4, max_bytes=300)
    writer.add_items([body("x" * (10 if i % 2 else 60)) for i in range(20)])
    writer.finish()
    assert all(shard.lines <= 4 and shard.bytes <= 300 for shard in writer.shards)
    assert sum(shard.lines for shard in writer.shards) == 20
    for shard in writer.shards:
        assert (tmp_path / shard.name).stat().st_size == shard.bytes


def test_the_fingerprint_follows_the_rows(tmp_path: Path) -> None:
    """The same rows give the same fingerprint; one changed row gives another."""

    def fingerprint(texts: list[str], directory: Path) -> str:
        directory.mkdir()
        writer = sharder(directory)
        writer.add_items([body(text) for text in texts])
        return writer.finish()

    first = fingerprint(["a", "b"], tmp_path / "1")
    assert fingerprint(["a", "b"], tmp_path / "2") == first
    assert fingerprint(["a", "c"], tmp_path / "3") != first


def test_a_file_with_crlf_and_a_bom_is_read(tmp_path: Path) -> None:
    """An input file may have CRLF line endings and a BOM; its shard file has neither."""
    source = tmp_path / "in.jsonl"
    bom = b"\xef\xbb\xbf"
    source.write_bytes(bom + orjson.dumps(body("a")) + b"\r\n" + orjson.dumps(body("b")))
    (tmp_path / "out").mkdir()
    writer = sharder(tmp_path / "out", source=str(source))
    with source.open("rb") as file:
        while writer.add_from_file(file):
            pass
    writer.finish()
    lines = read_lines(tmp_path / "out" / "shard-00000.jsonl")
    assert [line["body"]["messages"][0]["content"] for line in lines] == ["a", "b"]


def test_file_problems_name_their_lines(tmp_path: Path) -> None:
    """Blank lines and bad JSON in an input file are reported by line number."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(orjson.dumps(body("a")) + b"\n\n{oops\n")
    (tmp_path / "out").mkdir()
    writer = sharder(tmp_path / "out", source=str(source))
    with source.open("rb") as file:
        while writer.add_from_file(file):
            pass
    with pytest.raises(BatchFileError) as caught:
        writer.finish()
    problems = [str(problem) for problem in caught.value.problems]
    assert problems[0] == "line 2: blank line; remove blank lines, one request per line"
    assert problems[1].startswith("line 3: not valid JSON (")
    assert len(problems) == 2


def test_duplicates_after_rejected_rows_name_the_right_positions(tmp_path: Path) -> None:
    """Duplicate positions stay right when rows before them were rejected."""
    writer = sharder(tmp_path, max_lines=2)
    rows: list[Any] = [
        {"custom_id": "a", "body": body("1")},
        42,
        {"custom_id": "b", "body": body("2")},
        {"custom_id": "a", "body": body("3")},
    ]
    writer.add_items(rows)
    with pytest.raises(BatchFileError) as caught:
        writer.finish()
    assert "requests[3].custom_id: duplicates requests[0]" in str(caught.value)
    assert caught.value.problem_count == 2


def test_duplicates_after_bad_lines_of_a_file_name_the_right_lines(tmp_path: Path) -> None:
    """A duplicate after a blank or unreadable line is named by its own line number."""
    row = b'{"custom_id": "a", "body": {"model": "m"}}\n'
    (tmp_path / "in.jsonl").write_bytes(row + b"{not json\n\n" + row)
    (tmp_path / "out").mkdir()
    with pytest.raises(BatchFileError) as caught:
        shard_file(tmp_path / "out", tmp_path / "in.jsonl")
    assert [str(problem)[:6] for problem in caught.value.problems] == ["line 2", "line 3", "line 4"]
    assert "line 4: custom_id: duplicates line 1" in str(caught.value)


def test_a_request_larger_than_a_batch_is_refused(tmp_path: Path) -> None:
    """A single request over max_bytes_per_batch cannot be sharded and is reported."""
    writer = sharder(tmp_path, max_bytes=100)
    writer.add_items([body("x" * 200)])
    with pytest.raises(BatchFileError, match=r"requests\[0\]: the request is .* bytes"):
        writer.finish()


def shard_file(directory: Path, source: Path, *, model: str | None = "m", **limits: int) -> str:
    """Shard the JSONL file `source` into `directory`; the fingerprint (BatchFileError raised)."""
    writer = InputSharder(
        directory,
        endpoint=CHAT,
        model=model,
        max_lines=limits.get("max_lines", 50_000),
        max_bytes=limits.get("max_bytes", 100 * 1024 * 1024),
        source=str(source),
        fingerprint_settings={"endpoint": CHAT},
    )
    try:
        with source.open("rb") as file:
            while writer.add_from_file(file):
                pass
        return writer.finish()
    finally:
        writer.close()


def test_complete_request_lines_are_written_as_they_are(tmp_path: Path) -> None:
    """A file line that is already a whole request line goes into its shard byte for byte."""
    lines = [
        b'{"body": {"model": "own", "messages": []}, "custom_id": "b"}',
        b'{ "custom_id" : "a" , "body" : { "model" : "x" } , "method" : "POST" }',
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "out").mkdir()
    shard_file(tmp_path / "out", tmp_path / "in.jsonl")
    assert (tmp_path / "out" / "shard-00000.jsonl").read_bytes().splitlines() == lines


def test_file_lines_needing_a_change_are_rewritten(tmp_path: Path) -> None:
    """A line whose body lacks the model, or a bare body, is rebuilt with both filled in."""
    lines = [b'{"custom_id": "a", "body": {"messages": []}}', b'{"messages": []}']
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))
    (tmp_path / "out").mkdir()
    shard_file(tmp_path / "out", tmp_path / "in.jsonl")
    assert (tmp_path / "out" / "shard-00000.jsonl").read_bytes().splitlines() == [
        b'{"custom_id":"a","body":{"model":"m","messages":[]}}',
        b'{"custom_id":"request-1","body":{"model":"m","messages":[]}}',
    ]


@pytest.mark.parametrize("key", ["method", "url"])
def test_a_method_or_url_of_null_is_refused(tmp_path: Path, key: str) -> None:
    """A request row with "method" or "url" set to None is refused, as the validator does."""
    writer = sharder(tmp_path)
    writer.add_items([{"custom_id": "a", "body": body("x"), key: None}])
    with pytest.raises(BatchFileError, match=rf"requests\[0\]\.{key}"):
        writer.finish()


_MISSING = object()
_ids = st.one_of(
    st.sampled_from(["a", "b", "c", "é", "x" * 64]),
    st.text(max_size=70),
    st.sampled_from(["", "x" * 65, None, 7, ["a"]]),
    st.just(_MISSING),
)
_bodies = st.one_of(
    st.dictionaries(st.sampled_from(["model", "messages", "max_tokens"]), st.integers(0, 9)),
    st.sampled_from(["text", None, [1], 3]),
    st.just(_MISSING),
)
_methods = st.sampled_from([_MISSING, _MISSING, "POST", "FILE", "GET", None, 1])
_urls = st.sampled_from([_MISSING, _MISSING, CHAT, "/v1/embeddings", None])


@st.composite
def request_lines(draw: st.DrawFn) -> bytes:
    """One input line: a request line, most fields possibly missing or wrong, any key order,
    compact or spaced."""
    fields = {
        "custom_id": draw(_ids),
        "body": draw(_bodies),
        "method": draw(_methods),
        "url": draw(_urls),
    }
    present = [(key, value) for key, value in fields.items() if value is not _MISSING]
    ordered = draw(st.permutations(present))
    line = orjson.dumps(dict(ordered))
    if draw(st.booleans()):
        line = line.replace(b'":', b'" : ').replace(b',"', b', "')
    return line


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(request_lines(), min_size=1, max_size=12))
def test_the_sharder_accepts_what_the_validator_accepts(tmp_path: Path, lines: list[bytes]) -> None:
    """Lines that all carry a custom_id and a body are accepted by the sharder exactly when the
    batch-file validator accepts them, and every shard it writes passes the validator."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    source = directory / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    # The sharder is more lenient on purpose with the others: it names a row with no
    # custom_id (or a null one) after its position and wraps a bare body.
    rows = [orjson.loads(line) for line in lines]
    complete = all(row.get("custom_id") is not None and "body" in row for row in rows)
    validator_ok = check_batch_file(source, endpoint=CHAT).ok
    (directory / "out").mkdir()
    try:
        shard_file(directory / "out", source, model=None, max_lines=5)
    except BatchFileError:
        assert not validator_ok or not complete
        return
    assert validator_ok or not complete
    for shard in sorted((directory / "out").glob("shard-*.jsonl")):
        assert check_batch_file(shard, endpoint=CHAT, max_lines=5).ok


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(request_lines(), min_size=1, max_size=12))
def test_the_sharder_words_problems_as_the_validator(tmp_path: Path, lines: list[bytes]) -> None:
    """For lines that all carry a custom_id and a body, `run` (the sharder) lists the same
    problems as `validate` (the validator), word for word, in the same order and number."""
    rows = [orjson.loads(line) for line in lines]
    if not all(row.get("custom_id") is not None and "body" in row for row in rows):
        return  # the sharder takes these on purpose (generated ids, bare bodies)
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    source = directory / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    report = check_batch_file(source, endpoint=CHAT)
    (directory / "out").mkdir()
    try:
        shard_file(directory / "out", source, model=None)
    except BatchFileError as error:
        assert [str(problem) for problem in error.problems] == [
            str(problem) for problem in report.problems
        ]
        assert error.problem_count == report.problem_count
        return
    assert report.ok


def write_shard(path: Path, ids: list[str]) -> None:
    path.write_bytes(b"".join(orjson.dumps({"custom_id": i, "body": body(i)}) + b"\n" for i in ids))


def output_line(custom_id: str, status: int) -> bytes:
    row = {"custom_id": custom_id, "response": {"status_code": status, "body": {"ok": status}}}
    return orjson.dumps(row) + b"\n"


def test_accounting_settles_every_row_once(tmp_path: Path) -> None:
    """ok rows are final, retryable ones and missing ones go to the follow-up file."""
    write_shard(tmp_path / "in.jsonl", ["a", "b", "c", "d"])
    (tmp_path / "out.jsonl").write_bytes(
        output_line("a", 200) + output_line("b", 503) + output_line("d", 400)
    )
    accounting = ShardAccounting(
        tmp_path / "in.jsonl",
        [10, 11, 12, 13],
        batch_id="batch-1",
        job_status="EXPIRED",
        job_error=None,
        retry_allowed=True,
    )
    final = settle_file(accounting, tmp_path / "out.jsonl")
    final += accounting.finish()
    follow_up = accounting.write_follow_up(tmp_path / "retry.jsonl", attempt=2)
    assert [(position, result.custom_id) for position, result in final] == [(10, "a"), (13, "d")]
    assert follow_up is not None and follow_up.positions is not None
    assert list(decode_positions(follow_up.positions)) == [11, 12]
    assert [line["custom_id"] for line in read_lines(tmp_path / "retry.jsonl")] == ["b", "c"]


def accounting_of(input_path: Path, positions: list[int], sha256: str | None) -> ShardAccounting:
    return ShardAccounting(
        input_path,
        positions,
        input_sha256=sha256,
        batch_id="batch-1",
        job_status="COMPLETED",
        job_error=None,
        retry_allowed=True,
    )


def written_shard(directory: Path, ids: list[str]) -> tuple[Path, str]:
    """Shard rows with these custom_ids through InputSharder: (the shard file, its sha256)."""
    writer = sharder(directory)
    writer.add_items([{"custom_id": i, "body": body(i)} for i in ids])
    writer.finish()
    [shard] = writer.shards
    return directory / shard.name, shard.sha256


def test_accounting_takes_the_custom_ids_kept_beside_the_shard(tmp_path: Path) -> None:
    """The sharder keeps each shard's custom_ids beside it; settling uses them, not the file."""
    path, sha256 = written_shard(tmp_path, ["a", "b"])
    assert ids_path(path).is_file()
    path.write_bytes(b"not read\n")  # proves the requests are not decoded again
    accounting = accounting_of(path, [0, 1], sha256)
    assert [result.custom_id for _, result in accounting.finish()] == []
    assert accounting.resubmit_count == 2


@pytest.mark.parametrize("damage", ["missing", "stale", "torn"])
def test_accounting_rebuilds_custom_ids_it_cannot_trust(tmp_path: Path, damage: str) -> None:
    """A missing, stale (another shard's hash) or torn ids file is rebuilt from the shard."""
    path, sha256 = written_shard(tmp_path, ["a", "b"])
    if damage == "missing":
        ids_path(path).unlink()
    elif damage == "stale":
        ids_path(path).write_bytes(orjson.dumps({"sha256": "0" * 64, "custom_ids": ["x", "y"]}))
    else:
        ids_path(path).write_bytes(ids_path(path).read_bytes()[:-5])
    (tmp_path / "out.jsonl").write_bytes(output_line("b", 200) + output_line("a", 200))
    accounting = accounting_of(path, [7, 8], sha256)
    final = settle_file(accounting, tmp_path / "out.jsonl")
    assert [(position, result.custom_id) for position, result in final] == [(8, "b"), (7, "a")]


def test_a_follow_up_shard_keeps_its_custom_ids_too(tmp_path: Path) -> None:
    """write_follow_up writes the resubmitted rows' custom_ids beside the follow-up file."""
    path, sha256 = written_shard(tmp_path, ["a", "b", "c"])
    (tmp_path / "out.jsonl").write_bytes(output_line("b", 200))
    accounting = accounting_of(path, [0, 1, 2], sha256)
    settle_file(accounting, tmp_path / "out.jsonl")
    accounting.finish()
    follow_up = accounting.write_follow_up(tmp_path / "retry.jsonl", attempt=2)
    assert follow_up is not None
    (tmp_path / "retry.jsonl").write_bytes(b"not read\n")
    again = accounting_of(tmp_path / "retry.jsonl", [0, 2], follow_up.input_sha256)
    assert again.resubmit_count == 0 and len(again.finish()) == 0
    assert again.resubmit_count == 2


def test_without_attempts_left_missing_rows_get_the_job_status(tmp_path: Path) -> None:
    """With no retry allowed, a row with no result gets an error naming the job's status."""
    write_shard(tmp_path / "in.jsonl", ["a"])
    accounting = ShardAccounting(
        tmp_path / "in.jsonl",
        [0],
        batch_id="batch-1",
        job_status="CANCELLED",
        job_error=None,
        retry_allowed=False,
    )
    [(position, result)] = accounting.finish()
    assert (position, result.error_code) == (0, "batch_cancelled")
    assert "batch-1 ended CANCELLED" in (result.error_message or "")
    assert accounting.write_follow_up(tmp_path / "retry.jsonl", attempt=2) is None


_usage_values = st.one_of(st.integers(-5, 10**12), st.booleans(), st.none(), st.text(max_size=3))
_usage_rows = st.fixed_dictionaries(
    {"custom_id": st.just("a")},
    optional={
        "response": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"status_code": st.just(200)},
                optional={
                    "body": st.one_of(
                        st.lists(st.integers(), max_size=2),
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "usage": st.one_of(
                                    st.dictionaries(st.text(max_size=3), _usage_values),
                                    st.integers(),
                                )
                            },
                        ),
                    )
                },
            ),
        )
    },
)


@given(st.lists(_usage_rows, max_size=6))
def test_summed_usage_equals_the_sum_of_usage_of_row(rows: list[dict[str, Any]]) -> None:
    """Usage added up while settling equals usage_of_row summed over the same rows."""
    expected: dict[str, int] = {}
    for row in rows:
        for key, value in usage_of_row(row).items():
            expected[key] = expected.get(key, 0) + value
    totals: dict[str, int] = {}
    for row in rows:
        _add_usage(totals, row)
    assert totals == expected


# What orjson writes, as a real output line holds: no lone surrogates, no ints past 64 bits.
_json_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)
_json_int = st.integers(-(2**63), 2**63 - 1)
_result_bodies = st.one_of(
    st.none(),
    st.lists(_json_int, max_size=2),
    st.fixed_dictionaries(
        {},
        optional={
            "usage": st.one_of(
                st.dictionaries(
                    _json_text,
                    st.one_of(_json_int, st.booleans(), st.none(), _json_text),
                    max_size=3,
                ),
                _json_int,
            )
        },
    ),
)
_settle_rows = st.fixed_dictionaries(
    {
        "custom_id": st.sampled_from(["a", "b", "c", "not-sent"]),
        "response": st.fixed_dictionaries(
            {"status_code": st.sampled_from([200, 204, 299, 400, 408, 429, 500, 503])},
            optional={"body": _result_bodies},
        ),
    },
    optional={"error": st.one_of(st.none(), st.fixed_dictionaries({"message": _json_text}))},
)


@given(st.lists(_settle_rows, max_size=8), st.booleans())
def test_settle_follows_the_general_rules_row_by_row(
    rows: list[dict[str, Any]], retry_allowed: bool
) -> None:
    """settle()'s fast path gives what result_from_row, is_retryable and usage_of_row give."""
    lines = [orjson.dumps(row) for row in rows]
    positions = {"a": 7, "b": 8, "c": 9}
    expected: list[tuple[int, BatchResult]] = []
    expected_usage: dict[str, int] = {}
    seen: set[str] = set()
    for row, line in zip(rows, lines, strict=True):
        result = result_from_row(row, batch_id="batch-1", raw=line)
        if result.custom_id not in positions or result.custom_id in seen:
            continue
        seen.add(result.custom_id)
        if retry_allowed and is_retryable(result):
            continue
        expected.append((positions[result.custom_id], result))
        for key, value in usage_of_row(row).items():
            expected_usage[key] = expected_usage.get(key, 0) + value
    with tempfile.TemporaryDirectory() as directory:
        shard = Path(directory) / "in.jsonl"
        write_shard(shard, ["a", "b", "c"])
        accounting = ShardAccounting(
            shard,
            [7, 8, 9],
            batch_id="batch-1",
            job_status="COMPLETED",
            job_error=None,
            retry_allowed=retry_allowed,
        )
        assert accounting.settle(lines, source="out.jsonl") == expected
    assert accounting.usage == expected_usage


@pytest.mark.parametrize(
    ("result", "retryable"),
    [
        (BatchResult(custom_id="a", status_code=200), False),
        (BatchResult(custom_id="a", status_code=429, error_message="slow down"), True),
        (BatchResult(custom_id="a", status_code=502, error_message="bad gateway"), True),
        (BatchResult(custom_id="a", status_code=400, error_message="bad model"), False),
        (BatchResult(custom_id="a", error_message="t/o", error_code="request_timeout"), True),
        (BatchResult(custom_id="a", error_message="no", error_code="invalid_model"), False),
    ],
)
def test_which_row_failures_are_retryable(result: BatchResult, retryable: bool) -> None:
    """408/429/5xx and timeout or overload codes are retryable; request errors are not."""
    assert is_retryable(result) is retryable
