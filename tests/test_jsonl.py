"""Tests of together_async._jsonl: splitting, decoding, batch-file validation, async readers."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from together_async import BatchEndpoint, BatchFileError, InvalidArgumentError
from together_async._jsonl import (
    BatchFileProblem,
    BatchFileReport,
    BatchFileValidator,
    JsonLinesDecoder,
    LineSplitter,
    aiter_file_chunks,
    aiter_file_lines,
    aiter_json,
    aiter_lines,
    check_batch_bytes,
    check_batch_chunks,
    check_batch_file,
    raise_for_problems,
    validate_batch_bytes,
    validate_batch_file,
)

CHAT = "/v1/chat/completions"


def request_line(custom_id: Any = "r1", body: Any = None, **extra: Any) -> bytes:
    """One batch request as a JSON line without its newline."""
    request = {
        "custom_id": custom_id,
        "body": {"model": "m", "max_tokens": 5} if body is None else body,
    }
    request.update(extra)
    return orjson.dumps(request)


def batch(*lines: bytes) -> bytes:
    """A batch file with a final newline."""
    return b"".join(line + b"\n" for line in lines)


def good_batch(count: int) -> bytes:
    return batch(*(request_line(f"r{i}") for i in range(count)))


def problems_of(data: bytes, **options: Any) -> list[str]:
    return [str(problem) for problem in check_batch_bytes(data, **options).problems]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut into chunks at the given offsets."""
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(points)]


def split_all(splitter: LineSplitter, chunks: Iterable[bytes]) -> list[bytes]:
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    last = splitter.flush()
    return lines if last is None else [*lines, last]


async def achunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


utf8_chars = st.characters(codec="utf-8")  # no lone surrogates: they are not UTF-8

# Line contents: any encodable text but "\n", weighted towards CR and multi-byte UTF-8.
line_text = st.text(
    alphabet=st.one_of(
        st.sampled_from('\r{}"a é€😀'), st.characters(codec="utf-8", exclude_characters="\n")
    ),
    max_size=30,
)


@st.composite
def lines_in_chunks(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """Lines and the file they make, cut into chunks at arbitrary byte offsets."""
    lines = [text.encode() for text in draw(st.lists(line_text, min_size=1, max_size=12))]
    final_newline = draw(st.booleans())
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    if not final_newline and lines[-1] == b"":
        lines.pop()  # "a\n" + "" without a final newline is just "a\n"
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=20))
    return lines, split_at(data, cuts)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(utf8_chars),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(utf8_chars, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


# --- LineSplitter ----------------------------------------------------------------------------


def test_splitter_returns_complete_lines_without_newline() -> None:
    """A chunk of whole lines comes back as those lines, newlines removed."""
    assert LineSplitter().feed(b"a\nbb\n") == [b"a", b"bb"]


def test_splitter_keeps_carriage_return() -> None:
    """The CR of a CRLF ending stays on the line so the validator can report it."""
    assert LineSplitter().feed(b"a\r\nb\r\n") == [b"a\r", b"b\r"]


def test_splitter_joins_line_across_chunks() -> None:
    """A line cut between chunks comes back whole once its newline arrives."""
    splitter = LineSplitter()
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b": 1}\n{") == [b'{"a": 1}']


def test_splitter_joins_line_across_many_chunks() -> None:
    """A line spread over many newline-free chunks is joined in order."""
    splitter = LineSplitter()
    for piece in (b"ab", b"cd", b"ef"):
        assert splitter.feed(piece) == []
    assert splitter.feed(b"g\n") == [b"abcdefg"]


def test_splitter_cr_and_lf_in_separate_chunks() -> None:
    """A CRLF cut between its CR and LF still yields one line ending in CR."""
    splitter = LineSplitter()
    assert splitter.feed(b"a\r") == []
    assert splitter.feed(b"\nb") == [b"a\r"]


def test_splitter_multibyte_character_cut_between_chunks() -> None:
    """A UTF-8 character cut between chunks is reassembled byte for byte."""
    data = "é€😀\n".encode()
    splitter = LineSplitter()
    assert splitter.feed(data[:2]) == []
    assert splitter.feed(data[2:7]) == []
    assert splitter.feed(data[7:]) == ["é€😀".encode()]


def test_splitter_flush_returns_last_line_without_newline() -> None:
    """flush() gives the line the data ended with when it had no final newline."""
    splitter = LineSplitter()
    splitter.feed(b"a\nb")
    assert splitter.flush() == b"b"


def test_splitter_flush_returns_none_after_final_newline() -> None:
    """flush() gives None when the data ended with a newline."""
    splitter = LineSplitter()
    splitter.feed(b"a\n")
    assert splitter.flush() is None


def test_splitter_keeps_blank_lines() -> None:
    """Empty lines are returned, so line numbers stay true."""
    assert LineSplitter().feed(b"\n\na\n") == [b"", b"", b"a"]


def test_splitter_empty_chunk_yields_nothing() -> None:
    """An empty chunk neither yields nor disturbs a pending line."""
    splitter = LineSplitter()
    splitter.feed(b"ab")
    assert splitter.feed(b"") == []
    assert splitter.feed(b"\n") == [b"ab"]


def test_splitter_accepts_line_at_the_limit() -> None:
    """A line exactly max_line_bytes long is fine."""
    assert LineSplitter(max_line_bytes=3).feed(b"abc\n") == [b"abc"]


def test_splitter_rejects_complete_line_over_limit_naming_it() -> None:
    """A complete line over max_line_bytes raises ValueError naming its line number."""
    splitter = LineSplitter(max_line_bytes=3)
    splitter.feed(b"a\n")
    with pytest.raises(ValueError, match=r"line 3: longer than the limit of 3 bytes"):
        splitter.feed(b"b\nlong\n")


def test_splitter_rejects_growing_partial_line_before_buffering_it_all() -> None:
    """A newline-free stream raises as soon as the pending line passes the limit."""
    splitter = LineSplitter(max_line_bytes=10)
    splitter.feed(b"x" * 10)
    with pytest.raises(ValueError, match=r"line 1: longer than the limit of 10 bytes"):
        splitter.feed(b"x")


@given(lines_in_chunks())
def test_splitter_gives_back_original_lines_for_any_chunking(
    case: tuple[list[bytes], list[bytes]],
) -> None:
    """Any lines cut at any byte offsets (inside characters, between CR and LF) come back as-is."""
    lines, chunks = case
    assert split_all(LineSplitter(), chunks) == lines


@given(lines_in_chunks())
def test_splitter_limit_never_trips_on_lines_within_it(
    case: tuple[list[bytes], list[bytes]],
) -> None:
    """max_line_bytes equal to the longest line never raises, whatever the chunking."""
    lines, chunks = case
    limit = max(map(len, lines), default=0)
    assert split_all(LineSplitter(max_line_bytes=limit), chunks) == lines


# --- JsonLinesDecoder --------------------------------------------------------------------------


def test_decoder_decodes_values_across_chunks() -> None:
    """Values split between chunks are decoded once their line is complete."""
    decoder = JsonLinesDecoder()
    assert decoder.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert decoder.feed(b": [2]}\n") == [{"b": [2]}]


def test_decoder_accepts_crlf_and_skips_blank_lines() -> None:
    """Data files may use CRLF and contain blank lines; neither is an error when decoding."""
    decoder = JsonLinesDecoder()
    assert decoder.feed(b"1\r\n\r\n\n  \n2\r\n") == [1, 2]


def test_decoder_finish_decodes_last_line_without_newline() -> None:
    """finish() decodes a final line that had no newline."""
    decoder = JsonLinesDecoder()
    decoder.feed(b"1\n2")
    assert decoder.finish() == [2]


def test_decoder_bad_line_raises_value_error_naming_source_and_line() -> None:
    """A line that is not JSON raises ValueError with the source and its line number."""
    decoder = JsonLinesDecoder(source="file-abc")
    with pytest.raises(ValueError, match=r"^file-abc: line 3: not valid JSON"):
        decoder.feed(b"1\n\n{oops\n")


@given(
    st.lists(json_values, min_size=1, max_size=8),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=20),
)
def test_decoder_gives_back_original_values_for_any_chunking(
    values: list[Any], crlf: bool, cuts: list[int]
) -> None:
    """Any JSON values, LF or CRLF, cut at any byte offsets, decode back to the same values."""
    ending = b"\r\n" if crlf else b"\n"
    data = b"".join(orjson.dumps(value) + ending for value in values)
    decoder = JsonLinesDecoder()
    chunks = split_at(data, (cut for cut in cuts if cut <= len(data)))
    decoded = [value for chunk in chunks for value in decoder.feed(chunk)] + decoder.finish()
    assert decoded == values


# --- BatchFileValidator: good input ------------------------------------------------------------


def test_valid_file_has_no_problems() -> None:
    """A well-formed file passes and its lines and bytes are counted."""
    data = good_batch(3)
    report = check_batch_bytes(data, endpoint=CHAT)
    assert report == BatchFileReport(lines=3, bytes=len(data), problems=(), problem_count=0)
    assert report.ok


def test_final_newline_is_optional() -> None:
    """A last line without a newline is validated like the others."""
    report = check_batch_bytes(request_line("a") + b"\n" + request_line("a"))
    assert [str(problem) for problem in report.problems] == ["line 2: custom_id: duplicates line 1"]


def test_method_post_and_file_and_matching_url_are_accepted() -> None:
    """`method` POST or FILE and a `url` equal to the endpoint are fine."""
    data = batch(
        request_line("a", method="POST", url=CHAT), request_line("b", method="FILE", url=CHAT)
    )
    assert check_batch_bytes(data, endpoint=CHAT).ok


def test_endpoint_may_be_a_batch_endpoint_enum() -> None:
    """A BatchEndpoint is compared by its value."""
    assert check_batch_bytes(
        batch(request_line(url=CHAT)), endpoint=BatchEndpoint.CHAT_COMPLETIONS
    ).ok


def test_custom_id_of_64_multibyte_characters_is_accepted() -> None:
    """The custom_id limit counts characters, not bytes."""
    assert check_batch_bytes(batch(request_line("é" * 64))).ok


def test_same_url_on_every_line_is_accepted_without_endpoint() -> None:
    """Without an endpoint, lines agreeing on one url are fine."""
    assert check_batch_bytes(batch(request_line("a", url=CHAT), request_line("b", url=CHAT))).ok


# --- BatchFileValidator: each rule ------------------------------------------------------------


def test_invalid_json_names_the_line() -> None:
    """A line that is not JSON is reported with its line number."""
    assert problems_of(batch(request_line("a"), b'{"custom_id": "b",')) == [
        "line 2: not valid JSON (unexpected end of data at column 19)"
    ]


def test_nan_is_invalid_json_with_a_hint() -> None:
    """NaN is not JSON; the message says so."""
    [problem] = problems_of(batch(b'{"custom_id": "a", "body": {"temperature": NaN}}'))
    assert problem.startswith("line 1: not valid JSON")
    assert problem.endswith("NaN and Infinity are not valid JSON")


def test_infinity_is_invalid_json() -> None:
    """-Infinity is not JSON either."""
    [problem] = problems_of(batch(b'{"custom_id": "a", "body": {"x": -Infinity}}'))
    assert problem.endswith("NaN and Infinity are not valid JSON")


def test_non_object_line_is_rejected() -> None:
    """Each line must be a JSON object."""
    assert problems_of(batch(b'["a"]', b'"text"')) == [
        "line 1: must be a JSON object, got an array",
        "line 2: must be a JSON object, got a string",
    ]


def test_invalid_utf8_names_line_and_byte() -> None:
    """Bytes that are not UTF-8 are reported with the line and where in it."""
    assert problems_of(batch(request_line("a"), b'{"custom_id": "b\xff", "body": {}}')) == [
        "line 2: not valid UTF-8 (byte 0xff at byte 17 of the line); save the file as UTF-8"
    ]


def test_missing_custom_id() -> None:
    """A request without custom_id is reported on that field."""
    assert problems_of(batch(orjson.dumps({"body": {}}))) == ["line 1: custom_id: missing"]


def test_non_string_custom_id() -> None:
    """A numeric custom_id is rejected."""
    assert problems_of(batch(request_line(7))) == [
        "line 1: custom_id: must be a string, got a number"
    ]


def test_empty_custom_id() -> None:
    """An empty custom_id is rejected."""
    assert problems_of(batch(request_line(""))) == ["line 1: custom_id: is empty"]


def test_custom_id_over_64_characters() -> None:
    """A custom_id of 65 characters is rejected with its length."""
    assert problems_of(batch(request_line("x" * 65))) == [
        "line 1: custom_id: is 65 characters long; at most 64 allowed"
    ]


def test_duplicate_custom_id_names_first_line() -> None:
    """A repeated custom_id names the line that used it first, every time."""
    data = batch(request_line("a"), request_line("b"), request_line("a"), request_line("a"))
    assert problems_of(data) == [
        "line 3: custom_id: duplicates line 1",
        "line 4: custom_id: duplicates line 1",
    ]


def test_missing_body() -> None:
    """A request without body is reported on that field."""
    assert problems_of(batch(orjson.dumps({"custom_id": "a"}))) == ["line 1: body: missing"]


def test_non_object_body() -> None:
    """A body that is not an object is rejected."""
    assert problems_of(batch(request_line(body="hello"))) == [
        "line 1: body: must be a JSON object, got a string"
    ]


def test_null_body() -> None:
    """A null body counts as present but not an object."""
    data = batch(orjson.dumps({"custom_id": "a", "body": None}))
    assert problems_of(data) == ["line 1: body: must be a JSON object, got null"]


def test_bad_method() -> None:
    """A method other than POST or FILE is rejected, showing the value."""
    assert problems_of(batch(request_line(method="GET"))) == [
        'line 1: method: must be "POST" or "FILE", got "GET"'
    ]


def test_lowercase_method_is_rejected() -> None:
    """Methods are case-sensitive, as on the server."""
    assert problems_of(batch(request_line(method="post"))) == [
        'line 1: method: must be "POST" or "FILE", got "post"'
    ]


def test_url_other_than_endpoint() -> None:
    """A url that is not the batch endpoint is rejected, naming both."""
    data = batch(request_line(url="/v1/embeddings"))
    assert problems_of(data, endpoint=CHAT) == [
        'line 1: url: "/v1/embeddings" is not the batch endpoint "/v1/chat/completions"'
    ]


def test_non_string_url() -> None:
    """A url that is not a string is rejected."""
    assert problems_of(batch(request_line(url=1))) == [
        "line 1: url: must be a string, got a number"
    ]


def test_mixed_urls_without_endpoint() -> None:
    """Without an endpoint, a url differing from the first one seen is rejected."""
    data = batch(request_line("a", url=CHAT), request_line("b", url="/v1/completions"))
    assert problems_of(data) == [
        'line 2: url: "/v1/completions" differs from "/v1/chat/completions" on line 1; '
        "a batch runs against one endpoint"
    ]


def test_several_problems_on_one_line_are_all_reported() -> None:
    """Each field's problem is reported, in field order."""
    data = batch(orjson.dumps({"body": [], "method": "PUT"}))
    assert problems_of(data) == [
        "line 1: custom_id: missing",
        "line 1: body: must be a JSON object, got an array",
        'line 1: method: must be "POST" or "FILE", got "PUT"',
    ]


# --- BatchFileValidator: file layout ------------------------------------------------------------


def test_empty_file_is_rejected() -> None:
    """A file with no bytes at all is rejected as a whole."""
    assert problems_of(b"") == ["the file is empty; a batch needs at least one request line"]


def test_blank_line_is_rejected_with_a_fix() -> None:
    """A blank line between requests is reported with its number and how to fix it."""
    assert problems_of(batch(request_line("a"), b"", request_line("b"))) == [
        "line 2: blank line; remove blank lines, one request per line"
    ]


def test_trailing_blank_line_is_rejected() -> None:
    """An extra newline at the end makes a blank last line."""
    assert problems_of(batch(request_line("a")) + b"\n") == [
        "line 2: blank line; remove blank lines, one request per line"
    ]


def test_whitespace_only_line_is_blank() -> None:
    """A line of spaces and tabs counts as blank."""
    assert problems_of(batch(request_line("a"), b" \t ")) == [
        "line 2: blank line; remove blank lines, one request per line"
    ]


def test_crlf_is_reported_on_every_line() -> None:
    """Each CRLF line is reported, with how to fix it; the requests are still checked."""
    data = request_line("a") + b"\r\n" + request_line("a") + b"\r\n"
    crlf = "ends with CRLF (\\r\\n); save the file with LF line endings (e.g. dos2unix)"
    assert problems_of(data) == [
        f"line 1: {crlf}",
        f"line 2: {crlf}",
        "line 2: custom_id: duplicates line 1",
    ]


def test_bom_is_rejected_and_first_line_still_checked() -> None:
    """A UTF-8 BOM is reported with the fix, and line 1 is validated behind it."""
    data = b"\xef\xbb\xbf" + batch(orjson.dumps({"custom_id": "a"}))
    assert problems_of(data) == [
        "line 1: starts with a UTF-8 byte order mark (BOM); save without a BOM",
        "line 1: body: missing",
    ]


def test_too_many_lines_reported_once_and_parsing_stops() -> None:
    """Past max_lines the file is reported once, naming the first line over, and not parsed."""
    data = good_batch(3) + b"not json\n" * 5
    report = check_batch_bytes(data, max_lines=3)
    assert [str(problem) for problem in report.problems] == [
        "line 4: more than the limit of 3 lines; split the requests into several files"
    ]
    assert report.lines == 3


def test_exactly_max_lines_is_accepted() -> None:
    """A file of exactly max_lines lines passes."""
    assert check_batch_bytes(good_batch(3), max_lines=3).ok


def test_too_many_bytes_reported_once_naming_the_line() -> None:
    """Past max_bytes the file is reported once, naming the line where the limit falls."""
    data = good_batch(4)
    limit = len(good_batch(2)) + 5
    assert problems_of(data, max_bytes=limit) == [
        f"line 3: the file is larger than the limit of {limit:,} bytes; split it into smaller files"
    ]


def test_exactly_max_bytes_is_accepted() -> None:
    """A file of exactly max_bytes bytes passes."""
    data = good_batch(2)
    assert check_batch_bytes(data, max_bytes=len(data)).ok


def test_enormous_line_is_reported_without_buffering_it() -> None:
    """A 50 MB line with max_bytes 1 MB is reported once and memory stays near the limit."""
    validator = BatchFileValidator(max_bytes=1024 * 1024)
    piece = b"x" * (1024 * 1024)
    tracemalloc.start()
    try:
        for _ in range(50):
            validator.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report = validator.finish()
    assert [str(problem) for problem in report.problems] == [
        "line 1: the file is larger than the limit of 1,048,576 bytes; split it into smaller files"
    ]
    assert peak < 5 * 1024 * 1024


def test_validator_stops_after_a_limit() -> None:
    """Once a limit is passed, stopped is True and further data is ignored."""
    validator = BatchFileValidator(max_lines=1)
    validator.feed(good_batch(2))
    assert validator.stopped
    validator.feed(b"garbage\n")
    assert validator.finish().problem_count == 1


def test_report_is_the_same_for_any_chunking() -> None:
    """Feeding a bad file one byte at a time gives the same report as one chunk."""
    data = (
        b"\xef\xbb\xbf"
        + batch(
            request_line("a"),
            b"",
            request_line("a", method="GET"),
            b"{bad",
            "é\xff".encode("latin-1"),
        )
        + request_line("b")
        + b"\r"
    )
    validator = BatchFileValidator()
    for index in range(len(data)):
        validator.feed(data[index : index + 1])
    assert validator.finish() == check_batch_bytes(data)


# --- problems, the cap and the error -----------------------------------------------------------


def test_problem_str_with_line_and_field() -> None:
    """A problem with line and field reads `line N: field: message`."""
    problem = BatchFileProblem(line=7, field="custom_id", message="duplicates line 3")
    assert str(problem) == "line 7: custom_id: duplicates line 3"


def test_problem_str_without_line_or_field() -> None:
    """A whole-file problem is its message alone."""
    assert str(BatchFileProblem(line=None, field=None, message="the file is empty")) == (
        "the file is empty"
    )


def test_problem_cap_keeps_first_problems_and_counts_all() -> None:
    """Only max_problems are kept, in line order, but all are counted."""
    data = batch(*(b"[]" for _ in range(10)))
    report = check_batch_bytes(data, max_problems=3)
    assert [problem.line for problem in report.problems] == [1, 2, 3]
    assert report.problem_count == 10
    assert not report.ok


def test_raise_for_problems_raises_batch_file_error() -> None:
    """A report with problems becomes one BatchFileError listing them and the hidden count."""
    report = check_batch_bytes(batch(*(b"[]" for _ in range(5))), max_problems=2)
    with pytest.raises(BatchFileError) as caught:
        raise_for_problems(report, source="in.jsonl")
    error = caught.value
    assert (error.source, error.problem_count, error.problems) == (
        "in.jsonl",
        5,
        list(report.problems),
    )
    assert str(error) == (
        "in.jsonl: 5 problems\n"
        "  line 1: must be a JSON object, got an array\n"
        "  line 2: must be a JSON object, got an array\n"
        "  ... and 3 more"
    )


def test_raise_for_problems_passes_a_clean_report() -> None:
    """A report without problems raises nothing."""
    raise_for_problems(check_batch_bytes(good_batch(1)), source="in.jsonl")


def test_validator_exposes_raise_for_problems() -> None:
    """The contract's validator.raise_for_problems(report, source=...) works."""
    validator = BatchFileValidator()
    with pytest.raises(BatchFileError, match="the file is empty"):
        validator.raise_for_problems(validator.finish(), source="x")


# --- sha256 and files ----------------------------------------------------------------------


def test_sha256_is_computed_in_the_same_pass() -> None:
    """With sha256=True the report carries the digest of the whole input, however chunked."""
    data = good_batch(3)
    report = check_batch_chunks(split_at(data, [1, 10, 11]), sha256=True)
    assert report.sha256 == hashlib.sha256(data).hexdigest()


def test_sha256_is_none_unless_asked() -> None:
    """check_batch_bytes and check_batch_file compute no digest."""
    assert check_batch_bytes(good_batch(1)).sha256 is None


def test_sha256_is_none_when_reading_stopped_at_a_limit() -> None:
    """A digest of a partly read input would be wrong, so there is none."""
    assert check_batch_chunks([good_batch(3)], max_lines=1, sha256=True).sha256 is None


def test_check_batch_file_reads_a_file(tmp_path: Path) -> None:
    """check_batch_file validates a file on disk."""
    path = tmp_path / "in.jsonl"
    data = batch(request_line("a"), request_line("a"))
    path.write_bytes(data)
    report = check_batch_file(path)
    assert [str(problem) for problem in report.problems] == ["line 2: custom_id: duplicates line 1"]
    assert (report.lines, report.bytes) == (2, len(data))


def test_check_batch_file_missing_file_is_invalid_argument(tmp_path: Path) -> None:
    """A file that cannot be read is InvalidArgumentError naming it, not a report."""
    with pytest.raises(InvalidArgumentError, match=r"cannot read the batch file .*missing\.jsonl"):
        check_batch_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("path", [True, 0, 1, None, b"in.jsonl"])
def test_check_batch_file_refuses_what_is_not_a_path(path: object) -> None:
    """An int (a file descriptor to open(), so stdout for 1 or True), None or bytes is
    InvalidArgumentError, and nothing is opened."""
    with pytest.raises(InvalidArgumentError, match=r"path must be a str or os\.PathLike"):
        check_batch_file(path)  # type: ignore[arg-type]


def test_check_batch_file_passes_limits_through(tmp_path: Path) -> None:
    """Limits given to check_batch_file reach the validator."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(good_batch(3))
    assert check_batch_file(path, max_lines=2).problem_count == 1


# --- async helpers -----------------------------------------------------------------------------


async def test_validate_batch_file_returns_report_for_good_file(tmp_path: Path) -> None:
    """A good file gives its report, with the file's sha256 for the upload."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(good_batch(2))
    report = await validate_batch_file(path, endpoint=CHAT)
    assert (report.lines, report.sha256) == (2, hashlib.sha256(good_batch(2)).hexdigest())


async def test_validate_batch_file_raises_naming_the_file(tmp_path: Path) -> None:
    """A bad file raises BatchFileError whose source is the path given."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(batch(request_line(url="/v1/embeddings")))
    with pytest.raises(BatchFileError) as caught:
        await validate_batch_file(path, endpoint=CHAT)
    assert caught.value.source == str(path)
    assert [problem.field for problem in caught.value.problems] == ["url"]


async def test_validate_batch_bytes_returns_report_with_sha256() -> None:
    """In-memory input that passes gives its report and digest."""
    report = await validate_batch_bytes(good_batch(2), endpoint=CHAT)
    assert (report.lines, report.sha256) == (2, hashlib.sha256(good_batch(2)).hexdigest())


async def test_validate_batch_bytes_raises_with_given_source() -> None:
    """In-memory input is named by `source` in the error."""
    with pytest.raises(BatchFileError, match=r"^upload\.jsonl: 1 problem\n  line 1: body: missing"):
        await validate_batch_bytes(batch(orjson.dumps({"custom_id": "a"})), source="upload.jsonl")


async def test_aiter_lines_strips_line_endings() -> None:
    """Lines come without LF or CRLF, including a last line without newline."""
    lines = await collect(aiter_lines(achunks(b"a\r", b"\nb\n", b"c")))
    assert lines == [b"a", b"b", b"c"]


async def test_aiter_lines_yields_blank_lines() -> None:
    """Blank lines are yielded so the caller's line count stays true."""
    assert await collect(aiter_lines(achunks(b"a\n\r\n\nb\n"))) == [b"a", b"", b"", b"b"]


async def test_aiter_lines_enforces_max_line_bytes() -> None:
    """An over-long line raises ValueError naming it."""
    with pytest.raises(ValueError, match="line 2: longer than the limit of 4 bytes"):
        await collect(aiter_lines(achunks(b"ok\n", b"toolong"), max_line_bytes=4))


async def test_aiter_file_chunks_respects_chunk_size(tmp_path: Path) -> None:
    """A file is read in chunks of at most chunk_size bytes, together the whole file."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    chunks = await collect(aiter_file_chunks(path, chunk_size=4))
    assert chunks == [b"0123", b"4567", b"89"]


async def test_aiter_file_lines_reads_lines_across_small_chunks(tmp_path: Path) -> None:
    """Lines are rebuilt from chunks smaller than the lines."""
    path = tmp_path / "f.jsonl"
    path.write_bytes("é€\r\nsecond\nlast".encode())
    lines = await collect(aiter_file_lines(path, chunk_size=3))
    assert lines == ["é€".encode(), b"second", b"last"]


async def test_aiter_file_lines_closes_file_when_closed_early(tmp_path: Path) -> None:
    """Closing the iterator after the first line closes the file at once."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"a\nb\nc\n")
    async with contextlib.aclosing(aiter_file_lines(path, chunk_size=2)) as lines:
        async for _ in lines:
            assert str(path) in [item.path for item in psutil.Process().open_files()]
            break
    assert str(path) not in [item.path for item in psutil.Process().open_files()]


async def test_aiter_json_decodes_values() -> None:
    """Decoded values come out of an async byte stream, CRLF and blank lines tolerated."""
    assert await collect(aiter_json(achunks(b'{"a":', b" 1}\r\n\n[2]"))) == [{"a": 1}, [2]]


async def test_aiter_json_bad_line_names_source_and_line() -> None:
    """A bad line raises ValueError naming the source and the line number."""
    with pytest.raises(ValueError, match=r"^out\.jsonl: line 2: not valid JSON"):
        await collect(aiter_json(achunks(b"1\n{x\n"), source="out.jsonl"))
