"""An injected clock for tests: time moves only when the test says so."""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """A monotonic clock (call it) with a matching wall clock (:meth:`wall`), both moved by hand.

    Pass it wherever extproc takes a ``clock`` (``make_plugin_context(clock=...,
    wall_clock=clock.wall)``, ``MemoryCache(clock=...)``, ``HttpClient(clock=...)``) and test
    TTLs, windows and expiry without sleeping::

        clock = ManualClock()
        cache = MemoryCache(clock=clock)
        cache.set_nowait("k", 1, ttl=10)
        clock.advance(10.5)
        assert cache.get_nowait("k") is None

    It does not move asyncio's loop time: plugin deadlines (:func:`extproc.context.time_left`)
    still run on the real clock.
    """

    __slots__ = ("_epoch", "_now")

    def __init__(self, start: float = 1000.0, *, epoch: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._epoch = float(epoch) - float(start)

    def __call__(self) -> float:
        """The monotonic time in seconds."""
        return self._now

    def wall(self) -> float:
        """Unix time in seconds: ``epoch`` at the start, moving with :meth:`advance`."""
        return self._epoch + self._now

    def advance(self, seconds: float) -> float:
        """Move both clocks forward; returns the new monotonic time. Time never goes back."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back: advance by >= 0 seconds")
        self._now += seconds
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now!r})"
