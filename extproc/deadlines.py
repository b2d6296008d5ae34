"""Many short deadlines on one loop timer.

Every plugin call that waits (a Redis round trip, say) needs a deadline, on every request. An
``asyncio.timeout`` per call costs a loop timer, a context manager and a task lookup - more than
the rest of the chain for a plugin that answers from a batch. A :class:`DeadlineHeap` keeps
the deadlines of one loop in a heap behind a single timer armed for the earliest one: adding a
deadline is a small object and a heap push, and a deadline whose work ended is only marked, then
dropped when it reaches the top. Since most work ends long before its deadline, the timer fires
about once per timeout, not once per call.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Callable

__all__ = ["Deadline", "DeadlineHeap"]

log = logging.getLogger("extproc.deadlines")


class Deadline:
    """One pending deadline of a :class:`DeadlineHeap`."""

    __slots__ = ("_fire", "deadline", "done", "expired", "limit")

    def __init__(self, deadline: float, limit: float, fire: Callable[[], object]) -> None:
        self.deadline = deadline
        self.limit = limit
        self._fire: Callable[[], object] | None = fire
        #: the guarded work ended (:meth:`cancel`): this deadline will not fire
        self.done = False
        #: the deadline passed and ``fire`` was called
        self.expired = False

    def cancel(self) -> None:
        """The guarded work ended: never fire (and let go of what ``fire`` refers to)."""
        self.done = True
        self._fire = None


class DeadlineHeap:
    """Calls each deadline's ``fire`` at its time, on one ``call_at`` timer of ``loop``.

    ``stall_tolerance``: when the timer runs more than this late, the loop could not run
    anything in the meantime (a GC pause, no CPU to run on), so the work could not have used
    that time; a deadline that has a later ``limit`` is moved by as long as the timer was late,
    never past ``limit``, instead of firing. ``limit`` defaults to the deadline itself: no time
    given back.
    """

    __slots__ = ("_handle", "_heap", "_seq", "armed", "loop", "stall_tolerance")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, stall_tolerance: float = 0.0) -> None:
        self.loop = loop
        self.stall_tolerance = stall_tolerance
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        #: when the timer is armed for (``inf``: not armed)
        self.armed = math.inf

    def __len__(self) -> int:
        """Deadlines still in the heap, the ones already marked done included."""
        return len(self._heap)

    def at(
        self, deadline: float, fire: Callable[[], object], *, limit: float | None = None
    ) -> Deadline:
        """Call ``fire`` at ``deadline`` (loop time) unless the returned handle is cancelled."""
        entry = Deadline(deadline, deadline if limit is None else limit, fire)
        heapq.heappush(self._heap, (deadline, next(self._seq), entry))
        if deadline < self.armed:
            self._arm(deadline)
        return entry

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self.armed = when
        self._handle = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        self.armed = math.inf
        heap = self._heap
        now = self.loop.time()
        while heap:
            deadline, _, entry = heap[0]
            if entry.done:
                heapq.heappop(heap)
                continue
            if deadline > now:
                self._arm(deadline)
                return
            heapq.heappop(heap)
            late = now - deadline
            if late > self.stall_tolerance and deadline < entry.limit:
                entry.deadline = min(entry.limit, now + late)
                heapq.heappush(heap, (entry.deadline, next(self._seq), entry))
                continue
            fire, entry._fire = entry._fire, None
            entry.expired = entry.done = True
            if fire is not None:
                try:
                    fire()
                except Exception:  # one bad callback must not leave the others unfired
                    log.exception("deadline callback failed")
