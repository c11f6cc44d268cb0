"""Bad arguments at the public entry points are the library's own errors, said before any
request: a malformed base URL or key, text that cannot go on the wire (lone surrogates, NUL),
and file names that are not UTF-8 (taken from the file system: uploaded under a readable name)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from together_async import (
    AsyncTogether,
    BatchWatcher,
    ClientConfig,
    InvalidArgumentError,
    gather_batches,
)
from together_async.emulator import Emulator

pytestmark = pytest.mark.timeout(60)

API_KEY = "test-key-bad-args-4d1e"
NON_UTF8_NAME = os.fsdecode(b"requests-\xff\xfe.jsonl")


def request_line(custom_id: str) -> bytes:
    """One valid chat request line."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return orjson.dumps({"custom_id": custom_id, "body": body}) + b"\n"


@pytest.mark.parametrize(
    "base_url",
    [
        5,
        b"https://api.together.ai/v1",
        "https://h:99999/v1",
        "https://[::1/v1",
        "https://a b/v1",
        "https://api.together.ai\r\n/v1",
        "https://ex\udcffample.com/v1",
        "https://h:0/v1",
        "ftp://h/v1",
        "https:///v1",
    ],
)
def test_malformed_base_url_is_refused(base_url: Any) -> None:
    """A base URL that is not a str, or not a connectable http(s) URL, is InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError, match="base_url"):
        AsyncTogether(api_key=API_KEY, base_url=base_url)


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("abc\r\nX-Injected: 1", "line break"),
        ("abc\ndef", "line break"),
        ("abc def", "space"),
        ("abc\x00def", "control character"),
        ("abc\udcffdef", "non-ASCII"),
        ("abcédef", "non-ASCII"),
    ],
)
def test_key_that_is_not_a_header_value_is_refused(key: str, what: str) -> None:
    """A key with a CR/LF, space, control or non-ASCII character is refused, saying where."""
    with pytest.raises(InvalidArgumentError, match=what) as caught:
        AsyncTogether(api_key=key, base_url="http://127.0.0.1:9/v1")
    assert "abc" not in str(caught.value)


def test_key_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """TOGETHER_API_KEY with an inner line break is refused without showing it."""
    monkeypatch.setenv("TOGETHER_API_KEY", "secretpart\nother")
    with pytest.raises(InvalidArgumentError, match="line break") as caught:
        AsyncTogether(base_url="http://127.0.0.1:9/v1")
    assert "secretpart" not in str(caught.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.batches.get_batch("batch-\udcff"),
        lambda c: c.batches.cancel_batch("batch-\x00"),
        lambda c: c.files.retrieve("file-\udcff"),
        lambda c: c.files.delete("file-\udcff"),
    ],
    ids=["get_batch", "cancel_batch-nul", "retrieve", "delete"],
)
async def test_id_that_cannot_be_sent_is_refused(emulator: Emulator, call: Any) -> None:
    """An id with a lone surrogate or NUL is InvalidArgumentError, and nothing is sent."""
    before = emulator.stats.requests
    async with AsyncTogether(api_key=API_KEY, base_url=emulator.base_url) as client:
        with pytest.raises(InvalidArgumentError, match="id"):
            await call(client)
    assert emulator.stats.requests == before


@pytest.mark.parametrize(
    "options",
    [{"model_id": "model-\udcff"}, {"completion_window": "24\udcffh"}],
    ids=["model_id", "completion_window"],
)
async def test_create_with_text_that_cannot_be_sent_is_refused(
    client: AsyncTogether, options: dict[str, Any]
) -> None:
    """A lone surrogate in a create_batch option is InvalidArgumentError, not a TypeError."""
    with pytest.raises(InvalidArgumentError):
        await client.batches.create_batch("file-x", "/v1/chat/completions", **options)


async def test_explicit_filename_with_a_surrogate_is_refused(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """files.upload(filename=...) with a lone surrogate is InvalidArgumentError."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(request_line("a"))
    with pytest.raises(InvalidArgumentError, match="filename"):
        await client.files.upload(path, filename="in-\udcff.jsonl")


async def test_non_utf8_file_name_uploads_under_a_readable_name(
    client: AsyncTogether, tmp_path: Path
) -> None:
    """A path whose name is not UTF-8 uploads; the stored name has U+FFFD for the bad bytes."""
    path = tmp_path / NON_UTF8_NAME
    path.write_bytes(request_line("a"))
    uploaded = await client.files.upload(path)
    assert uploaded.filename == "requests-\ufffd\ufffd.jsonl"
    assert uploaded.bytes == path.stat().st_size


@pytest.mark.parametrize("base_url", [5, "not a url", "https://h:99999/v1"])
def test_client_config_checks_its_base_url(base_url: Any) -> None:
    """ClientConfig(base_url=...) built directly is checked like AsyncTogether's."""
    with pytest.raises(InvalidArgumentError, match="base_url"):
        ClientConfig(base_url=base_url)


@pytest.mark.parametrize("config", [None, "https://api.together.ai/v1", {"api_key": "k"}])
def test_from_config_needs_a_client_config(config: Any) -> None:
    """AsyncTogether.from_config with something else than a ClientConfig is refused."""
    with pytest.raises(InvalidArgumentError, match="ClientConfig"):
        AsyncTogether.from_config(config)


def test_timeout_none_is_refused() -> None:
    """timeout=None is InvalidArgumentError (a number of seconds is required), not TypeError."""
    with pytest.raises(InvalidArgumentError, match="timeout"):
        AsyncTogether(api_key=API_KEY, timeout=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("progress", ["yes", 1, object(), [1]])
async def test_progress_that_is_no_observer_is_refused(
    client: AsyncTogether, emulator: Emulator, progress: Any
) -> None:
    """gather(progress=...) that is neither a bool nor an observer is refused before any
    upload."""
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(InvalidArgumentError, match="progress must be"):
        await gather_batches(client, rows, model="m", progress=progress)
    assert emulator.stats["POST", "/files"] == 0


@pytest.mark.parametrize("ids", [None, 3, object()])
async def test_watcher_ids_that_are_no_collection_are_refused(
    client: AsyncTogether, ids: Any
) -> None:
    """BatchWatcher / stream_statuses with ids that are not a collection are refused."""
    with pytest.raises(InvalidArgumentError, match="ids must be a collection"):
        BatchWatcher(client.batches, ids)
    with pytest.raises(InvalidArgumentError, match="ids must be a collection"):
        client.batches.stream_statuses(ids)


async def test_purpose_with_a_surrogate_is_refused(client: AsyncTogether) -> None:
    """files.upload(purpose=...) with a lone surrogate is InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError, match="purpose"):
        await client.files.upload(request_line("a"), purpose="batch-\udcff")


@pytest.mark.parametrize(
    "options",
    [{"model": "m-\udcff"}, {"completion_window": "2\udcffh"}, {"completion_window": ""}],
    ids=["model", "completion_window", "empty-window"],
)
async def test_gather_text_options_are_checked_before_any_upload(
    client: AsyncTogether, emulator: Emulator, options: dict[str, Any]
) -> None:
    """gather's model and completion_window are checked up front, not at the first create."""
    options.setdefault("model", "m")
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(InvalidArgumentError):
        await gather_batches(client, rows, **options)
    assert emulator.stats["POST", "/files"] == 0


@pytest.mark.parametrize("host", ["a" * 64 + ".com", ".".join(["abcdefghij"] * 24) + ".com"])
def test_base_url_host_that_is_no_dns_name_is_refused(host: str) -> None:
    """A base URL whose host has a label over 63 characters (or is over 253) is refused."""
    with pytest.raises(InvalidArgumentError, match="DNS name"):
        AsyncTogether(api_key=API_KEY, base_url=f"https://{host}/v1")


@pytest.mark.parametrize("session", ["not a session", 3, object()])
def test_session_that_is_no_client_session_is_refused(session: Any) -> None:
    """AsyncTogether(session=...) that is not an aiohttp.ClientSession is refused at once."""
    with pytest.raises(InvalidArgumentError, match="session"):
        AsyncTogether(api_key=API_KEY, session=session)
