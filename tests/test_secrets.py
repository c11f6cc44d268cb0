"""Secrets and hosts: the API key goes to the API's own origin and nowhere else (not to storage,
not along a redirect, not after a storage redirect), and it shows up in no repr, no error text
(even when a server echoes it back), no log record at DEBUG, no state file and no CLI output,
through whole flows with failures in them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from emulator_helpers import CHAT, chat_file, chat_line, jsonl
from http_fakes import FakeFiles, Recorder, batch_lines, job_json

from together_async import (
    APIStatusError,
    AsyncTogether,
    BatchRun,
    ClientConfig,
    TogetherError,
    gather_batches,
)
from together_async.emulator import Emulator
from together_async.emulator.faults import Fault, FaultKind

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup
else:  # the backport anyio itself depends on
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

pytestmark = pytest.mark.timeout(120)

Serve = Callable[[web.Application], Awaitable[TestServer]]
MakeEmulator = Callable[..., Awaitable[Emulator]]

KEY = "sk-reliability-secret-4c1f9e2a7b"
OTHER_KEY = "sk-wrong-secret-8d2e6a0c3f"
FAULTS = (
    Fault(kind=FaultKind.ERROR, rate=0.1),
    Fault(kind=FaultKind.ERROR, rate=0.05, after_effect=True),
    Fault(kind=FaultKind.RATE_LIMIT, rate=0.05, retry_after=0.01),
    Fault(kind=FaultKind.RESET, rate=0.05),
)


def fast_client(base_url: str, key: str = KEY, **overrides: Any) -> AsyncTogether:
    settings: dict[str, Any] = {
        "api_key": key,
        "base_url": base_url,
        "max_retries": 10,
        "retry_wait_initial": 0.005,
        "retry_wait_max": 0.02,
        "retry_wait_jitter": 0.0,
    }
    settings.update(overrides)
    return AsyncTogether.from_config(ClientConfig(**settings))


def url_on(server: TestServer, path: str, *, host: str = "localhost") -> str:
    """A URL of `server` under another host name than the API's 127.0.0.1: another origin."""
    return f"http://{host}:{server.port}{path}"


def leaks(texts: Iterable[str], *keys: str) -> list[str]:
    """The texts that contain any of the keys."""
    return [text for text in texts if any(key in text for key in keys)]


def error_texts(error: BaseException | None) -> list[str]:
    """str and repr of an error and of everything it was raised from."""
    texts: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts += [str(error), repr(error)]
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                texts += error_texts(inner)
        error = error.__cause__ or error.__context__
    return texts


def record_texts(records: Iterable[logging.LogRecord]) -> list[str]:
    """Everything a log handler could print of the records: message, args, extras, traceback."""
    formatter = logging.Formatter()
    texts = []
    for record in records:
        texts.append(record.getMessage())
        texts.append(repr(record.__dict__))
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
    return texts


# --- storage and redirects -------------------------------------------------------------------


@pytest.fixture
async def fake(serve: Serve) -> FakeFiles:
    """A fake files API on 127.0.0.1 whose storage host is `localhost` on another port."""
    fake = FakeFiles()
    storage = await serve(fake.storage_app())
    fake.storage_url = url_on(storage, "")
    fake.api_server = await serve(fake.api_app())
    return fake


async def test_storage_on_another_host_never_gets_the_key(fake: FakeFiles) -> None:
    """The presigned PUTs (retried ones included) carry no Authorization and no key anywhere,
    while every API call does carry it."""
    fake.storage_failures = 2
    async with fast_client(str(fake.api_server.make_url("/v1"))) as client:
        uploaded = await client.files.upload(batch_lines(20))
    assert fake.contents[uploaded.id] == batch_lines(20)
    assert len(fake.storage.requests) == 3
    for put in fake.storage.requests:
        assert "Authorization" not in put.headers
        assert leaks([*put.headers.values(), put.path, repr(put.query)], KEY) == []
    assert all(seen.headers["Authorization"] == f"Bearer {KEY}" for seen in fake.api.requests)


def storing_host(fake: FakeFiles) -> tuple[Recorder, web.Application]:
    """A storage host on another origin that records each PUT and stores its body as
    file-1's (the upload checks the size the API then reports)."""
    seen = Recorder()

    async def take(request: web.Request) -> web.Response:
        body = await request.read()
        seen.record(request, body)
        fake.files["file-1"]["bytes"] = len(body)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_put("/{tail:.*}", take)
    return seen, app


async def test_storage_redirects_to_a_third_host_never_get_the_key(
    fake: FakeFiles, serve: Serve
) -> None:
    """A storage redirect to a third origin is followed with the body and still no key."""
    third, app = storing_host(fake)
    third_server = await serve(app)
    fake.storage_redirects["/upload/file-1"] = url_on(
        third_server, "/bucket/file-1", host="127.0.0.1"
    )
    async with fast_client(str(fake.api_server.make_url("/v1"))) as client:
        await client.files.upload(batch_lines(5))
    assert [seen.body for seen in third.requests] == [batch_lines(5)]
    assert all("Authorization" not in seen.headers for seen in fake.storage.requests)
    assert all("Authorization" not in seen.headers for seen in third.requests)


async def test_storage_on_the_api_origin_still_gets_no_key(serve: Serve) -> None:
    """Even when the presigned URL is on the API's own host and port, the PUT carries no key:
    the key authenticates API calls, never an upload URL (which carries its own signature)."""
    seen = Recorder()
    holder: dict[str, TestServer] = {}

    async def start_upload(request: web.Request) -> web.Response:
        await request.post()
        location = str(holder["api"].make_url("/storage/file-1?sig=abc"))
        return web.Response(
            status=302, headers={"Location": location, "X-Together-File-Id": "file-1"}
        )

    async def put(request: web.Request) -> web.Response:
        seen.record(request, await request.read())
        return web.Response(status=200)

    async def preprocess(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": "file-1", "object": "file", "bytes": len(seen.requests[0].body)}
        )

    app = web.Application()
    app.router.add_post("/v1/files", start_upload)
    app.router.add_put("/storage/{name}", put)
    app.router.add_post("/v1/files/{id}/preprocess", preprocess)
    holder["api"] = await serve(app)
    async with fast_client(str(holder["api"].make_url("/v1"))) as client:
        await client.files.upload(batch_lines(2))
    assert [request.method for request in seen.requests] == ["PUT"]
    assert "Authorization" not in seen.requests[0].headers


async def test_emulator_storage_sees_no_key_through_a_faulty_gather(
    make_emulator: MakeEmulator,
) -> None:
    """A whole gather under faults: the emulator's storage port counted no Authorization."""
    emulator = await make_emulator(api_key=KEY, faults=FAULTS, seed=21)
    rows = [chat_line(f"r{i}") for i in range(600)]
    async with fast_client(emulator.base_url) as client:
        results = await gather_batches(
            client, rows, max_requests_per_batch=50, poll_interval=0.01, max_interval=0.05
        )
    assert len(results) == 600
    assert emulator.stats["PUT", "/upload/{token}"] >= 12
    assert emulator.stats.storage_authorization_headers == 0


def foreign_recorder() -> tuple[Recorder, web.Application]:
    """A server that records whatever reaches it and answers like the API would."""
    seen = Recorder()

    async def anything(request: web.Request) -> web.Response:
        seen.record(request, await request.read())
        return web.json_response(job_json("00000000-0000-4000-8000-000000000000"))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return seen, app


REDIRECTED_CALLS: dict[str, Callable[[AsyncTogether, Path], Awaitable[Any]]] = {
    "get_batch": lambda c, _: c.batches.get_batch("b1"),
    "list_batches": lambda c, _: c.batches.list_batches(),
    "create_batch": lambda c, _: c.batches.create_batch("file-1", CHAT),
    "cancel_batch": lambda c, _: c.batches.cancel_batch("b1"),
    "files.retrieve": lambda c, _: c.files.retrieve("file-1"),
    "files.list": lambda c, _: c.files.list(),
    "files.delete": lambda c, _: c.files.delete("file-1"),
    "files.retrieve_content": lambda c, tmp: c.files.retrieve_content("file-1", output=tmp),
    "files.iter_lines": lambda c, _: _drain(c.files.iter_lines("file-1")),
    "batches.wait": lambda c, _: c.batches.wait("b1", poll_interval=0.01),
}


async def _drain(lines: Any) -> None:
    async for _ in lines:
        pass


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("name", sorted(REDIRECTED_CALLS))
async def test_api_redirects_to_another_host_are_not_followed(
    name: str, status: int, serve: Serve, tmp_path: Path
) -> None:
    """Whatever the call and the 3xx, the key never travels to the host the API points at."""
    elsewhere, elsewhere_app = foreign_recorder()
    other = await serve(elsewhere_app)

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, headers={"Location": url_on(other, request.path)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    api = await serve(app)
    async with fast_client(str(api.make_url("/v1"))) as client:
        with pytest.raises(TogetherError) as raised:
            await REDIRECTED_CALLS[name](client, tmp_path)
    assert elsewhere.requests == []
    assert leaks(error_texts(raised.value), KEY) == []
    if isinstance(raised.value, APIStatusError):
        assert raised.value.status_code == status


async def test_a_redirected_upload_start_sends_the_body_but_never_the_key(
    fake: FakeFiles, serve: Serve
) -> None:
    """POST /files answering 302 to a foreign host is the presigned flow: the bytes go there,
    the key does not."""
    elsewhere, elsewhere_app = storing_host(fake)
    other = await serve(elsewhere_app)
    fake.location_override = url_on(other, "/evil/upload")
    async with fast_client(str(fake.api_server.make_url("/v1"))) as client:
        await client.files.upload(batch_lines(3))
    assert [seen.method for seen in elsewhere.requests] == ["PUT"]
    assert "Authorization" not in elsewhere.requests[0].headers


# --- repr, errors, logs -------------------------------------------------------------------------


async def test_no_repr_or_str_shows_the_key(make_emulator: MakeEmulator, tmp_path: Path) -> None:
    """Client (in each state), its config, resources, a watcher, a run, and the emulator
    holding the same key: none shows it."""
    emulator = await make_emulator(api_key=KEY)
    client = fast_client(emulator.base_url)
    texts = [repr(client), str(client)]
    async with client:
        uploaded = await client.files.upload(chat_file(2))
        job = await client.batches.create_batch(uploaded.id, CHAT)
        watcher = client.batches.stream_status(job.id, poll_interval=0.01)
        async with contextlib.aclosing(watcher):
            async for state in watcher:
                texts += [repr(state), repr(watcher)]
        run = BatchRun(client, [chat_line("a")], state_path=tmp_path / "s.sqlite")
        texts += [repr(client), str(client), repr(client.config), str(client.config)]
        texts += [repr(client.files), repr(client.batches), repr(run), repr(uploaded), repr(job)]
        texts += [repr(emulator), str(emulator), repr(emulator.stats)]
    texts += [repr(client), str(client), repr(ClientConfig(api_key=KEY))]
    assert leaks(texts, KEY) == []


def echoing_api(shape: str, status: int) -> web.Application:
    """An API that puts the Authorization header it got into its error answers (as some
    proxies and badly written gateways do)."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        header = request.headers.get("Authorization", "")
        message = f"bad credentials {header!r} for {request.path}"
        if shape == "json-string":
            return web.json_response({"error": message}, status=status)
        if shape == "json-object":
            return web.json_response(
                {"error": {"message": message, "type": "auth", "code": header}}, status=status
            )
        if shape == "html":
            body = f"<html><title>{message}</title><body>{header}</body></html>"
            return web.Response(text=body, status=status, content_type="text/html")
        return web.Response(text=message, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.mark.parametrize("shape", ["json-string", "json-object", "html", "text"])
@pytest.mark.parametrize("status", [400, 401, 500])
async def test_errors_hide_a_key_the_server_echoes_back(
    shape: str, status: int, serve: Serve, tmp_path: Path
) -> None:
    """A server that echoes the Authorization header into its error body does not get the key
    into the text (str or repr) of the error raised, nor of anything it chains."""
    api = await serve(echoing_api(shape, status))
    async with fast_client(str(api.make_url("/v1")), max_retries=1) as client:
        for call in (
            lambda: client.batches.get_batch("b1"),
            lambda: client.batches.create_batch("file-1", CHAT),
            lambda: client.files.retrieve_content("file-1", output=tmp_path),
        ):
            with pytest.raises(APIStatusError) as raised:
                await call()
            assert raised.value.status_code == status
            assert leaks(error_texts(raised.value), KEY) == []


@pytest.mark.parametrize("shape", ["json-string", "json-object", "html", "text"])
async def test_an_error_body_the_server_echoed_the_key_into_is_kept_without_it(
    shape: str, serve: Serve, tmp_path: Path
) -> None:
    """`exc.body` (what the server said, decoded) is scrubbed of the key like the message."""
    api = await serve(echoing_api(shape, 400))
    async with fast_client(str(api.make_url("/v1")), max_retries=0) as client:
        for call in (
            lambda: client.batches.get_batch("b1"),
            lambda: client.files.retrieve_content("file-1", output=tmp_path),
        ):
            with pytest.raises(APIStatusError) as raised:
                await call()
            assert raised.value.body
            assert KEY not in repr(raised.value.body)
            assert "<api key>" in repr(raised.value.body)


async def test_debug_logs_never_hold_the_key_over_a_faulty_flow(
    make_emulator: MakeEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG through upload, create, watch, results, download, gather with
    failing rows, 401s and faults: no record (message, args, extras, traceback) has a key."""
    caplog.set_level(logging.DEBUG)
    emulator = await make_emulator(api_key=KEY, faults=FAULTS, seed=4)
    rows = [chat_line(f"r{i}") for i in range(200)]
    rows += [{"custom_id": f"bad{i}", "body": {"model": "m"}} for i in range(5)]  # 400 rows
    async with fast_client(emulator.base_url) as client:
        uploaded = await client.files.upload(chat_file(30))
        job = await client.batches.create_batch(uploaded.id, CHAT)
        done = await client.batches.wait(job.id, poll_interval=0.01, max_interval=0.05)
        _ = [result async for result in client.batches.results(done)]
        assert done.output_file_id is not None
        await client.files.retrieve_content(done.output_file_id, output=tmp_path / "out.jsonl")
        results = await gather_batches(
            client, rows, max_requests_per_batch=40, max_attempts=1, poll_interval=0.01
        )
        assert sum(not result.ok for result in results) == 5
    errors: list[str] = []
    async with fast_client(emulator.base_url, key=OTHER_KEY, max_retries=0) as wrong:
        for call in (wrong.files.list, lambda: wrong.files.upload(chat_file(1))):
            with pytest.raises(TogetherError) as raised:
                await call()
            errors += error_texts(raised.value)
    assert any(record.name.startswith("together_async") for record in caplog.records)
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    assert sum(emulator.stats.faults_injected.values()) > 0
    assert leaks([caplog.text, *record_texts(caplog.records), *errors], KEY, OTHER_KEY) == []


async def test_state_files_never_hold_the_key(make_emulator: MakeEmulator, tmp_path: Path) -> None:
    """A gather with a state file, cancelled midway under faults and then resumed: no file
    beside the state (SQLite journal and WAL included) contains the key."""
    emulator = await make_emulator(api_key=KEY, faults=FAULTS, seed=9, latency=0.002)
    state = tmp_path / "run" / "state.sqlite"
    rows = [chat_line(f"r{i}") for i in range(300)]
    rows.append({"custom_id": "bad", "body": {"model": "m"}})
    options: dict[str, Any] = {
        "max_requests_per_batch": 60,
        "state_path": state,
        "poll_interval": 0.01,
        "max_interval": 0.05,
    }
    async with fast_client(emulator.base_url) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: gather_batches(client, rows, **options))
            with anyio.fail_after(30):
                while emulator.stats.jobs_created.total() < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()
        results = await gather_batches(client, rows, **options)
    assert len(results) == 301

    def files_with_the_key() -> list[str]:
        paths = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
        assert len(paths) >= 3
        return [str(p) for p in paths if KEY.encode() in p.read_bytes()]

    assert await anyio.to_thread.run_sync(files_with_the_key) == []


# --- the command line ------------------------------------------------------------------------


async def cli(*args: str, cwd: Path, key_in_env: bool = True) -> tuple[int, str, str]:
    """Run `python -m together_async ARGS` in a subprocess (the servers stay on this loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOGETHER_")}
    if key_in_env:
        env["TOGETHER_API_KEY"] = KEY
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "together_async",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    with anyio.fail_after(120):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.slow
async def test_cli_output_never_holds_the_key(
    make_emulator: MakeEmulator, serve: Serve, tmp_path: Path
) -> None:
    """The CLI with --debug, through a faulty run, an invalid file, a 401 and a server echoing
    the key into its errors, prints the key nowhere (key from the environment or --api-key)."""
    emulator = await make_emulator(api_key=KEY, faults=FAULTS, seed=2)
    echo = await serve(echoing_api("json-object", 401))
    await anyio.Path(tmp_path / "in.jsonl").write_bytes(
        jsonl(chat_line(f"r{i}") for i in range(50))
    )
    await anyio.Path(tmp_path / "bad.jsonl").write_bytes(b'{"custom_id": 1}\n')
    base = ["--base-url", emulator.base_url]
    outputs = []
    for args, key_in_env, expected in (
        (
            ["--debug", "run", "in.jsonl", "-o", "out.jsonl", "--poll-interval", "0.02", *base],
            True,
            0,
        ),
        (["--debug", "files", "upload", "bad.jsonl", *base], True, 1),
        (["--debug", "batches", "list", *base, "--api-key", OTHER_KEY], False, 1),
        (["--debug", "batches", "list", "--base-url", str(echo.make_url("/v1"))], True, 1),
        (["--debug", "files", "list", *base, "--api-key", KEY], False, 0),
    ):
        code, stdout, stderr = await cli(*args, cwd=tmp_path, key_in_env=key_in_env)
        assert code == expected, (args, stderr[-2000:])
        outputs += [stdout, stderr]
    assert "DEBUG" in outputs[1]
    written = await anyio.Path(tmp_path / "out.jsonl").read_bytes()
    assert len(written.splitlines()) == 50
    assert leaks([*outputs, written.decode()], KEY, OTHER_KEY) == []


def echoing_headers_api() -> web.Application:
    """An API that answers 401 with the Authorization header it got in X-Request-Id, and the
    key \\u-escaped inside its JSON error (which a scrub of the raw bytes would miss)."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        header = request.headers.get("Authorization", "")
        escaped = "".join(f"\\u{ord(char):04x}" for char in header)
        body = '{"error": {"message": "bad credentials ' + escaped + '"}}'
        return web.Response(
            text=body,
            status=401,
            content_type="application/json",
            headers={"X-Request-Id": header},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_a_key_echoed_in_a_header_or_escaped_in_json_is_hidden(serve: Serve) -> None:
    """The key in X-Request-Id, or \\u-escaped in the JSON body, is in none of the error's
    str, repr, request_id, body or pickled bytes."""
    import pickle

    api = await serve(echoing_headers_api())
    async with fast_client(str(api.make_url("/v1")), max_retries=0) as client:
        with pytest.raises(APIStatusError) as raised:
            await client.batches.get_batch("b1")
    error = raised.value
    assert error.request_id == "Bearer <api key>"
    assert leaks([*error_texts(error), repr(error.body), str(error.request_id)], KEY) == []
    assert KEY.encode() not in pickle.dumps(error)


def test_presigned_query_values_are_hidden_from_an_error_and_its_request_id() -> None:
    """A storage error echoing the presigned URL (headers and body), short values and a bare
    token included, keeps none of the query's values."""
    from together_async._protocol import error_from_response

    for url, values in (
        (
            "https://s3.example/k?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIDZZ",
            ["abcdef0123", "AKIDZZ"],
        ),
        ("https://s3.example/k?sig=SIGCLI", ["SIGCLI"]),
        (
            "https://s3.example/k?a3f1c9e07b5d2468ace13579bdf02468",
            ["a3f1c9e07b5d2468ace13579bdf02468"],
        ),
    ):
        target = url.split("example", 1)[1]
        error = error_from_response(
            403,
            {"x-request-id": target},
            f'{{"error": {{"message": "denied {target}"}}}}'.encode(),
            method="PUT",
            url=url,
        )
        texts = [str(error), repr(error), repr(error.body), str(error.request_id)]
        assert leaks(texts, *values) == [], (url, texts)
