"""Every public exception survives pickle and copy with its type, attributes and message,
including across a process boundary."""

from __future__ import annotations

import asyncio
import copy
import inspect
import multiprocessing
import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeClient, Serve
from http_fakes import SECRET_KEY

import together_async
from together_async import (
    AsyncTogether,
    BatchFileProblem,
    BatchJob,
    BatchJobStatus,
    NotFoundError,
    TogetherError,
)
from together_async._errors import status_error_class
from together_async.emulator import Emulator

EXCEPTION_CLASSES = sorted(
    (
        value
        for name in together_async.__all__
        if isinstance(value := getattr(together_async, name), type)
        and issubclass(value, TogetherError)
    ),
    key=lambda cls: cls.__name__,
)

MISSING_JOB = "00000000-0000-4000-8000-000000000000"

LAST_JOB = BatchJob(
    id="3f1c2b7e-8d4a-4e2b-9c1d-5a6b7c8d9e0f",
    status=BatchJobStatus.IN_PROGRESS,
    user_id="user-1",
    input_file_id="file-1b2c3d4e-0000-4000-8000-000000000001",
    file_size_bytes=1234,
    endpoint="/v1/chat/completions",
    progress=42.5,
    model_id="meta-llama/Llama-3-8b",
    created_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
    job_deadline=datetime(2026, 1, 3, 3, 4, 5, tzinfo=timezone.utc),
    request_counts={"total": 10, "completed": 4, "failed": 0},
)

# Realistic values by constructor parameter name. A new exception class with a parameter not
# listed here fails `build` loudly, so it gets a value (and coverage) rather than a skip.
SAMPLE_ARGUMENTS: dict[str, Any] = {
    "message": "batch job 3f1c2b7e not found (GET /v1/batches/3f1c2b7e)",
    "body": {
        "error": {
            "message": "batch job 3f1c2b7e not found",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    },
    "request_id": "req-8c1f0a2b",
    "retry_after": 2.5,
    "batch_id": LAST_JOB.id,
    "last_job": LAST_JOB,
    "batch_ids": (LAST_JOB.id, "9a8b7c6d-0000-4000-8000-000000000002"),
    "failures": 7,
    "problems": [
        BatchFileProblem(line=3, field="custom_id", message="duplicates line 1"),
        BatchFileProblem(line=9, field="body", message="is not a JSON object"),
    ],
    "problem_count": 5,
    "source": "requests.jsonl",
    "limit": 8 * 1024 * 1024,
    "status": BatchJobStatus.IN_PROGRESS,
    "job": LAST_JOB,
}

STATUS_BY_CLASS = {
    status_error_class(status): status for status in (418, 400, 401, 403, 404, 409, 422, 429, 503)
}

Copier = Callable[[Any], Any]
COPIERS: dict[str, Copier] = {
    "pickle": lambda exc: pickle.loads(pickle.dumps(exc)),
    "pickle protocol 0": lambda exc: pickle.loads(pickle.dumps(exc, protocol=0)),
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
}


def build(cls: type[TogetherError]) -> TogetherError:
    """An instance of `cls` with every constructor argument given a realistic value."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name == "status_code":
            value: Any = STATUS_BY_CLASS.get(cls, 418)
        elif name in SAMPLE_ARGUMENTS:
            value = SAMPLE_ARGUMENTS[name]
        else:
            raise AssertionError(f"add a realistic value for {cls.__name__}'s parameter {name!r}")
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[name] = value
        else:
            args.append(value)
    if not args and not kwargs:
        args.append(SAMPLE_ARGUMENTS["message"])
    return cls(*args, **kwargs)


def public_state(exc: BaseException) -> dict[str, Any]:
    return {key: value for key, value in vars(exc).items() if not key.startswith("_")}


def test_every_exported_error_class_is_enumerated() -> None:
    """The table covers every TogetherError subclass exported from together_async."""
    names = {cls.__name__ for cls in EXCEPTION_CLASSES}
    assert {"TogetherError", "NotFoundError", "BatchFileError", "WaitTimeoutError"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("copier", list(COPIERS.values()), ids=list(COPIERS))
@pytest.mark.parametrize("cls", EXCEPTION_CLASSES, ids=lambda cls: cls.__name__)
def test_round_trip_keeps_type_attributes_and_message(
    cls: type[TogetherError], copier: Copier
) -> None:
    """A copy has the same class, attributes, args and str() as the original."""
    original = build(cls)
    clone = copier(original)
    assert type(clone) is cls
    assert clone is not original
    assert public_state(clone) == public_state(original)
    assert clone.args == original.args
    assert str(clone) == str(original)
    assert repr(clone) == repr(original)


def test_attributes_set_after_construction_survive() -> None:
    """Notes and attributes added after the error was built travel with it."""
    original = NotFoundError("gone", status_code=404, request_id="req-1")
    original.add_note("while fetching results")
    original.retry_after = 3.0
    clone = pickle.loads(pickle.dumps(original))
    assert clone.__notes__ == ["while fetching results"]
    assert clone.retry_after == 3.0


class _LaterError(TogetherError):
    """Stands for an exception class added after this test was written: keyword-only init."""

    def __init__(self, message: str, *, shard: int, ids: list[str]) -> None:
        super().__init__(f"{message} (shard {shard})")
        self.shard = shard
        self.ids = ids


def test_subclass_without_pickling_code_of_its_own_round_trips() -> None:
    """Any TogetherError subclass with a keyword-only constructor pickles with no extra code."""
    original = _LaterError("two shards failed", shard=3, ids=["a", "b"])
    clone = pickle.loads(pickle.dumps(original))
    assert type(clone) is _LaterError
    assert (clone.shard, clone.ids, str(clone)) == (3, ["a", "b"], str(original))


async def test_pickled_error_holds_no_api_key(serve: Serve, make_client: MakeClient) -> None:
    """An error answer that echoed the key pickles to bytes without the key."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": f"no such job; you sent {request.headers['Authorization']}"}, status=404
        )

    app = web.Application()
    app.router.add_get("/v1/batches/{id}", echo)
    client = make_client(await serve(app))
    with pytest.raises(NotFoundError) as caught:
        await client.batches.get_batch(MISSING_JOB)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert SECRET_KEY.encode() not in pickle.dumps(caught.value, protocol=protocol)


def _fetch_missing_job(base_url: str, api_key: str) -> None:
    """Runs in a worker process: a real 404 from the emulator, raised to the pool."""

    async def fetch() -> None:
        async with AsyncTogether(base_url=base_url, api_key=api_key) as client:
            await client.batches.get_batch(MISSING_JOB)

    asyncio.run(fetch())


async def test_worker_process_hands_parent_a_not_found_error(emulator: Emulator) -> None:
    """A ProcessPoolExecutor worker's NotFoundError reaches the parent as NotFoundError."""
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        with pytest.raises(NotFoundError) as caught:
            await loop.run_in_executor(
                pool, _fetch_missing_job, emulator.base_url, emulator.api_key
            )
    assert caught.value.status_code == 404
    assert caught.value.request_id
    assert MISSING_JOB in str(caught.value)
