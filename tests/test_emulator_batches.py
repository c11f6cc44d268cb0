"""The emulator's batches routes and job runner over real loopback HTTP: shapes and codes, and
jobs that really run to COMPLETED, FAILED, CANCELLED and EXPIRED."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import MakeEmulator
from emulator_helpers import EMULATOR_KEY, RawAPI, chat_file, chat_line, jsonl

from together_async.emulator import Emulator

pytestmark = pytest.mark.timeout(60)

MISSING_JOB = "00000000-0000-4000-8000-000000000000"


def _api_for(emulator: Emulator, session: aiohttp.ClientSession) -> RawAPI:
    return RawAPI(session, emulator.base_url)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare session carrying the emulator test key (for emulators made in the test)."""
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
    ) as client_session:
        yield client_session


async def test_create_answers_201_with_the_job_wrapped(api: RawAPI) -> None:
    """POST /batches answers 201 {"job": {...}} with the real field names, status VALIDATING."""
    file_id = (await api.upload(chat_file(2)))["id"]
    status, body = await api.call(
        "POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert status == 201
    job = body["job"]
    assert job["status"] == "VALIDATING"
    assert job["input_file_id"] == file_id
    assert job["endpoint"] == "/v1/chat/completions"
    assert job["file_size_bytes"] == len(chat_file(2))
    assert job["created_at"].endswith("Z") and job["job_deadline"].endswith("Z")
    assert job["progress"] == 0.0
    assert "warning" not in body


async def test_unusual_completion_window_gets_a_warning(api: RawAPI) -> None:
    """A completion_window other than 24h is accepted with a warning next to the job."""
    file_id = (await api.upload(chat_file(1)))["id"]
    status, body = await api.call(
        "POST",
        "/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "48h",
        },
    )
    assert status == 201
    assert "48h" in body["warning"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"endpoint": "/v1/chat/completions"}, "input_file_id"),
        ({"input_file_id": "FILE"}, "endpoint"),
        ({"input_file_id": "FILE", "endpoint": "/v1/images"}, "not supported"),
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, "not found"),
        (
            {"input_file_id": "FILE", "endpoint": "/v1/chat/completions", "completion_window": "x"},
            "completion_window",
        ),
    ],
)
async def test_bad_create_requests_answer_400_with_a_string_error(
    api: RawAPI, payload: dict[str, str], fragment: str
) -> None:
    """Invalid creates answer 400 {"error": "<message>"} saying what is wrong."""
    file_id = (await api.upload(chat_file(1)))["id"]
    payload = {key: file_id if value == "FILE" else value for key, value in payload.items()}
    status, body = await api.call("POST", "/batches", json=payload)
    assert status == 400
    assert isinstance(body["error"], str) and fragment in body["error"]


async def test_create_on_a_file_of_another_purpose_is_refused(api: RawAPI) -> None:
    """Only batch-api files can be batch inputs."""
    file_id = (await api.upload(chat_file(1), purpose="fine-tune"))["id"]
    status, body = await api.call(
        "POST", "/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert status == 400 and "batch-api" in body["error"]


async def test_list_is_a_bare_array_newest_first(api: RawAPI) -> None:
    """GET /batches answers a bare JSON array, the newest job first."""
    file_id = (await api.upload(chat_file(1)))["id"]
    first = await api.create_batch(file_id)
    second = await api.create_batch(file_id)
    listing = await api.json("GET", "/batches")
    assert isinstance(listing, list)
    assert [job["id"] for job in listing] == [second["id"], first["id"]]


async def test_unknown_job_is_404_with_a_string_error(api: RawAPI) -> None:
    """GET and cancel of an unknown (or malformed) id answer 404 {"error": "..."}."""
    for method, path in (
        ("GET", f"/batches/{MISSING_JOB}"),
        ("POST", f"/batches/{MISSING_JOB}/cancel"),
        ("GET", "/batches/not-a-uuid"),
    ):
        status, body = await api.call(method, path)
        assert status == 404, path
        assert isinstance(body["error"], str)


async def test_job_completes_with_an_output_file(api: RawAPI) -> None:
    """A valid file runs to COMPLETED: progress 100, completed_at, one output row per request."""
    job = await api.submit(chat_file(20))
    done = await api.wait_for(job["id"])
    assert done["status"] == "COMPLETED"
    assert done["progress"] == 100.0
    assert done["completed_at"].endswith("Z")
    assert done["model_id"] == "test-model"
    assert "error_file_id" not in done
    rows = await api.rows(done["output_file_id"])
    assert sorted(row["custom_id"] for row in rows) == sorted(f"request-{i}" for i in range(20))
    row = rows[0]
    assert row["response"]["status_code"] == 200
    assert row["response"]["body"]["object"] == "chat.completion"
    assert row["error"] is None


async def test_result_files_are_batch_generated(api: RawAPI) -> None:
    """Output and error files are listed with purpose batch-generated."""
    rows = [chat_line("good"), {"custom_id": "bad", "body": {"messages": []}}]
    done = await api.wait_for((await api.submit(jsonl(rows)))["id"])
    for file_id in (done["output_file_id"], done["error_file_id"]):
        stored = await api.json("GET", f"/files/{file_id}")
        assert stored["purpose"] == "batch-generated"
        assert stored["bytes"] > 0


async def test_output_is_not_in_input_order(api: RawAPI) -> None:
    """Like the real service, output lines come in another order than the input."""
    done = await api.wait_for((await api.submit(chat_file(200)))["id"])
    order = [row["custom_id"] for row in await api.rows(done["output_file_id"])]
    assert sorted(order) == sorted(f"request-{i}" for i in range(200))
    assert order != [f"request-{i}" for i in range(200)]


async def test_bad_request_bodies_become_400_rows_in_the_error_file(api: RawAPI) -> None:
    """A body with no model or no messages is an error row with status 400; the rest succeed."""
    rows = [
        chat_line("ok-1"),
        {"custom_id": "no-model", "body": {"messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "no-messages", "body": {"model": "m"}},
        chat_line("ok-2"),
    ]
    done = await api.wait_for((await api.submit(jsonl(rows)))["id"])
    assert done["status"] == "COMPLETED"
    errors = {row["custom_id"]: row for row in await api.rows(done["error_file_id"])}
    assert set(errors) == {"no-model", "no-messages"}
    for row in errors.values():
        assert row["response"]["status_code"] == 400
        assert row["error"]["code"] == "invalid_request_error"
        assert row["error"]["message"]
    outputs = await api.rows(done["output_file_id"])
    assert sorted(row["custom_id"] for row in outputs) == ["ok-1", "ok-2"]


async def test_no_output_file_when_every_row_fails(api: RawAPI) -> None:
    """When no request succeeds the job has an error file and no output_file_id."""
    rows = [{"custom_id": f"bad-{i}", "body": {"model": "m"}} for i in range(3)]
    done = await api.wait_for((await api.submit(jsonl(rows)))["id"])
    assert done["status"] == "COMPLETED"
    assert "output_file_id" not in done
    assert len(await api.rows(done["error_file_id"])) == 3


async def test_invalid_input_fails_naming_the_first_bad_lines(api: RawAPI) -> None:
    """An input that breaks the batch-file rules ends FAILED, the error naming the lines."""
    data = jsonl([chat_line("a"), chat_line("a"), {"body": {}}]) + b"not json\n"
    done = await api.wait_for((await api.submit(data))["id"])
    assert done["status"] == "FAILED"
    assert "line 2: custom_id: duplicates line 1" in done["error"]
    assert "line 3: custom_id: missing" in done["error"]
    assert "line 4" in done["error"]
    assert "output_file_id" not in done and "error_file_id" not in done


async def test_url_of_another_endpoint_fails_validation(api: RawAPI) -> None:
    """A line whose url is not the batch endpoint fails the job (same rule as the client)."""
    row = {**chat_line("a"), "method": "POST", "url": "/v1/embeddings"}
    done = await api.wait_for((await api.submit(jsonl([row])))["id"])
    assert done["status"] == "FAILED"
    assert "line 1: url" in done["error"]


async def test_too_many_lines_fail_validation(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """The emulator's max_lines is enforced during VALIDATING."""
    emulator = await make_emulator(max_lines=3)
    api = _api_for(emulator, session)
    done = await api.wait_for((await api.submit(chat_file(4)))["id"])
    assert done["status"] == "FAILED"
    assert "limit of 3 lines" in done["error"]


async def test_validation_delay_makes_validating_observable(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """With validation_delay the job is seen VALIDATING, then reaches COMPLETED."""
    emulator = await make_emulator(validation_delay=0.3)
    api = _api_for(emulator, session)
    job = await api.submit(chat_file(2))
    assert (await api.json("GET", f"/batches/{job['id']}"))["status"] == "VALIDATING"
    assert (await api.wait_for(job["id"]))["status"] == "COMPLETED"


async def test_progress_grows_while_in_progress(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """With latency, the job is seen IN_PROGRESS with progress strictly between 0 and 100."""
    emulator = await make_emulator(latency=0.01, concurrency=4)
    api = _api_for(emulator, session)
    job = await api.submit(chat_file(200))
    while True:
        seen = await api.json("GET", f"/batches/{job['id']}")
        assert seen["status"] in ("VALIDATING", "IN_PROGRESS"), seen
        if seen["status"] == "IN_PROGRESS" and 0 < seen["progress"] < 100:
            break
    await api.json("POST", f"/batches/{job['id']}/cancel")


async def test_cancel_keeps_the_finished_rows(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """Cancelling IN_PROGRESS answers the job CANCELLED with a partial output file."""
    emulator = await make_emulator(latency=0.01, concurrency=4)
    api = _api_for(emulator, session)
    job = await api.submit(chat_file(400))
    while (await api.json("GET", f"/batches/{job['id']}"))["progress"] < 5:
        pass
    cancelled = await api.json("POST", f"/batches/{job['id']}/cancel")
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["completed_at"].endswith("Z")
    rows = await api.rows(cancelled["output_file_id"])
    assert 0 < len(rows) < 400
    assert len({row["custom_id"] for row in rows}) == len(rows)
    assert cancelled["progress"] == pytest.approx(100 * len(rows) / 400, abs=0.01)


async def test_cancel_while_validating(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """A job cancelled during VALIDATING ends CANCELLED with no result files."""
    emulator = await make_emulator(validation_delay=30)
    api = _api_for(emulator, session)
    job = await api.submit(chat_file(3))
    cancelled = await api.json("POST", f"/batches/{job['id']}/cancel")
    assert cancelled["status"] == "CANCELLED"
    assert "output_file_id" not in cancelled


async def test_cancel_of_a_finished_job_is_400(api: RawAPI) -> None:
    """Only VALIDATING and IN_PROGRESS jobs can be cancelled; otherwise 400 {"error": ...}."""
    done = await api.wait_for((await api.submit(chat_file(1)))["id"])
    status, body = await api.call("POST", f"/batches/{done['id']}/cancel")
    assert status == 400
    assert "COMPLETED" in body["error"]


async def test_deadline_expires_the_job_with_partial_output(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """A job still running at its (time-factored) deadline ends EXPIRED, keeping finished rows."""
    # 24h * 2e-5 = 1.73 s, while 800 rows at 4 x 10 ms take at least 2 s.
    emulator = await make_emulator(latency=0.01, concurrency=4, time_factor=2e-5)
    api = _api_for(emulator, session)
    job = await api.submit(chat_file(800))
    done = await api.wait_for(job["id"])
    assert done["status"] == "EXPIRED"
    rows = await api.rows(done.get("output_file_id"))
    assert 0 < len(rows) < 800


async def test_jobs_created_are_counted_per_input_file(emulator: Emulator, api: RawAPI) -> None:
    """emu.stats.jobs_created counts creates per input_file_id (to spot duplicate jobs)."""
    file_id = (await api.upload(chat_file(1)))["id"]
    await api.create_batch(file_id)
    await api.create_batch(file_id)
    assert emulator.stats.jobs_created[file_id] == 2
    assert emulator.stats["POST", "/batches"] == 2
    emulator.stats.reset()
    assert emulator.stats.jobs_created[file_id] == 0


async def test_deleting_the_input_of_a_running_job_does_not_break_it(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """The input file can be deleted mid-job: the job still completes every row."""
    emulator = await make_emulator(latency=0.002, concurrency=4)
    api = _api_for(emulator, session)
    job = await api.submit(chat_file(100))
    await api.json("DELETE", f"/files/{job['input_file_id']}")
    done = await api.wait_for(job["id"])
    assert done["status"] == "COMPLETED"
    assert len(await api.rows(done["output_file_id"])) == 100
    assert not (emulator.data_dir / "files" / job["input_file_id"]).exists()
