"""Shards fail independently, so a run can fail in two places at once: the caller still gets
one of the library's errors (the first, the others logged and noted on it), never a bare
ExceptionGroup."""

from __future__ import annotations

import logging
import sys

import anyio
import pytest

from together_async import APIStatusError, NotFoundError, TogetherError
from together_async.gather import _single_error

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


async def test_two_failures_give_the_first_with_the_second_noted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two shard errors in a (nested) group: the first is raised, the second logged and noted."""
    first = NotFoundError("no file f-1", status_code=404)
    second = TogetherError("shard 2: upload failed")
    group = ExceptionGroup("unhandled", [first, ExceptionGroup("inner", [second])])
    with caplog.at_level(logging.WARNING, logger="together_async"):
        chosen = _single_error(group)
    assert chosen is first
    assert "shard 2: upload failed" in caplog.text
    if sys.version_info >= (3, 11):
        assert any("shard 2: upload failed" in note for note in first.__notes__)


async def test_cancellations_are_not_errors() -> None:
    """Cancellations beside one real error leave that error alone, with no note."""
    cancelled = anyio.get_cancelled_exc_class()
    real = TogetherError("boom")
    group = BaseExceptionGroup("unhandled", [cancelled(), real, cancelled()])
    assert _single_error(group) is real
    assert not getattr(real, "__notes__", [])


async def test_keyboard_interrupt_wins_over_errors() -> None:
    """A KeyboardInterrupt among errors is what is raised: the process is stopping."""
    interrupt = KeyboardInterrupt()
    group = BaseExceptionGroup("unhandled", [TogetherError("x"), interrupt])
    assert _single_error(group) is interrupt


async def test_only_cancellations_keep_the_group() -> None:
    """A group of nothing but cancellations is returned as it is (the caller re-raises it)."""
    cancelled = anyio.get_cancelled_exc_class()
    group = BaseExceptionGroup("unhandled", [cancelled()])
    assert _single_error(group) is group


async def test_status_errors_keep_their_attributes() -> None:
    """The chosen error is the very exception raised in the shard, attributes intact."""
    first = APIStatusError("bad", status_code=400, request_id="req-1")
    chosen = _single_error(ExceptionGroup("unhandled", [first, TogetherError("y")]))
    assert isinstance(chosen, APIStatusError) and chosen.request_id == "req-1"
