"""batches.results() of a job that has not completed says so (its status and how to wait)
instead of yielding nothing; `partial=True` reads what a job that ended otherwise has."""

from __future__ import annotations

import pytest
from emulator_helpers import chat_file

from together_async import AsyncTogether, BatchNotFinishedError
from together_async.emulator import Emulator


async def drain(client: AsyncTogether, job_or_id: object, **options: bool) -> list[str]:
    """The custom_ids `results` yields."""
    return [r.custom_id async for r in client.batches.results(job_or_id, **options)]  # type: ignore[arg-type]


async def started_job(client: AsyncTogether, rows: int = 50) -> str:
    """A job on `rows` requests, just created."""
    uploaded = await client.files.upload(chat_file(rows))
    return (await client.batches.create_batch(uploaded.id, "/v1/chat/completions")).id


@pytest.fixture
async def slow(make_emulator: object) -> Emulator:
    """An emulator whose jobs take a while (20 ms a request, one at a time)."""
    return await make_emulator(latency=0.02, concurrency=1)  # type: ignore[operator,no-any-return]


async def test_results_of_a_running_job_raise_saying_how_to_wait(slow: Emulator) -> None:
    """A job still running raises BatchNotFinishedError with its status and batches.wait."""
    async with AsyncTogether(api_key=slow.api_key, base_url=slow.base_url) as client:
        batch_id = await started_job(client)
        with pytest.raises(BatchNotFinishedError, match=r"is (VALIDATING|IN_PROGRESS).*wait") as e:
            await drain(client, batch_id)
        assert e.value.batch_id == batch_id and not e.value.status.is_terminal


async def test_a_stale_job_object_is_read_again(slow: Emulator) -> None:
    """Passing a job object read while it ran looks at the job as it is now."""
    async with AsyncTogether(api_key=slow.api_key, base_url=slow.base_url) as client:
        batch_id = await started_job(client, rows=5)
        stale = await client.batches.get_batch(batch_id)
        assert not stale.is_terminal
        await client.batches.wait(batch_id, poll_interval=0.02)
        assert len(await drain(client, stale)) == 5


async def test_results_of_a_cancelled_job_need_partial(slow: Emulator) -> None:
    """A cancelled job raises without partial=True, and gives its rows (each custom_id at
    most once) with it."""
    async with AsyncTogether(api_key=slow.api_key, base_url=slow.base_url) as client:
        batch_id = await started_job(client, rows=200)
        await client.batches.cancel_batch(batch_id)
        job = await client.batches.wait(batch_id, poll_interval=0.02)
        assert job.status == "cancelled"
        with pytest.raises(BatchNotFinishedError, match="partial=True"):
            await drain(client, job)
        ids = await drain(client, job, partial=True)
        assert len(ids) == len(set(ids)) <= 200


async def test_results_of_a_completed_job_are_every_row(client: AsyncTogether) -> None:
    """A completed job's results are its rows, with or without partial."""
    uploaded = await client.files.upload(chat_file(4))
    job = await client.batches.create_batch(uploaded.id, "/v1/chat/completions")
    done = await client.batches.wait(job.id, poll_interval=0.02)
    assert sorted(await drain(client, done)) == [f"request-{i}" for i in range(4)]
    assert len(await drain(client, done, partial=True)) == 4
