"""The emulator's engines: the echo engine's deterministic, realistically shaped answers (pure
tests), and the openai engine forwarding to a fake OpenAI-compatible upstream on loopback."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import MakeEmulator, Serve
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_line, jsonl

from together_async.emulator import EchoEngine, OpenAIEngine

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


def _echo(endpoint: str, body: Any, custom_id: str = "r1") -> Any:
    return EchoEngine().respond_now(endpoint, body, custom_id=custom_id, created=1_700_000_000)


def test_chat_answer_has_the_openai_shape() -> None:
    """A chat completion: id, object, created, model, choices with message and finish_reason."""
    reply = _echo(CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi you"}]})
    assert reply.status_code == 200
    body = reply.body
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["created"] == 1_700_000_000
    assert body["model"] == "m"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hi you"}
    assert choice["finish_reason"] == "stop"


def test_chat_usage_is_derived_from_the_input() -> None:
    """Longer prompts cost more prompt tokens; total = prompt + completion."""
    short = _echo(CHAT, {"model": "m", "messages": [{"role": "user", "content": "a"}]}).body
    long = _echo(CHAT, {"model": "m", "messages": [{"role": "user", "content": "a " * 50}]}).body
    assert long["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"]
    usage = long["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 50


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    """An answer longer than max_tokens is cut, and finish_reason says "length"."""
    body = _echo(
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 2},
    ).body
    assert body["choices"][0]["message"]["content"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_echo_is_deterministic() -> None:
    """The same request gives the same answer; another custom_id gives another id."""
    request = {"model": "m", "messages": [{"role": "user", "content": "same"}]}
    assert _echo(CHAT, request).body == _echo(CHAT, request).body
    assert _echo(CHAT, request, "r2").body["id"] != _echo(CHAT, request).body["id"]


def test_completion_answer_has_the_openai_shape() -> None:
    """A text completion: object text_completion, choices with text."""
    body = _echo(COMPLETIONS, {"model": "m", "prompt": "say this"}).body
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "say this"
    assert body["usage"]["prompt_tokens"] == 2


def test_embeddings_are_deterministic_unit_vectors() -> None:
    """Each input gets a unit vector that depends only on its text."""
    body = _echo(EMBEDDINGS, {"model": "e", "input": ["alpha", "beta", "alpha"]}).body
    vectors = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert vectors[0] == vectors[2] != vectors[1]
    assert all(len(v) == 16 for v in vectors)
    assert math.isclose(math.sqrt(sum(x * x for x in vectors[0])), 1.0, abs_tol=1e-4)
    assert body["object"] == "list"


def test_embedding_dimensions_come_from_the_request() -> None:
    """`dimensions` in the body sets the vector length."""
    body = _echo(EMBEDDINGS, {"model": "e", "input": "x", "dimensions": 64}).body
    assert len(body["data"][0]["embedding"]) == 64


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        (CHAT, {"model": "m"}, "messages"),
        (CHAT, {"model": "m", "messages": []}, "messages"),
        (COMPLETIONS, {"model": "m"}, "prompt"),
        (EMBEDDINGS, {"model": "m", "input": []}, "input"),
    ],
)
def test_bad_bodies_get_400(endpoint: str, body: dict[str, Any], param: str) -> None:
    """A body missing what its endpoint needs answers 400 naming the parameter."""
    reply = _echo(endpoint, body)
    assert reply.status_code == 400
    assert reply.body["error"]["param"] == param
    assert reply.error_code == "invalid_request_error"


# -- the openai engine -------------------------------------------------------------------------


def _upstream_app(seen: list[dict[str, Any]]) -> web.Application:
    """A fake OpenAI-compatible server: echoes the model back, fails on model "boom"."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if body.get("model") == "boom":
            return web.json_response({"error": {"message": "model exploded"}}, status=500)
        return web.json_response(
            {
                "id": "chatcmpl-up",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "from upstream"}}
                ],
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_openai_engine_forwards_the_body(serve: Serve) -> None:
    """The request body goes to <upstream>/chat/completions; the answer comes back as is."""
    seen: list[dict[str, Any]] = []
    server = await serve(_upstream_app(seen))
    engine = OpenAIEngine(str(server.make_url("/v1")), api_key="upstream-key")
    await engine.start()
    try:
        reply = await engine.respond(
            CHAT, {"model": "llama", "messages": []}, custom_id="r1", created=0
        )
    finally:
        await engine.aclose()
    assert reply.status_code == 200
    assert reply.body["choices"][0]["message"]["content"] == "from upstream"
    assert seen[0]["path"] == "/v1/chat/completions"
    assert seen[0]["body"] == {"model": "llama", "messages": []}
    assert seen[0]["headers"]["Authorization"] == "Bearer upstream-key"


async def test_openai_engine_adds_v1_to_a_bare_host(serve: Serve) -> None:
    """An upstream given as a bare host gets /v1, like OpenAI-compatible servers expect."""
    seen: list[dict[str, Any]] = []
    server = await serve(_upstream_app(seen))
    engine = OpenAIEngine(str(server.make_url("")))
    assert engine.upstream.endswith("/v1")


async def test_openai_engine_reports_upstream_errors(serve: Serve) -> None:
    """An upstream 500 becomes an error reply with that status and the upstream's message."""
    server = await serve(_upstream_app([]))
    engine = OpenAIEngine(str(server.make_url("/v1")))
    await engine.start()
    try:
        reply = await engine.respond(CHAT, {"model": "boom"}, custom_id="r1", created=0)
    finally:
        await engine.aclose()
    assert reply.status_code == 500
    assert reply.error_message == "model exploded"


async def test_openai_engine_reports_an_unreachable_upstream() -> None:
    """Nothing listening upstream: an error reply with code upstream_unavailable, no status."""
    engine = OpenAIEngine("http://127.0.0.1:9/v1", timeout=5)
    await engine.start()
    try:
        reply = await engine.respond(CHAT, {"model": "m"}, custom_id="r1", created=0)
    finally:
        await engine.aclose()
    assert reply.status_code is None
    assert reply.error_code == "upstream_unavailable"


async def test_job_on_the_openai_engine(serve: Serve, make_emulator: MakeEmulator) -> None:
    """A whole batch runs against the upstream: its answers in the output, its failures as error
    rows, and the emulator's own key never sent upstream."""
    seen: list[dict[str, Any]] = []
    server = await serve(_upstream_app(seen))
    emulator = await make_emulator(
        engine="openai", upstream=str(server.make_url("/v1")), concurrency=3
    )
    rows = [chat_line(f"ok-{i}", model="llama") for i in range(5)]
    rows.append(chat_line("fails", model="boom"))
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as session:
        api = RawAPI(session, emulator.base_url)
        done = await api.wait_for((await api.submit(jsonl(rows)))["id"])
        outputs = await api.rows(done["output_file_id"])
        errors = await api.rows(done["error_file_id"])
    assert done["status"] == "COMPLETED"
    assert sorted(row["custom_id"] for row in outputs) == [f"ok-{i}" for i in range(5)]
    assert all(row["response"]["body"]["id"] == "chatcmpl-up" for row in outputs)
    assert [(row["custom_id"], row["response"]["status_code"]) for row in errors] == [
        ("fails", 500)
    ]
    assert len(seen) == 6
    assert all(EMULATOR_KEY not in str(request["headers"]) for request in seen)
