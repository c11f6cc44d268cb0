"""The seed page's code works by adding `await`: statuses compare case-insensitively with
their other spellings, and the official SDK's method names are aliases of ours."""

from __future__ import annotations

import pytest
from emulator_helpers import chat_file

from together_async import AsyncTogether, BatchJobStatus


@pytest.mark.parametrize("spelling", ["COMPLETED", "completed", "Completed", " completed "])
def test_status_equals_its_spellings(spelling: str) -> None:
    """A completed status equals "COMPLETED" and "completed", from either side."""
    status = BatchJobStatus("COMPLETED")
    assert status == spelling and spelling == status and not status != spelling


def test_status_differs_from_other_statuses() -> None:
    """COMPLETED is not "failed", nor FAILED, nor a non-string."""
    status = BatchJobStatus.COMPLETED
    assert status != "failed" and status != BatchJobStatus.FAILED and status != 3


def test_seed_page_spellings_exist() -> None:
    """CANCELLING and FINALIZING exist; CANCELLING is CANCELING, CANCELED is CANCELLED."""
    assert BatchJobStatus.CANCELLING is BatchJobStatus.CANCELING
    assert BatchJobStatus.CANCELED is BatchJobStatus.CANCELLED
    assert BatchJobStatus.FINALIZING == "finalizing"
    assert BatchJobStatus("cancelling") == "CANCELING" == BatchJobStatus.CANCELLING


def test_status_hash_is_the_canonical_value() -> None:
    """A status finds its uppercase string key in a dict and a set."""
    counts = {"COMPLETED": 1, "FAILED": 2}
    assert counts[BatchJobStatus("completed")] == 1
    assert BatchJobStatus("failed") in {"FAILED"}


def test_unknown_status_compares_case_insensitively() -> None:
    """A status this version does not know keeps its text and compares without case."""
    status = BatchJobStatus("Paused")
    assert status == "PAUSED" and status == "paused" and str(status) == "Paused"


async def test_official_sdk_names_are_aliases(client: AsyncTogether) -> None:
    """batches.create / retrieve / list / cancel and files.content work like ours."""
    uploaded = await client.files.upload(chat_file(3))
    job = await client.batches.create(uploaded.id, "/v1/chat/completions")
    assert (await client.batches.retrieve(job.id)).id == job.id
    assert job.id in [listed.id for listed in await client.batches.list()]
    cancelled = await client.batches.cancel(job.id)
    assert cancelled.status in ("CANCELING", "CANCELLED", "COMPLETED")
    content = b"".join([chunk async for chunk in client.files.content(uploaded.id)])
    assert content == chat_file(3)
