"""AsyncTogether over real loopback HTTP: session lifecycle, headers, retries, error mapping,
transport failures, and the API key never leaking."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import pytest
import stamina
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port
from http_fakes import SECRET_KEY, Recorder, job_json
from multidict import CIMultiDict, CIMultiDictProxy
from stamina.instrumentation import RetryDetails, get_on_retry_hooks, set_on_retry_hooks

from together_async import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncTogether,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ClientConfig,
    InternalServerError,
    MissingAPIKeyError,
    RateLimitError,
    TogetherError,
)
from together_async._transport import _plain_headers

pytestmark = pytest.mark.usefixtures("fast_retries")

Serve = Callable[[web.Application], Awaitable[TestServer]]
MakeClient = Callable[..., AsyncTogether]


Answer = Callable[[], web.StreamResponse]


def reply(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """A fresh JSON response per request (an aiohttp response can be sent only once)."""
    return lambda: web.json_response(body, status=status, headers=headers)


def batches_app(recorder: Recorder, *answers: Answer) -> web.Application:
    """An API whose GET /v1/batches gives `answers` in turn (the last one repeats)."""
    script = list(answers) or [reply([job_json("b1")])]

    async def list_batches(request: web.Request) -> web.StreamResponse:
        recorder.record(request)
        index = min(len(recorder.requests) - 1, len(script) - 1)
        return script[index]()

    app = web.Application()
    app.router.add_get("/v1/batches", list_batches)
    return app


async def test_requests_carry_the_key_and_a_user_agent(
    serve: Serve, make_client: MakeClient
) -> None:
    """Every API request has `Authorization: Bearer <key>` and our User-Agent."""
    recorder = Recorder()
    server = await serve(batches_app(recorder))
    jobs = await make_client(server).batches.list_batches()
    assert [job.id for job in jobs] == ["b1"]
    request = recorder.requests[0]
    assert request.headers["Authorization"] == f"Bearer {SECRET_KEY}"
    assert request.headers["User-Agent"].startswith("together-async/")


def test_client_made_outside_a_loop_opens_its_session_lazily() -> None:
    """Notebook style: construct with no running loop, then await calls; the session opens on
    the first call, inside the running loop."""
    port = unused_port()
    client = AsyncTogether(api_key=SECRET_KEY, base_url=f"http://127.0.0.1:{port}")
    assert client.state == "unopened"

    async def main() -> list[str]:
        server = TestServer(batches_app(Recorder()), host="127.0.0.1", port=port)
        await server.start_server()
        try:
            jobs = await client.batches.list_batches()
            assert client.state == "open"
            return [job.id for job in jobs]
        finally:
            await client.aclose()
            await server.close()

    assert asyncio.run(main()) == ["b1"]
    assert client.state == "closed"


async def test_async_with_opens_and_closes(serve: Serve) -> None:
    """`async with` opens the client and closes its own session on exit."""
    server = await serve(batches_app(Recorder()))
    client = AsyncTogether(api_key=SECRET_KEY, base_url=str(server.make_url("/v1")))
    async with client as entered:
        assert entered is client
        assert client.state == "open"
        await client.batches.list_batches()
        session = client._own_session
        assert session is not None
    assert client.state == "closed"
    assert session.closed


async def test_aclose_is_safe_twice(serve: Serve) -> None:
    """Closing a client twice is harmless."""
    server = await serve(batches_app(Recorder()))
    client = AsyncTogether(api_key=SECRET_KEY, base_url=str(server.make_url("/v1")))
    await client.batches.list_batches()
    await client.aclose()
    await client.aclose()
    assert client.is_closed


async def test_closing_an_unopened_client_opens_nothing() -> None:
    """aclose() on a client that never sent a request needs no session."""
    client = AsyncTogether(api_key=SECRET_KEY)
    await client.aclose()
    assert client.state == "closed"
    assert client._own_session is None


async def test_closed_client_refuses_calls(serve: Serve) -> None:
    """A call on a closed client raises ClientClosedError; the server sees nothing."""
    recorder = Recorder()
    server = await serve(batches_app(recorder))
    client = AsyncTogether(api_key=SECRET_KEY, base_url=str(server.make_url("/v1")))
    await client.aclose()
    with pytest.raises(ClientClosedError):
        await client.batches.list_batches()
    with pytest.raises(ClientClosedError):
        async with client:
            pass
    assert recorder.requests == []


async def test_callers_session_is_used_and_not_closed(serve: Serve) -> None:
    """A session passed in is used for requests and left open by aclose()."""
    recorder = Recorder()
    server = await serve(batches_app(recorder))
    async with aiohttp.ClientSession(headers={"X-Caller": "yes"}) as session:
        async with AsyncTogether(
            api_key=SECRET_KEY, base_url=str(server.make_url("/v1")), session=session
        ) as client:
            await client.batches.list_batches()
        assert not session.closed
        assert recorder.requests[0].headers["X-Caller"] == "yes"


async def test_missing_key_fails_at_the_first_call(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key: construction works, the first call raises MissingAPIKeyError naming the
    variable, and nothing is sent."""
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    recorder = Recorder()
    server = await serve(batches_app(recorder))
    async with AsyncTogether(base_url=str(server.make_url("/v1"))) as client:
        with pytest.raises(MissingAPIKeyError, match="TOGETHER_API_KEY"):
            await client.batches.list_batches()
    assert recorder.requests == []


async def test_key_from_environment_is_used(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOGETHER_API_KEY is read when no key is passed."""
    monkeypatch.setenv("TOGETHER_API_KEY", "env-key")
    recorder = Recorder()
    server = await serve(batches_app(recorder))
    async with AsyncTogether(base_url=str(server.make_url("/v1"))) as client:
        await client.batches.list_batches()
    assert recorder.requests[0].headers["Authorization"] == "Bearer env-key"


async def test_retryable_status_is_retried(serve: Serve, make_client: MakeClient) -> None:
    """A 503 then a 200: the call succeeds on the second attempt."""
    recorder = Recorder()
    server = await serve(
        batches_app(
            recorder,
            reply({"error": "busy"}, status=503),
            reply([job_json("b1")]),
        )
    )
    jobs = await make_client(server).batches.list_batches()
    assert [job.id for job in jobs] == ["b1"]
    assert len(recorder.requests) == 2


async def test_rate_limit_with_retry_after_is_retried(
    serve: Serve, make_client: MakeClient
) -> None:
    """A 429 with Retry-After is retried (the wait itself is zeroed in test mode)."""
    recorder = Recorder()
    server = await serve(
        batches_app(
            recorder,
            reply({"error": "slow down"}, status=429, headers={"Retry-After": "1"}),
            reply([job_json("b1")]),
        )
    )
    await make_client(server).batches.list_batches()
    assert len(recorder.requests) == 2


async def test_retries_stop_at_max_retries(serve: Serve, make_client: MakeClient) -> None:
    """With max_retries=2 a server that always fails sees 3 attempts, then the error."""
    recorder = Recorder()
    server = await serve(batches_app(recorder, reply({"error": "down"}, status=500)))
    with pytest.raises(InternalServerError, match="down") as caught:
        await make_client(server, max_retries=2).batches.list_batches()
    assert caught.value.status_code == 500
    assert len(recorder.requests) == 3


async def test_per_call_max_retries_overrides_the_client(
    serve: Serve, make_client: MakeClient
) -> None:
    """max_retries=0 on one call means exactly one attempt."""
    recorder = Recorder()
    server = await serve(batches_app(recorder, reply({"error": "x"}, status=502)))
    with pytest.raises(InternalServerError):
        await make_client(server, max_retries=4).batches.list_batches(max_retries=0)
    assert len(recorder.requests) == 1


async def test_client_errors_are_not_retried(serve: Serve, make_client: MakeClient) -> None:
    """A 400 is raised at once as BadRequestError with the server's message."""
    recorder = Recorder()
    server = await serve(batches_app(recorder, reply({"error": "bad endpoint"}, status=400)))
    with pytest.raises(BadRequestError, match="bad endpoint"):
        await make_client(server).batches.list_batches()
    assert len(recorder.requests) == 1


@pytest.fixture
def retry_details() -> Iterator[list[RetryDetails]]:
    """The RetryDetails stamina hands its on-retry hooks during the test."""
    seen: list[RetryDetails] = []
    previous = get_on_retry_hooks()
    set_on_retry_hooks([seen.append])
    yield seen
    set_on_retry_hooks(previous)


async def test_retries_are_counted_from_the_first_attempt(
    serve: Serve, make_client: MakeClient, retry_details: list[RetryDetails]
) -> None:
    """Two 503s then a 200: stamina's hooks see retries 1 and 2, the first caused by the
    first attempt's failure (which ran outside stamina's context)."""
    recorder = Recorder()
    server = await serve(
        batches_app(
            recorder,
            reply({"error": "busy once"}, status=503),
            reply({"error": "busy twice"}, status=503),
            reply([job_json("b1")]),
        )
    )
    await make_client(server).batches.list_batches()
    assert len(recorder.requests) == 3
    assert [details.retry_num for details in retry_details] == [1, 2]
    causes = [details.caused_by for details in retry_details]
    assert all(isinstance(cause, InternalServerError) for cause in causes)
    assert ["busy once" in str(causes[0]), "busy twice" in str(causes[1])] == [True, True]


async def test_a_failure_that_is_not_retried_runs_no_retry_hook(
    serve: Serve, make_client: MakeClient, retry_details: list[RetryDetails]
) -> None:
    """A 400 is raised without stamina's on-retry hooks hearing of it."""
    server = await serve(batches_app(Recorder(), reply({"error": "bad"}, status=400)))
    with pytest.raises(BadRequestError):
        await make_client(server).batches.list_batches()
    assert retry_details == []


async def test_stamina_deactivated_means_one_attempt(serve: Serve, make_client: MakeClient) -> None:
    """With stamina.set_active(False) a retryable failure is raised after one attempt."""
    recorder = Recorder()
    server = await serve(batches_app(recorder, reply({"error": "down"}, status=503)))
    stamina.set_active(False)
    try:
        with pytest.raises(InternalServerError):
            await make_client(server, max_retries=3).batches.list_batches()
    finally:
        stamina.set_active(True)
    assert len(recorder.requests) == 1


async def test_nested_and_html_error_bodies_reach_the_caller(
    serve: Serve, make_client: MakeClient
) -> None:
    """{"error": {"message"}} and an HTML page both give a readable message end to end."""
    recorder = Recorder()
    server = await serve(
        batches_app(
            recorder,
            reply({"error": {"message": "Invalid API key"}}, status=401),
        )
    )
    with pytest.raises(AuthenticationError, match="Invalid API key"):
        await make_client(server).batches.list_batches()

    def html() -> web.Response:
        return web.Response(
            status=502, text="<html><title>Bad Gateway</title></html>", content_type="text/html"
        )

    server = await serve(batches_app(Recorder(), html))
    with pytest.raises(InternalServerError, match="Bad Gateway"):
        await make_client(server, max_retries=0).batches.list_batches()


async def test_refused_connection_becomes_api_connection_error() -> None:
    """Nothing listening: APIConnectionError (not an aiohttp or OS exception), after retries."""
    client = AsyncTogether(api_key=SECRET_KEY, base_url="http://127.0.0.1:9/v1", max_retries=1)
    try:
        with pytest.raises(APIConnectionError) as caught:
            await client.batches.list_batches()
    finally:
        await client.aclose()
    assert not isinstance(caught.value, aiohttp.ClientError)
    assert "GET http://127.0.0.1:9/v1/batches" in str(caught.value)


async def test_silent_server_becomes_api_timeout_error(serve: Serve) -> None:
    """A server that never answers within the timeout gives APITimeoutError."""
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/batches", hang)
    server = await serve(app)
    async with AsyncTogether(
        api_key=SECRET_KEY, base_url=str(server.make_url("/v1")), timeout=0.2, max_retries=0
    ) as client:
        with pytest.raises(APITimeoutError):
            await client.batches.list_batches()
    never.set()


async def test_reset_connection_becomes_api_connection_error(serve: Serve) -> None:
    """A server that drops the connection mid-answer gives APIConnectionError."""

    async def drop(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"[")
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get("/v1/batches", drop)
    server = await serve(app)
    async with AsyncTogether(
        api_key=SECRET_KEY, base_url=str(server.make_url("/v1")), max_retries=0
    ) as client:
        with pytest.raises(APIConnectionError):
            await client.batches.list_batches()


async def test_redirect_to_another_host_is_not_followed(
    serve: Serve, make_client: MakeClient
) -> None:
    """An API answer redirecting elsewhere is an error; the key never reaches the other host."""
    elsewhere = Recorder()
    other_app = batches_app(elsewhere)
    other = await serve(other_app)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(other.make_url("/v1/batches")))

    app = web.Application()
    app.router.add_get("/v1/batches", redirect)
    server = await serve(app)
    with pytest.raises(APIStatusError) as caught:
        await make_client(server).batches.list_batches()
    assert caught.value.status_code == 302
    assert elsewhere.requests == []


async def test_repr_str_errors_and_debug_logs_never_show_the_key(
    serve: Serve, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG logging on, the key appears in no repr, str, error text or log record."""
    recorder = Recorder()
    server = await serve(
        batches_app(
            recorder,
            reply({"error": "boom"}, status=500),
            reply({"error": {"message": "bad key"}}, status=401),
        )
    )
    caplog.set_level(logging.DEBUG)
    client = make_client(server, max_retries=1)
    texts = [repr(client), str(client), repr(client.config), str(client.config)]
    with pytest.raises(TogetherError) as caught:
        await client.batches.list_batches()
    error: BaseException | None = caught.value
    while error is not None:
        texts += [str(error), repr(error), repr(getattr(error, "body", None))]
        error = error.__cause__ or error.__context__
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.__dict__) for record in caplog.records]
    assert any("together_async" in record.name for record in caplog.records)
    assert all(SECRET_KEY not in text for text in texts)


async def test_client_attributes_never_show_the_key_after_a_call(
    serve: Serve, make_client: MakeClient
) -> None:
    """After a request, the repr of the client's attributes (vars) holds no key either."""
    server = await serve(batches_app(Recorder()))
    client = make_client(server)
    await client.batches.list_batches()
    assert SECRET_KEY not in repr(vars(client))


async def test_headers_a_request_changes_never_reach_the_next_one(
    serve: Serve, make_client: MakeClient
) -> None:
    """Extra headers, or changes to the headers one request got, never reach the next one."""
    client = make_client(await serve(batches_app(Recorder())))
    url = client._url("batches")
    first, credential = client._headers_for(url, {"X-Extra": "1"})
    assert credential is not None
    first["Authorization"] = "changed"
    again, credential = client._headers_for(url)
    assert credential is not None
    assert credential.headers(again) == {
        "User-Agent": again["User-Agent"],
        "Authorization": f"Bearer {SECRET_KEY}",
    }


async def test_debug_log_names_each_request_and_its_answer(
    serve: Serve, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG on, each request is logged as method, URL without query, status and size."""
    server = await serve(batches_app(Recorder()))
    caplog.set_level(logging.DEBUG, logger="together_async.transport")
    await make_client(server).batches.list_batches()
    url = str(server.make_url("/v1/batches"))
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith(f"GET {url} -> 200 (") for message in messages), messages


async def test_rate_limit_error_carries_retry_after(serve: Serve, make_client: MakeClient) -> None:
    """When retries run out, the RateLimitError says how long the server asked to wait."""
    server = await serve(
        batches_app(
            Recorder(),
            reply({"error": "slow"}, status=429, headers={"retry-after-ms": "1500"}),
        )
    )
    with pytest.raises(RateLimitError) as caught:
        await make_client(server, max_retries=0).batches.list_batches()
    assert caught.value.retry_after == 1.5


async def test_client_refuses_a_second_event_loop(serve: Serve) -> None:
    """A client opened in one loop explains itself when used from another."""
    server = await serve(batches_app(Recorder()))
    client = AsyncTogether(api_key=SECRET_KEY, base_url=str(server.make_url("/v1")))
    await client.batches.list_batches()

    def in_another_loop() -> None:
        async def call() -> None:
            await client.batches.list_batches()

        with pytest.raises(TogetherError, match="another event loop"):
            asyncio.run(call())

    await asyncio.to_thread(in_another_loop)
    await client.aclose()


async def test_from_config_spells_out_every_setting(serve: Serve) -> None:
    """AsyncTogether.from_config runs with the given retry policy."""
    recorder = Recorder()
    server = await serve(batches_app(recorder, reply({"error": "x"}, status=503)))
    config = ClientConfig(
        api_key=SECRET_KEY,
        base_url=str(server.make_url("/v1")),
        max_retries=3,
        retry_wait_initial=0.0,
        retry_wait_jitter=0.0,
    )
    async with AsyncTogether.from_config(config) as client:
        assert client.config is config
        with pytest.raises(InternalServerError):
            await client.batches.list_batches()
    assert len(recorder.requests) == 4


def test_response_headers_are_lower_cased_and_repeats_joined() -> None:
    """Header names come back lower-case; a repeated header's values are joined with ", "."""
    raw = CIMultiDict([("Retry-After", "2"), ("Via", "a"), ("X-Request-Id", "r"), ("via", "b")])
    assert _plain_headers(CIMultiDictProxy(raw)) == {
        "retry-after": "2",
        "via": "a, b",
        "x-request-id": "r",
    }
    assert _plain_headers(CIMultiDictProxy(CIMultiDict([("A", "1")]))) == {"a": "1"}
