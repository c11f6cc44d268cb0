"""Retries told through the library's own logger, with what failed and when the next try is.

stamina logs each retry it schedules as a bare `stamina.retry_scheduled` record at WARNING on
the `stamina` logger, which Python's last-resort handler prints to the stderr of a program that
configured no logging. The client logs its retries itself (`together_async.client`, INFO, with
the call, the failure and the wait), so stamina's records of *these* retries are dropped: a
filter on the `stamina` logger drops records made while a client retry loop is deciding its
wait (a context variable marks it), and leaves the application's own stamina retries alone.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["in_client_retry", "install_stamina_filter"]

_IN_CLIENT_RETRY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "together_async_in_client_retry", default=False
)


class _DropClientRetries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _IN_CLIENT_RETRY.get()


_FILTER = _DropClientRetries()


def install_stamina_filter() -> None:
    """Put the filter on the `stamina` logger (once; safe to call again)."""
    stamina_logger = logging.getLogger("stamina")
    if _FILTER not in stamina_logger.filters:
        stamina_logger.addFilter(_FILTER)


@contextmanager
def in_client_retry() -> Iterator[None]:
    """Mark the code inside (a client retry loop) so stamina's records of it are dropped."""
    token = _IN_CLIENT_RETRY.set(True)
    try:
        yield
    finally:
        _IN_CLIENT_RETRY.reset(token)
