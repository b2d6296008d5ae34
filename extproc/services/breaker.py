"""A small circuit breaker (closed -> open -> half-open), with an injected clock.

Small enough to own: the libraries on PyPI either wrap calls in ways that fight asyncio
cancellation or pull in dependencies for a 60-line state machine.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BreakerOpenError", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerOpenError(Exception):
    """Raised instead of calling a dependency whose breaker is open."""

    def __init__(self, name: str) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name


@dataclass(slots=True)
class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``reset_timeout`` seconds
    lets one trial call through (half-open); a success closes it, a failure opens it again."""

    name: str
    failure_threshold: int = 5
    reset_timeout: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _failures: int = 0
    _opened_at: float = 0.0
    _state: BreakerState = BreakerState.CLOSED
    _trial_in_flight: bool = False
    opened_total: int = 0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.reset_timeout <= 0:
            raise ValueError("reset_timeout must be > 0")

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self.clock() - self._opened_at >= self.reset_timeout
        ):
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one trial at a time."""
        if self._state is BreakerState.CLOSED:
            return True
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        if not self._failures and self._state is BreakerState.CLOSED:
            return  # the common case: nothing to reset
        self._failures = 0
        self._trial_in_flight = False
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._trial_in_flight = False
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self.clock()
        self.opened_total += 1

    def check(self) -> None:
        """Raise :class:`BreakerOpenError` unless a call may go through."""
        if not self.allow():
            raise BreakerOpenError(self.name)
