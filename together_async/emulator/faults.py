"""Fault injection for the emulator's API port: errors, rate limits, connection resets, slowness.

A `Fault` says what goes wrong, on which routes, how often and how many times; the
`FaultInjector` decides per call, deterministically from the seed and each route's call count.
"""

from __future__ import annotations

import enum
import hashlib
import threading
from collections.abc import Iterable

import attrs

__all__ = ["Fault", "FaultDecision", "FaultInjector", "FaultKind", "parse_route"]


class FaultKind(str, enum.Enum):
    """What an injected fault does to a call."""

    #: Answer 500 or 503 (see `Fault.status`).
    ERROR = "error"
    #: Answer 429 with `Retry-After` and `retry-after-ms`.
    RATE_LIMIT = "rate_limit"
    #: Drop the connection: before any byte, or mid-body (file content is cut in the middle).
    RESET = "reset"
    #: Hold the call for `Fault.delay` seconds, then answer normally.
    SLOW = "slow"


# Methods whose effect a fault can strike after (the ambiguous failures a client must survive).
MUTATING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})


def parse_route(route: str) -> tuple[str, str]:
    """Split "POST /batches" into ("POST", "/batches"); the path is the route template under /v1."""
    method, _, path = route.strip().partition(" ")
    if not method or not path.startswith("/"):
        raise ValueError(f"a fault route looks like 'POST /batches', got {route!r}")
    path = path.strip()
    if path.startswith("/v1/"):
        path = path[3:]
    return method.upper(), path


@attrs.frozen(kw_only=True)
class Fault:
    """One kind of failure, striking a share of the calls to some routes.

    Args:
        kind: what happens (a `FaultKind` or its string value).
        rate: the share of matching calls struck, 0..1 (1.0 with `times=1` means "the next call").
        routes: route templates such as `"POST /batches"` or `"GET /files/{id}/content"`;
            empty means every API route (the storage port is never faulted).
        times: strike at most this many times, then stay quiet (None: no limit).
        after_effect: on mutating calls (POST, DELETE), run the handler first and fail after
            its effect took place (the job exists, the file is deleted): an ambiguous failure.
        status: the status of an ERROR fault: 500, 503, or None to pick one of the two.
        retry_after: seconds announced by a RATE_LIMIT fault.
        delay: seconds a SLOW fault holds the call.
    """

    kind: FaultKind = attrs.field(converter=FaultKind)
    rate: float = 1.0
    routes: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    times: int | None = None
    after_effect: bool = False
    status: int | None = None
    retry_after: float = 1.0
    delay: float = 1.0
    _parsed_routes: frozenset[tuple[str, str]] = attrs.field(
        init=False, repr=False, eq=False, default=frozenset()
    )

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Fault.rate must be within 0..1, got {self.rate}")
        if self.status is not None and self.status not in (500, 503):
            raise ValueError(f"Fault.status must be 500 or 503, got {self.status}")
        if self.times is not None and self.times < 0:
            raise ValueError(f"Fault.times must not be negative, got {self.times}")
        object.__setattr__(self, "_parsed_routes", frozenset(map(parse_route, self.routes)))

    def matches(self, method: str, path: str) -> bool:
        """True when this fault applies to a call of `method` on the route template `path`."""
        return not self._parsed_routes or (method, path) in self._parsed_routes


@attrs.frozen(kw_only=True)
class FaultDecision:
    """What to do to one call: `kind` None means nothing (but a SLOW delay may still apply)."""

    kind: FaultKind | None = None
    after_effect: bool = False
    status: int = 500
    retry_after: float = 1.0
    delay: float = 0.0


_NO_FAULT = FaultDecision()


class FaultInjector:
    """Decides, call by call, which fault strikes; deterministic for a given seed and call order.

    Each route has its own call counter, so the decisions for one route do not depend on how
    calls to other routes interleave with it. Faults are checked in the order given; the first
    non-SLOW fault that strikes wins, and SLOW faults add their delay on top.
    """

    def __init__(self, faults: Iterable[Fault] = (), *, seed: int = 0) -> None:
        self._seed = seed
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._strikes: list[int] = []
        self._calls: dict[tuple[str, str], int] = {}
        for fault in faults:
            self.add(fault)

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The faults currently configured."""
        return tuple(self._faults)

    def add(self, fault: Fault) -> None:
        """Add a fault at runtime (tests: `emu.faults.add(Fault(kind="reset", ...))`)."""
        with self._lock:
            self._faults.append(fault)
            self._strikes.append(0)

    def clear(self) -> None:
        """Remove every fault and forget the call counters."""
        with self._lock:
            self._faults.clear()
            self._strikes.clear()
            self._calls.clear()

    def decide(self, method: str, path: str) -> FaultDecision:
        """The fault (if any) for this call of `method` on the route template `path`."""
        with self._lock:
            if not self._faults:
                return _NO_FAULT
            key = (method, path)
            call_number = self._calls.get(key, 0)
            self._calls[key] = call_number + 1
            delay = 0.0
            chosen: FaultDecision | None = None
            for index, fault in enumerate(self._faults):
                if chosen is not None and fault.kind is not FaultKind.SLOW:
                    continue
                if not fault.matches(method, path):
                    continue
                if fault.times is not None and self._strikes[index] >= fault.times:
                    continue
                draw = self._draw(index, method, path, call_number)
                if draw >= fault.rate:
                    continue
                self._strikes[index] += 1
                if fault.kind is FaultKind.SLOW:
                    delay += fault.delay
                    continue
                status = fault.status
                if status is None:
                    status = 503 if self._draw(index, "status", path, call_number) < 0.5 else 500
                chosen = FaultDecision(
                    kind=fault.kind,
                    # A 429 is a refusal at the door, never an after-the-fact failure.
                    after_effect=(
                        fault.after_effect
                        and method in MUTATING_METHODS
                        and fault.kind is not FaultKind.RATE_LIMIT
                    ),
                    status=status,
                    retry_after=fault.retry_after,
                )
            if chosen is None:
                return FaultDecision(delay=delay) if delay else _NO_FAULT
            return attrs.evolve(chosen, delay=delay)

    def _draw(self, index: int, method: str, path: str, call_number: int) -> float:
        # A hash rather than one shared random.Random: the draw for call n of a route does not
        # depend on how many draws other routes made before it.
        digest = hashlib.blake2b(
            f"{self._seed}|{index}|{method}|{path}|{call_number}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64
