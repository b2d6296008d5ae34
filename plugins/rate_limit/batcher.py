"""Adaptive batching of store calls: a request waits for company only when waiting is cheap.

* Spare CPU and no round trip in flight: a request is sent on the next loop tick, with whatever
  else arrived during this tick: light load never waits.
* A round trip in flight: requests gather in a bounded queue until it returns, the batch is full
  (``max_batch``) or the oldest has waited ``in_flight_wait`` (``batch.in_flight_wait_ms``, 1 ms
  by default; at most ``max_wait``) - whichever comes first - but never more than
  ``max_in_flight`` round trips run at once. They gather only when the recent arrival rate
  would bring ``min_gather`` requests within ``in_flight_wait`` (4,000 req/s with the
  defaults); below it a request takes a free slot on the next tick, as an idle batcher's
  does. (At 1,000 req/s a round trip of ~0.2 ms has ~0.2 arrivals behind it: waiting made
  the request that came alone wait - up to 1 ms; a p99 of 0.85 ms as read then, on the loop's
  millisecond clock - and saved no round trip: 0.83 per request either way.)
* Saturated worker: the event loop's thread is on a CPU or waiting for one nearly all the time
  (``saturation()`` in [0, 1], see
  :class:`~extproc.observability.saturation.LoopSaturation`). A batch then gathers for
  ``window = saturation x max_wait`` (or until full) even when no round trip is in flight.
  There the requests wait in queues for the CPU anyway, and every round trip saved is client
  and Redis CPU given back to the requests: fewer round trips, more throughput, and a window
  of at most ``max_wait``, only when the worker could not have answered sooner. (A gathered
  batch still needs a free slot: with ``max_in_flight`` round trips out, it also waits for
  one of them, which on a starved machine can take longer than the window itself.)
* ... and only when the window would gather company: at the recent arrival rate
  (:class:`~extproc.observability.saturation.ArrivalRate`, every ``RATE_INTERVAL``) it must
  collect ``min_gather`` requests (4 by default). A worker that reads as saturated at a
  moderate rate would otherwise hold each request for a window that saves almost no round
  trips (measured on a slow machine at 1,000 req/s: windows of 2-8 ms, batches of 1.6-1.8).
* ... and only when the worker has a backlog (``backlog``: its streams in flight, at least
  ``min_backlog``, 4 by default). A worker can read as saturated while it keeps up, its
  core busy with the requests as they come: at 1,000 req/s on grpc.aio (~0.7 ms of CPU per
  request at that load) windows of 4-10 ms gathered 1.02-1.06 requests per round trip and
  put up to 5 ms on the batcher's wait p99; against ``max_wait_ms: 0`` in the same 10
  rounds (2026-12-06 18:13) the added p99 was 6.3 against 4.1 ms, higher in 9 of 10, while
  at saturation the window is worth 1.29x req/s (2,889 against 2,235). With this rule,
  against the commit before in the same rounds: added p99 3.5 against 6.7 ms (lower in 5
  of 6 rounds), req/s at saturation 1.00x, Redis round trips per request at saturation
  0.060 against 0.053. A threshold of 8 doubled those round trips (0.119 against 0.053).
  What it cannot see: on grpc.aio a saturated loop's queue is partly in grpc's completion
  queue, not yet streams of the worker's, so on a slow machine the worker dips below the
  threshold now and then and sends those requests one or two per round trip (0.14-0.19
  round trips per request at saturation, 2026-12-07). Keeping the window open 20 ms after
  the last backlog took that to 0.073, but at 1,000 req/s on the same machine it took the
  batcher's wait p99 from 0.75 to 9.7 ms and the p99 from 31 to 93 ms. Not kept
  (docs/performance.md).
* ... or, without that backlog, while the CPU is under pressure (``pressure``:
  :class:`~extproc.observability.saturation.CpuPressure`, at least ``min_pressure``, 0.5 by
  default): some task waits for a core most of the time - of the sidecar's cgroup where
  cgroup v2 gives it its own pressure (a container), else of the machine. Several workers
  on a full machine each keep up with what reaches them (few streams in flight in each)
  while Envoy and the load queue for the CPU; the backlog rule alone took two grpc.aio
  workers at saturation from 0.36 to 0.57 Redis round trips per request (2.8 to 1.8
  requests per round trip) at 0.92x req/s (2026-12-06 20:21, against the commit before
  it). With this exception, against the backlog rule alone in the same rounds (20:27): 0.39
  against 0.57, 1.09x req/s; one grpc.aio worker 0.99x and http2 1.00x (20:32, 6 rounds),
  their batching at 1,000 req/s the same (no window: the batcher's wait p99 0.2-0.5 ms on
  both sides). PSI at 1,000 req/s, one worker or two, read 0.18-0.39; two saturated
  workers 0.54-0.77 (the machine's, the bench's processes sharing its root cgroup).
* ... and the same pressure opens a window when the worker's loop does not read saturated at
  all: ``window = pressure x max_wait`` (still only at a rate that fills it). Two saturated
  grpc.aio workers each take about half of a core, so each loop's demand stays below the
  meter's low mark: polled on ``/status`` every 100 ms under wrk (2026-12-07 23:40), each
  read saturation 0.02-0.03 (median), 1 stream in flight (median) and PSI 0.53-0.79, and
  their batches carried 2.3-2.7 requests. With this rule, against the commit before in the
  same rounds: 0.20 against 0.40 round trips per request (10 rounds) and 0.21 against 0.34
  (4 rounds); Redis CPU 29 against 39 µs per request; req/s 1.04x and 0.93x (medians of
  per-round ratios spread 0.86-1.31: no change established either way); the sidecars' CPU
  per request the same; http2 unchanged (its round trips per request equal on both sides),
  one grpc.aio worker 0.050 against 0.069 and 0.067 against 0.068; at 1,000 req/s no window
  on either side (1.0 request per round trip).
  There two workers read the pressure at 0.5 or more in ~5 % of 100 ms polls (one worker:
  never, max 0.37), so a window can open at that rate now and then on a slower machine.
* A full queue refuses the request (:class:`QueueFullError`, counted in ``dropped``) instead of
  growing: the caller applies its failure policy.
* ``flush`` / ``close`` wait (bounded) for queued and in-flight batches.

Each caller gets its own future and may stop waiting for it (cancel it) at its own deadline;
a cancelled entry that has not been sent yet is dropped from its batch.

A round trip is a task awaiting ``send``, or - with ``start``, when it can take the batch - a
callback-shaped call that settles the batch from the read that brings the reply: the callers'
futures are set in the loop turn that read it, not in the next one, where an awaiting task
would wake, and no task is made. (Sending at once from ``submit`` instead of on the next tick
would save one more turn, but it halved the batches at saturation: the requests of one read
no longer share a round trip. Measured, not kept. Tried again on 2026-12-05 only at a light
load - nothing in flight, spare CPU, under 4,000 arrivals/s: batching at saturation kept,
the worker's CPU per request at 300 req/s 0.92x on http2 and 0.97x on grpc.aio (paired with
the new version always second, which an A/A run later showed costs it ~5 %), but the p99
at 1,000 req/s on grpc.aio higher in three runs out of three, median of the per-round
differences +0.35 to +0.87 ms, lower in 9 of 28 rounds; http2's unchanged. Cause not found:
not a wait for a free slot (the batcher's wait p99 was lower, 78 against 210 µs), nor the
hook (its p99 the same). Not kept:
bench/results/2026-12-05-0745-send-at-once-vs-d226654.md and -0754-.)
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from extproc.observability.saturation import ArrivalRate, loop_saturation

__all__ = ["RATE_INTERVAL", "Batcher", "BatcherClosedError", "QueueFullError"]

#: how often (at most) the arrival rate is measured, on submits; an idle batcher measures none
RATE_INTERVAL = 0.05

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    """The batcher's queue is full."""


class BatcherClosedError(Exception):
    """The batcher was closed before the item was decided."""


@dataclass(slots=True)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float  # loop time
    enqueued: float  # loop time: what the gathering rules and their timers compare
    #: ``time.perf_counter()`` at submit, for the reported wait (uvloop's loop time moves in
    #: whole milliseconds, once per loop turn: a wait of one turn would read 0 or 1 ms)
    since: float


class _Out(Generic[T, R]):
    """A batch out through ``start`` (hashed by identity)."""

    __slots__ = ("entries",)

    def __init__(self, entries: list[_Entry[T, R]]) -> None:
        self.entries = entries


Send = Callable[[Sequence[T], float], Awaitable[Sequence[R]]]
#: ``start(items, deadline, done)``: begin a round trip whose results (or error) go to ``done``,
#: exactly once; ``False`` when it cannot (then ``send`` is used)
Start = Callable[[Sequence[T], float, Callable[[Sequence[R] | BaseException], None]], bool]


class Batcher(Generic[T, R]):
    """``send(items, deadline)`` decides a batch (one round trip) and returns one result per
    item, in order; ``deadline`` (loop time) is the latest deadline of the batch's items."""

    def __init__(
        self,
        send: Send[T, R],
        *,
        max_batch: int = 100,
        max_wait: float = 0.001,
        max_in_flight: int = 2,
        max_queue: int = 10_000,
        in_flight_wait: float = 0.001,
        saturation: Callable[[], float] | None = None,
        min_gather: float = 4.0,
        backlog: Callable[[], int] | None = None,
        min_backlog: int = 4,
        pressure: Callable[[], float] | None = None,
        min_pressure: float = 0.5,
        start: Start[T, R] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("batcher bounds must be positive")
        self._send = send
        self._start = start
        #: the batches out through ``start`` (failed by ``close`` if still out)
        self._started: set[_Out[T, R]] = set()
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.in_flight_wait = min(in_flight_wait, max_wait)
        self._saturation = saturation if saturation is not None else loop_saturation()
        #: a saturated worker gathers only when its window would collect this many requests
        #: at the recent arrival rate (0: whenever it is saturated)
        self.min_gather = min_gather
        self._arrivals = ArrivalRate(RATE_INTERVAL)
        #: the worker's requests in progress (its streams in flight): a saturated window
        #: gathers only while at least ``min_backlog`` are (None: no such check)
        self._backlog = backlog
        self.min_backlog = min_backlog
        #: the CPU pressure (0 .. 1; the cgroup's, else the machine's): without a backlog, a
        #: saturated window still gathers while it is at least ``min_pressure`` (None: no such
        #: exception)
        self._pressure = pressure
        self.min_pressure = min_pressure
        self._on_batch = on_batch
        #: called with each request's wait (seconds) from ``submit`` to its round trip's start,
        #: measured with ``time.perf_counter``
        self._on_wait = on_wait
        #: called with each item that leaves the queue without being sent: its caller gave up
        #: before its round trip (cancelled its future), or ``close`` failed it
        self._on_drop = on_drop
        #: how long a batch gathers with no round trip in flight (0: spare CPU, send at once)
        self.window = 0.0
        #: the worker's saturation as last read (0 .. 1), which sized ``window``
        self.saturation = 0.0
        self._queue: collections.deque[_Entry[T, R]] = collections.deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        #: the round trip an idle batcher started for this tick's requests, not yet running: a
        #: task (``send``) or a callback (``start``)
        self._soon: asyncio.Task[None] | asyncio.Handle | None = None
        self._dispatching = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushing = False
        self._closed = False
        #: counters (read by metrics)
        self.dropped = 0
        self.batches = 0
        self.sent = 0

    @property
    def arrival_rate(self) -> float:
        """Requests submitted per second, as last measured."""
        return self._arrivals.rate

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, item: T, deadline: float) -> asyncio.Future[R]:
        """Queue ``item``; its result arrives on the returned future. Raises
        :class:`QueueFullError` or :class:`BatcherClosedError` at once instead of waiting."""
        if self._closed:
            raise BatcherClosedError("batcher is closed")
        if len(self._queue) >= self.max_queue:
            self._purge_cancelled()
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                raise QueueFullError("rate-limit queue is full")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        now = loop.time()
        self._queue.append(_Entry(item, future, deadline, now, time.perf_counter()))
        self._idle.clear()
        rate = self._arrivals.tick(now) if self.min_gather else 0.0
        self.saturation = level = self._saturation()
        if level:
            if (
                self._backlog is not None
                and self._backlog() < self.min_backlog
                # at a rate no window could fill, it sends at once anyway: no PSI read
                and (rate * level * self.max_wait < self.min_gather or self._pressed() is None)
            ):
                level = 0.0  # a busy worker keeping up on a machine that does too: no queue
        elif rate * self.max_wait >= self.min_gather and (pressed := self._pressed()) is not None:
            # this worker keeps up, but the machine is full: the queue is for the CPU it shares
            # (not asked at a rate that no window could fill: light load reads no PSI)
            level = pressed
        window = level * self.max_wait
        if window and rate * window < self.min_gather:
            window = 0.0  # waiting would save (almost) no round trip: send as with spare CPU
        self.window = window
        if self._gathering:
            self._pump()
        elif self._soon is None:
            # Idle: start the round trip's task now; it takes its batch when it first runs,
            # on the next loop tick, which is when a round trip started now would begin anyway
            # - with every request submitted during this tick in the same round trip. No added
            # wait; under load, free batching; and no loop turn of its own before the send.
            # With ``start``, a callback does the same and needs no task.
            if self._start is not None:
                self._soon = loop.call_soon(self._start_soon)
            else:
                self._soon = self._spawn(self._run_soon())
        return future

    def _pressed(self) -> float | None:
        """The CPU pressure when it is at least ``min_pressure`` (the machine is full), else
        ``None``."""
        if self._pressure is None:
            return None
        pressure = self._pressure()
        return pressure if pressure >= self.min_pressure else None

    def _start_soon(self) -> None:
        self._soon = None
        if not self._gathering:
            self._dispatch()
        self._pump()

    async def _run_soon(self) -> None:
        self._soon = None
        entries = None
        if not self._gathering:
            entries = self._take()  # still idle: this task carries the first batch itself
        # the rest (or all, when the load changed meanwhile) as _pump decides; when nothing
        # is left (flushed meanwhile, or every caller gave up), it marks the batcher idle
        self._pump()
        if entries is not None:
            await self._run(entries)

    @property
    def _behind(self) -> float:
        """How long a request waits behind a round trip in flight: ``in_flight_wait`` while
        the arrival rate (measured in :meth:`submit`) brings ``min_gather`` requests within
        it - the saturated window's rule; else 0: a request that would wait alone takes a free
        slot on the next tick (with the rest of its tick's requests)."""
        wait = self.in_flight_wait
        if self.min_gather and self._arrivals.rate * wait < self.min_gather:
            return 0.0
        return wait

    @property
    def _gathering(self) -> bool:
        """Requests go through :meth:`_pump`'s rules rather than straight out on the next
        tick: a flush is on, the worker is saturated, every slot is taken, or a round trip is
        in flight and the arrival rate says to wait for company behind it."""
        in_flight = self._in_flight
        return bool(
            self._flushing
            or self.window
            or (in_flight and (self._behind or in_flight >= self.max_in_flight))
        )

    def _purge_cancelled(self) -> None:
        kept: collections.deque[_Entry[T, R]] = collections.deque()
        for entry in self._queue:
            if entry.future.done():
                self._dropped(entry)
            else:
                kept.append(entry)
        self._queue = kept

    def _dropped(self, entry: _Entry[T, R]) -> None:
        if self._on_drop is not None:
            self._on_drop(entry.item)

    def _pump(self) -> None:
        """Start round trips while allowed; otherwise make sure a timer will come back."""
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < self.max_in_flight:
            wait = self.window or (self._behind if self._in_flight else 0.0)
            if wait:  # never gather for more than a quarter of the oldest request's budget
                first = self._queue[0]
                wait = min(wait, (first.deadline - first.enqueued) * 0.25)
            if (
                wait > 0
                and not self._flushing
                and len(self._queue) < self.max_batch
                and loop.time() - self._queue[0].enqueued < wait
            ):
                self._arm_timer(self._queue[0].enqueued + wait)
                return
            if not self._dispatch():
                break
        if not self._queue:
            self._cancel_timer()
            if not self._in_flight:
                self._idle.set()

    def _arm_timer(self, when: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _dispatch(self) -> bool:
        entries = self._take()
        if entries is None:
            return False
        if self._start is not None:
            batch = _Out(entries)
            self._started.add(batch)
            # a round trip settled within start (breaker open ...) must not pump from inside
            # this one: with a long queue that would recurse once per batch; the caller's
            # pump goes on instead
            self._dispatching = True
            try:
                deadline = max(e.deadline for e in entries)
                items = [e.item for e in entries]
                if self._start(items, deadline, lambda r: self._settle(batch, r)):
                    return True
            except Exception as exc:
                self._settle(batch, exc)
                return True
            finally:
                self._dispatching = False
            self._started.discard(batch)
        self._spawn(self._run(entries))
        return True

    def _settle(self, batch: _Out[T, R], results: Sequence[R] | BaseException) -> None:
        """A ``start`` round trip ended: its results (or error) to its callers, then as
        ``_run`` does when its round trip returns."""
        if batch not in self._started:
            return  # settled already (a second call), or failed by close()
        self._started.discard(batch)
        if not isinstance(results, BaseException) and len(results) != len(batch.entries):
            results = ValueError(f"{len(results)} results for {len(batch.entries)} requests")
        if isinstance(results, BaseException):
            for entry in batch.entries:
                if not entry.future.done():
                    entry.future.set_exception(results)
        else:
            for entry, result in zip(batch.entries, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        self._returned()

    def _spawn(self, coro: Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _take(self) -> list[_Entry[T, R]] | None:
        """The next batch, counted as a round trip in flight (``None``: nothing to send)."""
        entries: list[_Entry[T, R]] = []
        while self._queue and len(entries) < self.max_batch:
            entry = self._queue.popleft()
            if not entry.future.done():
                entries.append(entry)
            else:  # its caller gave up: do not count it
                self._dropped(entry)
        if not entries:
            return None
        if self._on_wait is not None:
            now = time.perf_counter()
            for entry in entries:
                self._on_wait(now - entry.since)
        self._cancel_timer()
        self._in_flight += 1
        self.batches += 1
        self.sent += len(entries)
        if self._on_batch is not None:
            self._on_batch(len(entries))
        return entries

    async def _run(self, entries: list[_Entry[T, R]]) -> None:
        try:
            deadline = max(e.deadline for e in entries)
            results = await self._send([e.item for e in entries], deadline)
            for entry, result in zip(entries, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        except asyncio.CancelledError:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosedError("batcher was closed"))
            raise
        except Exception as exc:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        finally:
            self._returned()

    def _returned(self) -> None:
        """A round trip is no longer in flight: start what may go now."""
        self._in_flight -= 1
        if (not self._closed or self._flushing) and not self._dispatching:
            self._pump()
        if not self._queue and not self._in_flight:
            self._idle.set()

    async def flush(self, within: float) -> bool:
        """Send everything queued now (no gathering) and wait for every round trip, at most
        ``within`` seconds. True when all finished."""
        self._flushing = True
        try:
            self._pump()
            async with asyncio.timeout(within):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._flushing = False

    async def close(self, within: float) -> bool:
        """Refuse new items, flush (bounded), then fail whatever is left. True when all
        finished within ``within`` seconds."""
        self._closed = True
        done = await self.flush(within)
        self._cancel_timer()
        if self._soon is not None:  # an idle round trip not yet running (a task is also below)
            self._soon.cancel()
            self._soon = None
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(BatcherClosedError("batcher was closed"))
            self._dropped(entry)
        for batch in list(self._started):  # out through start: their replies are dropped
            self._started.discard(batch)
            self._in_flight -= 1
            for entry in batch.entries:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosedError("batcher was closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._idle.set()
        return done
