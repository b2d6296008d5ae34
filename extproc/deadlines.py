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
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import Final

__all__ = ["STALL_TOLERANCE", "Deadline", "DeadlineHeap", "TaskTimeout", "loop_deadlines"]

log = logging.getLogger("extproc.deadlines")

#: A deadline timer that runs this late (seconds) was held up by the worker - a blocked loop, a
#: GC pause, no CPU to run on - not by the work it guards: a deadline with a later ``limit``
#: gets the lost time back.
STALL_TOLERANCE: Final = 0.02
#: A task whose wait is over when its deadline comes (its awaited future is done; it only
#: waits for the loop to run it) is looked at again this much later, up to its ``limit``.
RUNNABLE_RECHECK: Final = 0.002

_ATTR: Final = "_extproc_deadlines"


def loop_deadlines(loop: asyncio.AbstractEventLoop | None = None) -> DeadlineHeap:
    """The deadline heap of ``loop`` (the running one by default): one timer per loop for
    every plugin deadline, the chain's and the plugins' own. Kept on the loop itself, so the
    two go away together (a registry keyed by the loop would keep it alive: the heap and its
    timer refer to the loop)."""
    if loop is None:
        loop = asyncio.get_running_loop()
    heap: DeadlineHeap | None = getattr(loop, _ATTR, None)
    if heap is None:
        heap = DeadlineHeap(loop)
        with contextlib.suppress(AttributeError):  # a loop class with __slots__: not shared
            setattr(loop, _ATTR, heap)
    return heap


class Deadline:
    """One pending deadline of a :class:`DeadlineHeap`."""

    __slots__ = ("_fire", "deadline", "done", "expired", "limit", "task")

    def __init__(
        self,
        deadline: float,
        limit: float,
        fire: Callable[[], object],
        task: asyncio.Task[object] | None = None,
    ) -> None:
        self.deadline = deadline
        self.limit = limit
        self._fire: Callable[[], object] | None = fire
        #: the task the deadline guards (TaskTimeout), if any: see DeadlineHeap
        self.task = task
        #: the guarded work ended (:meth:`cancel`): this deadline will not fire
        self.done = False
        #: the deadline passed and ``fire`` was called
        self.expired = False

    def cancel(self) -> None:
        """The guarded work ended: never fire (and let go of what ``fire`` refers to)."""
        self.done = True
        self._fire = None
        self.task = None


class DeadlineHeap:
    """Calls each deadline's ``fire`` at its time, on one ``call_at`` timer of ``loop``.

    ``stall_tolerance`` (:data:`STALL_TOLERANCE`): when the timer runs more than this late, the
    loop could not run anything in the meantime (a GC pause, no CPU to run on), so the work
    could not have used that time; a deadline that has a later ``limit`` is moved by as long as
    the timer was late, never past ``limit``, instead of firing. ``limit`` defaults to the
    deadline itself: no time given back.

    Likewise a task's deadline (:class:`TaskTimeout`) whose task is no longer waiting - what it
    awaited is done, and it only waits for the loop to get to it, behind the other requests of
    a saturated worker - is looked at again :data:`RUNNABLE_RECHECK` later, up to ``limit``: the
    deadline bounds the work it guards (a plugin's dependency), not the queue for the CPU.
    Without this a valid request got its plugin's failure policy (a 503) because its Redis
    reply, which came in time, was read too late.

    "Still waiting" is decided only after everything else the loop had due at that moment:
    a due deadline whose task is waiting is looked at again on the loop's next ready
    callback, not fired from the timer. One timer serves many deadlines, so it runs as
    early as the earliest of them, and after a long turn it finds later ones due too, ahead of
    other timers that were due before them - the guarded work's own, shorter timeout among
    them (jwt_auth's Redis read of its token cache, bounded at 20 ms inside a 50 ms
    deadline: its own timeout would have ended the wait and let the plugin verify the token
    itself, but the deadline fired first, a 503 for a valid token after a busy spell).
    """

    __slots__ = ("_deferred", "_handle", "_heap", "_seq", "armed", "loop", "stall_tolerance")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, stall_tolerance: float = STALL_TOLERANCE
    ) -> None:
        self.loop = loop
        self.stall_tolerance = stall_tolerance
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        #: when the timer is armed for (``inf``: not armed)
        self.armed = math.inf
        #: due deadlines of waiting tasks, decided by :meth:`_decide` (scheduled when not empty)
        self._deferred: list[Deadline] = []

    def __len__(self) -> int:
        """Deadlines still in the heap, the ones already marked done included."""
        return len(self._heap)

    def at(
        self,
        deadline: float,
        fire: Callable[[], object],
        *,
        limit: float | None = None,
        task: asyncio.Task[object] | None = None,
    ) -> Deadline:
        """Call ``fire`` at ``deadline`` (loop time) unless the returned handle is cancelled;
        with ``task``, not while that task's wait is over (see the class), up to ``limit``."""
        entry = Deadline(deadline, deadline if limit is None else limit, fire, task)
        heapq.heappush(self._heap, (deadline, next(self._seq), entry))
        if deadline < self.armed:
            self._arm(deadline)
        return entry

    def timeout(self, deadline: float, *, limit: float | None = None) -> TaskTimeout:
        """``with heap.timeout(deadline):`` - ``asyncio.timeout`` on this heap: the current task
        is cancelled at ``deadline`` and the block raises :class:`TimeoutError`; a plain
        (synchronous) context manager, so it costs no coroutine of its own."""
        return TaskTimeout(self, deadline, limit)

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
            if deadline < entry.limit:
                later = 0.0
                if late > self.stall_tolerance:
                    later = now + late
                elif entry.task is not None and _runnable(entry.task):
                    later = now + RUNNABLE_RECHECK
                elif entry.task is not None:
                    if not self._deferred:
                        self.loop.call_soon(self._decide)
                    self._deferred.append(entry)
                    continue
                if later:
                    entry.deadline = min(entry.limit, later)
                    heapq.heappush(heap, (entry.deadline, next(self._seq), entry))
                    continue
            self._expire(entry)

    def _decide(self) -> None:
        """The deferred deadlines, now that the loop ran what it had due with them: a task
        whose wait ended meanwhile is looked at again later (up to its limit); the others'
        deadlines fire."""
        deferred, self._deferred = self._deferred, []
        now = self.loop.time()
        for entry in deferred:
            if entry.done:
                continue
            if entry.task is not None and _runnable(entry.task):
                entry.deadline = min(entry.limit, now + RUNNABLE_RECHECK)
                heapq.heappush(self._heap, (entry.deadline, next(self._seq), entry))
                if entry.deadline < self.armed:
                    self._arm(entry.deadline)
                continue
            self._expire(entry)

    def _expire(self, entry: Deadline) -> None:
        fire, entry._fire = entry._fire, None
        entry.expired = entry.done = True
        if fire is not None:
            try:
                fire()
            except Exception:  # one bad callback must not leave the others unfired
                log.exception("deadline callback failed")


def _runnable(task: asyncio.Task[object]) -> bool:
    """The task's wait is over: the future it awaits is done and its wake-up is queued."""
    waiter = getattr(task, "_fut_waiter", None)  # asyncio's Task, C or Python; not public API
    return waiter is not None and waiter.done()


class TaskTimeout:
    """See :meth:`DeadlineHeap.timeout`. The semantics are ``asyncio.timeout``'s: only the
    cancellation it caused becomes :class:`TimeoutError` (a cancel from elsewhere stays a
    cancel), and a block that swallowed that cancellation and finished keeps its result, with
    no cancellation left pending on the task."""

    __slots__ = ("_cancelling", "_deadline", "_entry", "_heap", "_limit", "_task")

    def __init__(self, heap: DeadlineHeap, deadline: float, limit: float | None) -> None:
        self._heap = heap
        self._deadline = deadline
        self._limit = limit
        self._task: asyncio.Task[object] | None = None
        self._entry: Deadline | None = None
        self._cancelling = 0

    @property
    def expired(self) -> bool:
        return self._entry is not None and self._entry.expired

    def __enter__(self) -> TaskTimeout:
        task = asyncio.current_task(self._heap.loop)
        if task is None:
            raise RuntimeError("a timeout needs a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._entry = self._heap.at(self._deadline, task.cancel, limit=self._limit, task=task)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, task = self._entry, self._task
        assert entry is not None and task is not None
        entry.cancel()
        # uncancel() whenever it expired (left to right): no cancellation of ours stays pending
        if (
            entry.expired
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
