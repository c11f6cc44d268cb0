"""The engines behind the emulator's job runner: what answers each request of a batch.

`EchoEngine` (the default) builds deterministic, realistically shaped responses with no I/O;
`OpenAIEngine` forwards each request to an OpenAI-compatible server (vLLM, llama.cpp, Ollama).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

import aiohttp
import attrs
import orjson
import yarl

__all__ = ["EchoEngine", "Engine", "EngineReply", "OpenAIEngine", "make_engine"]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
#: The endpoints a batch job can run against on the emulator.
SUPPORTED_ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)


@attrs.frozen(kw_only=True)
class EngineReply:
    """The outcome of one request.

    `status_code` None means the request never got an HTTP answer (an upstream that is down);
    then `error_message` and `error_code` say why. A reply with a status >= 400 carries the
    error body in `body` and a summary in `error_message` / `error_code`.
    """

    status_code: int | None
    body: Any = None
    error_message: str | None = None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


class Engine:
    """Answers the requests of a batch. Subclass it to plug a custom backend into the emulator.

    An engine that can answer with no I/O sets `instant = True` and implements `respond_now`;
    the job runner then answers whole chunks of rows in a tight loop (no task per request).
    Otherwise the runner calls `respond` from a bounded pool of worker coroutines.
    """

    instant: bool = False

    async def start(self) -> None:
        """Acquire resources (sessions); called once before the first request."""

    async def aclose(self) -> None:
        """Release what `start` acquired; safe to call twice."""

    def respond_now(self, endpoint: str, body: Any, *, custom_id: str, created: int) -> EngineReply:
        """Answer one request synchronously (instant engines only)."""
        raise NotImplementedError(f"{type(self).__name__} is not an instant engine")

    async def respond(
        self, endpoint: str, body: Any, *, custom_id: str, created: int
    ) -> EngineReply:
        """Answer one request of `endpoint` with the request body `body`."""
        return self.respond_now(endpoint, body, custom_id=custom_id, created=created)


def _bad_request(message: str, param: str | None) -> EngineReply:
    return EngineReply(
        status_code=400,
        body={
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
        error_message=message,
        error_code="invalid_request_error",
    )


def _count_tokens(text: str) -> int:
    # Whitespace words stand in for tokens: deterministic, cheap, and grows with the input.
    return len(text.split())


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _choice_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 8:
        return n
    return 1


def _short_id(prefix: str, custom_id: str, model: str) -> str:
    digest = hashlib.blake2b(f"{custom_id}\x00{model}".encode(), digest_size=12).hexdigest()
    return prefix + digest


class EchoEngine(Engine):
    """Deterministic, realistically shaped answers computed locally, with no I/O.

    Chat completions answer with the last user message (truncated to `max_tokens` words, then
    `finish_reason` is "length"); completions echo the prompt; embeddings are unit vectors
    derived from a hash of each input (`dimensions` from the body, else `embedding_dimensions`).
    Token counts are whitespace word counts of the input and the answer. A body without a
    model, or without messages / prompt / input, gets a 400 answer.
    """

    instant = True

    def __init__(self, *, embedding_dimensions: int = 16) -> None:
        if not 1 <= embedding_dimensions <= 4096:
            raise ValueError("embedding_dimensions must be within 1..4096")
        self.embedding_dimensions = embedding_dimensions

    def __repr__(self) -> str:
        return f"EchoEngine(embedding_dimensions={self.embedding_dimensions})"

    def respond_now(self, endpoint: str, body: Any, *, custom_id: str, created: int) -> EngineReply:
        """Answer one request synchronously."""
        if not isinstance(body, dict):
            return _bad_request("the request body must be a JSON object", None)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", "model")
        if endpoint == CHAT:
            return self._chat(body, model, custom_id, created)
        if endpoint == COMPLETIONS:
            return self._completion(body, model, custom_id, created)
        if endpoint == EMBEDDINGS:
            return self._embedding(body, model)
        return EngineReply(
            status_code=404,
            body={"error": {"message": f"unknown endpoint {endpoint}", "type": "not_found"}},
            error_message=f"the echo engine does not serve {endpoint}",
            error_code="not_found",
        )

    def _chat(self, body: dict[str, Any], model: str, custom_id: str, created: int) -> EngineReply:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad_request("messages must be a non-empty list", "messages")
        prompt_tokens = 2
        reply = ""
        for message in messages:
            if not isinstance(message, dict):
                return _bad_request("each message must be an object", "messages")
            text = _text_of(message.get("content"))
            prompt_tokens += 4 + _count_tokens(text)
            if message.get("role") == "user":
                reply = text
        words, finish_reason = self._truncate(reply, _max_tokens(body))
        content = " ".join(words)
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
            for index in range(_choice_count(body))
        ]
        completion_tokens = len(words) * len(choices)
        return EngineReply(
            status_code=200,
            body={
                "id": _short_id("chatcmpl-", custom_id, model),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _completion(
        self, body: dict[str, Any], model: str, custom_id: str, created: int
    ) -> EngineReply:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts: list[str] = prompt
        elif isinstance(prompt, str):
            prompts = [prompt]
        else:
            return _bad_request("prompt must be a string or a list of strings", "prompt")
        limit = _max_tokens(body)
        choices = []
        prompt_tokens = completion_tokens = 0
        for index, text in enumerate(prompts):
            words, finish_reason = self._truncate(text, limit)
            prompt_tokens += _count_tokens(text)
            completion_tokens += len(words)
            choices.append(
                {
                    "index": index,
                    "text": " ".join(words),
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            )
        return EngineReply(
            status_code=200,
            body={
                "id": _short_id("cmpl-", custom_id, model),
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _embedding(self, body: dict[str, Any], model: str) -> EngineReply:
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input]
        elif (
            isinstance(raw_input, list)
            and raw_input
            and all(isinstance(item, str) for item in raw_input)
        ):
            inputs = raw_input
        else:
            return _bad_request("input must be a string or a non-empty list of strings", "input")
        dimensions = body.get("dimensions")
        if not (isinstance(dimensions, int) and not isinstance(dimensions, bool)):
            dimensions = self.embedding_dimensions
        elif not 1 <= dimensions <= 4096:
            return _bad_request("dimensions must be within 1..4096", "dimensions")
        tokens = sum(_count_tokens(text) for text in inputs)
        return EngineReply(
            status_code=200,
            body={
                "object": "list",
                "data": [
                    {"object": "embedding", "index": index, "embedding": embed(text, dimensions)}
                    for index, text in enumerate(inputs)
                ],
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    @staticmethod
    def _truncate(text: str, limit: int | None) -> tuple[list[str], str]:
        words = text.split()
        if limit is not None and len(words) > limit:
            return words[:limit], "length"
        return words, "stop"


def embed(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`: the same text always gives the same vector."""
    seed = text.encode()
    raw = bytearray()
    block = 0
    while len(raw) < 2 * dimensions:
        raw += hashlib.blake2b(seed, digest_size=64, salt=block.to_bytes(16, "big")).digest()
        block += 1
    values = [
        int.from_bytes(raw[2 * i : 2 * i + 2], "big") / 32767.5 - 1.0 for i in range(dimensions)
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


class OpenAIEngine(Engine):
    """Forwards each request to an OpenAI-compatible server and reports what it answered.

    Args:
        upstream: the server's base URL, e.g. "http://127.0.0.1:8000/v1" (a URL with no path
            gets "/v1"). The request of endpoint "/v1/chat/completions" goes to
            "<upstream>/chat/completions".
        api_key: a key for the upstream server, if it wants one (never the emulator's key).
        timeout: seconds allowed for one upstream request.

    Upstream HTTP errors become error rows with the upstream's status; connection failures and
    timeouts become error rows with code "upstream_unavailable".
    """

    def __init__(self, upstream: str, *, api_key: str | None = None, timeout: float = 600.0):
        url = yarl.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream must be an http(s) URL, got {upstream!r}")
        if url.path in ("", "/"):
            url = url.with_path("/v1")
        self.upstream = str(url).rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIEngine(upstream={self.upstream!r})"

    async def start(self) -> None:
        """Open the HTTP session."""
        if self._session is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout), headers=headers
            )

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def respond(
        self, endpoint: str, body: Any, *, custom_id: str, created: int
    ) -> EngineReply:
        """Forward one request upstream."""
        if self._session is None:
            raise RuntimeError("OpenAIEngine.start() was not called")
        path = endpoint[3:] if endpoint.startswith("/v1/") else endpoint
        try:
            async with self._session.post(self.upstream + path, json=body) as response:
                status = response.status
                raw = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return EngineReply(
                status_code=None,
                error_message=f"upstream request failed: {type(exc).__name__}: {exc}",
                error_code="upstream_unavailable",
            )
        try:
            decoded: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            decoded = raw.decode("utf-8", "replace")
        if 200 <= status < 300:
            if isinstance(decoded, dict):
                return EngineReply(status_code=status, body=decoded)
            return EngineReply(
                status_code=502,
                body={"error": {"message": "upstream answered with no JSON object"}},
                error_message="upstream answered with no JSON object",
                error_code="upstream_invalid_response",
            )
        return EngineReply(
            status_code=status,
            body=decoded,
            error_message=_upstream_message(decoded, status),
            error_code=_upstream_code(decoded, status),
        )


def _upstream_message(body: Any, status: int) -> str:
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict) and error.get("message") is not None:
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message") is not None:
            return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return f"upstream answered HTTP {status}"


def _upstream_code(body: Any, status: int) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        for key in ("code", "type"):
            if isinstance(error.get(key), str) and error[key]:
                return str(error[key])
    return f"upstream_http_{status}"


def make_engine(
    engine: str | Engine, *, upstream: str | None = None, upstream_api_key: str | None = None
) -> Engine:
    """An engine from its name ("echo", "openai") or an `Engine` instance as is."""
    if isinstance(engine, Engine):
        return engine
    if engine == "echo":
        return EchoEngine()
    if engine == "openai":
        if not upstream:
            raise ValueError("the openai engine needs an upstream URL (--upstream)")
        return OpenAIEngine(upstream, api_key=upstream_api_key)
    raise ValueError(f"unknown engine {engine!r}: use 'echo' or 'openai'")
