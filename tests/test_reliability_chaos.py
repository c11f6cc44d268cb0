"""Chaos: the client against an emulator that fails on purpose (5xx before and after the effect,
429 with Retry-After, connections cut before the answer and in the middle of file content, slow
answers). Whatever strikes, every row comes back exactly once, no job is created twice, and
every downloaded file is byte-identical to what the server stores."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from emulator_helpers import CHAT, chat_file
from http_fakes import SECRET_KEY, FakeFiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from together_async import AsyncTogether, BatchJob, BatchJobStatus, BatchRun, ClientConfig
from together_async._convert import result_from_row
from together_async.emulator import Emulator
from together_async.emulator.faults import Fault, FaultKind
from together_async.manifest import Manifest, ShardRecord

pytestmark = pytest.mark.timeout(180)

MakeEmulator = Callable[..., Awaitable[Emulator]]
Serve = Callable[[web.Application], Awaitable[TestServer]]
CONTENT = "GET /files/{id}/content"

# The mix issue 8 asks for: about 10% 5xx (half of them after the effect took place), 5% 429
# with Retry-After, 2% connections cut (half after the effect; reads are cut mid-body), and a
# few slow answers. Content downloads get extra mid-body cuts so resumes certainly happen.
CHAOS = (
    Fault(kind=FaultKind.ERROR, rate=0.05),
    Fault(kind=FaultKind.ERROR, rate=0.05, after_effect=True),
    Fault(kind=FaultKind.RATE_LIMIT, rate=0.05, retry_after=0.02),
    Fault(kind=FaultKind.RESET, rate=0.01),
    Fault(kind=FaultKind.RESET, rate=0.01, after_effect=True),
    Fault(kind=FaultKind.SLOW, rate=0.01, delay=0.2),
    Fault(kind=FaultKind.RESET, rate=0.25, routes=(CONTENT,)),
)


def patient_client(emulator: Emulator, **overrides: Any) -> AsyncTogether:
    """A client with many retries and waits of a few milliseconds (Retry-After still honoured,
    as the faults announce 20 ms)."""
    settings: dict[str, Any] = {
        "api_key": emulator.api_key,
        "base_url": emulator.base_url,
        "max_retries": 12,
        "retry_wait_initial": 0.005,
        "retry_wait_max": 0.05,
        "retry_wait_jitter": 0.005,
        "retry_after_max": 1.0,
    }
    settings.update(overrides)
    return AsyncTogether.from_config(ClientConfig(**settings))


@contextlib.asynccontextmanager
async def chaos_client(emulator: Emulator) -> AsyncIterator[AsyncTogether]:
    async with patient_client(emulator) as client:
        yield client


def request_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"req-{index:05d}",
            "body": {"messages": [{"role": "user", "content": f"question {index} ✓"}]},
        }
        for index in range(count)
    ]


async def recorded_shards(state_path: Path) -> list[ShardRecord]:
    manifest = await Manifest.open(state_path)
    try:
        return await manifest.shards()
    finally:
        await manifest.aclose()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def same_bytes(local: Path, remote: Path) -> bool:
    mine, theirs = await anyio.to_thread.run_sync(lambda: (sha256_of(local), sha256_of(remote)))
    return mine == theirs


def struck(emulator: Emulator, kind: str, route: tuple[str, str] | None = None) -> int:
    return sum(
        count
        for (method, path, fault), count in emulator.stats.faults_injected.items()
        if fault == kind and (route is None or (method, path) == route)
    )


@pytest.mark.slow
async def test_gather_of_20000_requests_survives_the_chaos(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    """gather_batches over 20,000 requests under faults completes: every custom_id exactly once,
    in order, with its own answer; one job per input file; one stored upload per shard; every
    downloaded file byte-identical to the emulator's copy."""
    emulator = await make_emulator(faults=CHAOS, seed=8, latency=0.001, concurrency=16)
    rows = request_rows(20_000)
    state = tmp_path / "state.sqlite"
    async with chaos_client(emulator) as client:
        run = BatchRun(
            client,
            rows,
            model="chaos-model",
            max_requests_per_batch=250,
            state_path=state,
            poll_interval=0.02,
            max_interval=0.2,
        )
        results = await run.gather()

    assert [result.custom_id for result in results] == [row["custom_id"] for row in rows]
    assert all(result.ok for result in results)
    assert [result.text for result in results] == [f"question {i} ✓" for i in range(20_000)]

    shards = await recorded_shards(state)
    assert len(shards) == 80 and all(shard.parent_id is None for shard in shards)
    assert run.summary.jobs == 80 and run.summary.resubmitted_rows == 0
    # No duplicate job: each input file got exactly one, and the jobs are the recorded ones.
    assert len(emulator.stats.jobs_created) == 80
    assert set(emulator.stats.jobs_created.values()) == {1}
    assert set(emulator.stats.jobs_created) == {shard.file_id for shard in shards}
    # No duplicate upload: one stored input file per shard.
    stored = [f for f in await emulator.storage.list_files() if f.purpose == "batch-api"]
    assert sorted(f.id for f in stored) == sorted(str(shard.file_id) for shard in shards)

    # Every kind of fault struck, and content downloads were cut mid-body and resumed.
    assert struck(emulator, "error") >= 20
    assert struck(emulator, "rate_limit") >= 10
    assert struck(emulator, "reset", ("GET", "/files/{id}/content")) >= 5
    assert struck(emulator, "reset") > struck(emulator, "reset", ("GET", "/files/{id}/content"))
    assert emulator.stats.faults_injected["POST", "/batches", "error"] > 0

    results_dir = Path(f"{state}.files") / "results"
    for shard in shards:
        assert shard.output_file_id is not None and shard.output_name is not None
        remote = emulator.storage.body_path(shard.output_file_id)
        assert await same_bytes(results_dir / shard.output_name, remote), shard.id


async def test_gather_deleting_its_files_under_faults_leaves_none(
    make_emulator: MakeEmulator,
) -> None:
    """delete_files=True while DELETEs fail before and after taking effect: the run completes
    and no input, output or error file is left on the server."""
    emulator = await make_emulator(
        seed=19,
        faults=[
            Fault(
                kind=FaultKind.ERROR, rate=0.3, routes=("DELETE /files/{id}",), after_effect=True
            ),
            Fault(
                kind=FaultKind.RESET, rate=0.2, routes=("DELETE /files/{id}",), after_effect=True
            ),
            Fault(kind=FaultKind.RATE_LIMIT, rate=0.1, retry_after=0.01),
        ],
    )
    rows = request_rows(400)
    rows[5]["body"] = {"model": "m"}  # no messages: a 400 row, so some shards have error files
    async with patient_client(emulator) as client:
        results = await BatchRun(
            client,
            rows,
            model="m",
            max_requests_per_batch=50,
            delete_files=True,
            poll_interval=0.01,
            max_interval=0.05,
        ).gather()
    assert [r.custom_id for r in results] == [row["custom_id"] for row in rows]
    assert sum(not r.ok for r in results) == 1
    assert await emulator.storage.list_files() == []
    assert struck(emulator, "error") + struck(emulator, "reset") >= 3


async def test_many_creates_under_after_effect_failures_make_one_job_each(
    make_emulator: MakeEmulator,
) -> None:
    """Twenty create_batch calls, half of whose answers fail after the job was made: each call
    returns a job, and each file has exactly one."""
    emulator = await make_emulator(seed=3)
    async with patient_client(emulator) as client:
        files = [await client.files.upload(chat_file(2, prefix=f"f{i}")) for i in range(20)]
        emulator.faults.add(
            Fault(kind=FaultKind.ERROR, rate=0.3, routes=("POST /batches",), after_effect=True)
        )
        emulator.faults.add(
            Fault(kind=FaultKind.RESET, rate=0.2, routes=("POST /batches",), after_effect=True)
        )
        jobs = [await client.batches.create_batch(f.id, CHAT) for f in files]
    assert [job.input_file_id for job in jobs] == [f.id for f in files]
    assert len({job.id for job in jobs}) == 20
    assert emulator.stats.jobs_created == Counter({f.id: 1 for f in files})
    assert struck(emulator, "error") + struck(emulator, "reset") >= 5


async def test_concurrent_uploads_under_faults_store_each_file_once(
    make_emulator: MakeEmulator,
) -> None:
    """Twenty uploads at once while POST /files and preprocess fail before and after their
    effect: each returns its processed file with the right size, and nothing is stored twice."""
    emulator = await make_emulator(
        seed=5,
        faults=[
            Fault(kind=FaultKind.ERROR, rate=0.2, routes=("POST /files",), after_effect=True),
            Fault(kind=FaultKind.RESET, rate=0.1, routes=("POST /files",)),
            Fault(kind=FaultKind.ERROR, rate=0.2, routes=("POST /files/{id}/preprocess",)),
            Fault(
                kind=FaultKind.RESET,
                rate=0.2,
                routes=("POST /files/{id}/preprocess",),
                after_effect=True,
            ),
        ],
    )
    contents = [chat_file(3 + i, prefix=f"u{i}") for i in range(20)]
    uploaded: dict[int, Any] = {}
    async with patient_client(emulator) as client:

        async def upload(index: int) -> None:
            uploaded[index] = await client.files.upload(contents[index])

        async with anyio.create_task_group() as group:
            for index in range(20):
                group.start_soon(upload, index)
    assert [uploaded[i].bytes for i in range(20)] == [len(data) for data in contents]
    stored = await emulator.storage.list_files()
    assert sorted(f.id for f in stored) == sorted(uploaded[i].id for i in range(20))
    for index, data in enumerate(contents):
        body = emulator.storage.body_path(uploaded[index].id)
        assert await anyio.Path(body).read_bytes() == data
    assert struck(emulator, "error") + struck(emulator, "reset") >= 5


async def test_a_large_download_cut_many_times_is_byte_identical(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    """A 4.7 MB file whose download is cut mid-body on most attempts still lands byte-identical."""
    emulator = await make_emulator(seed=11)
    data = chat_file(40_000, prefix="big")
    assert len(data) > 4_000_000
    async with patient_client(emulator) as client:
        uploaded = await client.files.upload(data)
        # The first five attempts are cut for sure (each halfway through what is left), then
        # a random half of the rest.
        emulator.faults.add(Fault(kind=FaultKind.RESET, times=5, routes=(CONTENT,)))
        emulator.faults.add(Fault(kind=FaultKind.RESET, rate=0.5, routes=(CONTENT,)))
        emulator.faults.add(Fault(kind=FaultKind.ERROR, rate=0.1, routes=(CONTENT,)))
        target = tmp_path / "downloads"
        await anyio.Path(target).mkdir()
        downloaded = await client.files.retrieve_content(uploaded.id, output=target / "copy")
    assert downloaded.bytes == len(data)
    assert await same_bytes(downloaded.path, emulator.storage.body_path(uploaded.id))
    assert struck(emulator, "reset", ("GET", "/files/{id}/content")) >= 5
    # Nothing but the finished file is left in the directory (no .part files).
    assert [p.name async for p in anyio.Path(target).iterdir()] == ["copy"]


async def test_results_stream_through_cuts_yields_every_row_once(
    make_emulator: MakeEmulator,
) -> None:
    """batches.results over a job's output, cut mid-body again and again, yields each row once."""
    emulator = await make_emulator(seed=13)
    async with patient_client(emulator) as client:
        uploaded = await client.files.upload(chat_file(3_000))
        job = await client.batches.create_batch(uploaded.id, CHAT)
        job = await client.batches.wait(job.id, timeout=60, poll_interval=0.01, max_interval=0.05)
        assert job.status == "COMPLETED"
        emulator.faults.add(Fault(kind=FaultKind.RESET, times=3, routes=(CONTENT,)))
        emulator.faults.add(Fault(kind=FaultKind.RESET, rate=0.5, routes=(CONTENT,)))
        emulator.faults.add(Fault(kind=FaultKind.RATE_LIMIT, rate=0.2, retry_after=0.01))
        seen = Counter([result.custom_id async for result in client.batches.results(job)])
    assert seen == Counter({f"request-{i}": 1 for i in range(3_000)})
    assert struck(emulator, "reset", ("GET", "/files/{id}/content")) >= 3


async def test_stream_status_rides_through_failed_polls(make_emulator: MakeEmulator) -> None:
    """stream_status under 5xx, 429 and cut answers on every poll still yields each status once,
    progress never going back, ending with the one terminal state."""
    emulator = await make_emulator(seed=17, latency=0.002, concurrency=2)
    async with patient_client(emulator) as client:
        uploaded = await client.files.upload(chat_file(400))
        job = await client.batches.create_batch(uploaded.id, CHAT)
        for kind, rate in ((FaultKind.ERROR, 0.25), (FaultKind.RATE_LIMIT, 0.1)):
            emulator.faults.add(Fault(kind=kind, rate=rate, retry_after=0.01))
        emulator.faults.add(Fault(kind=FaultKind.RESET, rate=0.1))
        states = [
            state
            async for state in client.batches.stream_status(
                job.id, poll_interval=0.01, max_interval=0.05, max_consecutive_failures=50
            )
        ]
    statuses = [str(state.status) for state in states]
    assert statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1
    order = ["VALIDATING", "IN_PROGRESS", "COMPLETED"]
    assert [order.index(status) for status in statuses] == sorted(
        order.index(status) for status in statuses
    )
    progress = [state.progress or 0.0 for state in states]
    assert progress == sorted(progress)
    assert (
        struck(emulator, "error") + struck(emulator, "rate_limit") + struck(emulator, "reset") >= 3
    )


# --- properties: any cut, any chunk boundary ---------------------------------------------------
#
# One fake files server serves every example (hypothesis runs them inside one test call); each
# example sets the bytes it serves and where the connection is cut.

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def fake_files(serve: Serve) -> FakeFiles:
    """A fake files API whose content route can cut connections and ignore Range."""
    fake = FakeFiles()
    storage = await serve(fake.storage_app())
    fake.storage_url = str(storage.make_url("")).rstrip("/")
    fake.api_server = await serve(fake.api_app())
    return fake


@contextlib.asynccontextmanager
async def fake_client(fake: FakeFiles) -> AsyncIterator[AsyncTogether]:
    config = ClientConfig(
        api_key=SECRET_KEY,
        base_url=str(fake.api_server.make_url("/v1")),
        max_retries=10,
        retry_wait_initial=0.001,
        retry_wait_max=0.001,
        retry_wait_jitter=0.0,
    )
    async with AsyncTogether.from_config(config) as client:
        yield client


def cuts_within(size: int) -> st.SearchStrategy[list[int]]:
    """Where successive answers are cut: any byte offset of what each one sends (0 included)."""
    return st.lists(st.integers(min_value=0, max_value=max(size, 1)), max_size=6)


@st.composite
def content_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int], bool]:
    text_lines = draw(st.lists(st.text(max_size=40), max_size=12))
    data = "\n".join(text_lines).encode("utf-8", "surrogatepass")
    data += draw(st.binary(max_size=64))
    return data, draw(cuts_within(len(data))), draw(st.booleans())


@PROPERTY_SETTINGS
@given(case=content_and_cuts())
async def test_downloads_cut_anywhere_give_identical_bytes(
    fake_files: FakeFiles, tmp_path: Path, case: tuple[bytes, list[int], bool]
) -> None:
    """Whatever bytes, wherever the connections drop, and whether or not the server honours
    Range, retrieve_content and iter_lines give back exactly the server's bytes."""
    data, cuts, ignore_range = case
    file_id = fake_files.add_file(data)
    fake_files.ignore_range = ignore_range
    async with fake_client(fake_files) as client:
        fake_files.drop_after = list(cuts)
        downloaded = await client.files.retrieve_content(file_id, output=tmp_path / "copy")
        assert await anyio.Path(downloaded.path).read_bytes() == data
        fake_files.drop_after = list(cuts)
        lines = [line async for line in client.files.iter_lines(file_id)]
    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert lines == [line.removesuffix(b"\r") for line in expected]


result_rows = st.one_of(
    st.builds(
        lambda custom_id, status, text: {
            "custom_id": custom_id,
            "response": {
                "status_code": status,
                "body": {"choices": [{"message": {"role": "assistant", "content": text}}]},
            },
        },
        st.text(min_size=1, max_size=64),
        st.sampled_from([200, 200, 400, 429, 500]),
        st.text(max_size=60),
    ),
    st.builds(
        lambda custom_id, message, code: {
            "custom_id": custom_id,
            "error": {"message": message, "code": code},
        },
        st.text(min_size=1, max_size=64),
        st.text(max_size=60),
        st.sampled_from(["invalid_model", "server_error", None]),
    ),
)


def encoded(rows: list[dict[str, Any]], newline: bytes, final_newline: bool) -> bytes:
    data = newline.join(orjson.dumps(row) for row in rows)
    return data + newline if final_newline and rows else data


@PROPERTY_SETTINGS
@given(
    output=st.lists(result_rows, max_size=15),
    errors=st.lists(result_rows, max_size=5),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    final_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4_000), max_size=6),
)
async def test_results_decode_the_same_across_any_cut(
    fake_files: FakeFiles,
    output: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    newline: bytes,
    final_newline: bool,
    cuts: list[int],
) -> None:
    """batches.results over output and error files cut at any byte (multi-byte characters
    split included, CRLF or LF, final newline or not) gives one BatchResult per line, equal to
    decoding each line on its own."""
    output_id = fake_files.add_file(encoded(output, newline, final_newline))
    error_id = fake_files.add_file(encoded(errors, newline, final_newline))
    fake_files.ignore_range = False
    fake_files.drop_after = list(cuts)
    job = BatchJob(
        id="b-1",
        status=BatchJobStatus.COMPLETED,
        output_file_id=output_id,
        error_file_id=error_id,
    )
    async with fake_client(fake_files) as client:
        results = [result async for result in client.batches.results(job)]
    assert results == [result_from_row(row, batch_id="b-1") for row in output + errors]
