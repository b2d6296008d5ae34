"""DeadlineHeap: many deadlines on one loop timer (the chain's per-call plugin deadlines and the
rate limiter's own)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, TypeVar

import pytest

from extproc.deadlines import DeadlineHeap, loop_deadlines

T = TypeVar("T")


class CountingLoop:
    """The running loop, counting the timers armed on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def time(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(when, callback)


async def test_deadlines_fire_in_order_and_cancelled_ones_never() -> None:
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop)
    fired: list[str] = []
    now = loop.time()
    heap.at(now + 0.03, lambda: fired.append("c"))
    heap.at(now + 0.01, lambda: fired.append("a"))
    b = heap.at(now + 0.02, lambda: fired.append("b"))
    dropped = heap.at(now + 0.015, lambda: fired.append("dropped"))
    dropped.cancel()
    await asyncio.sleep(0.06)
    assert fired == ["a", "b", "c"]
    assert b.expired and not dropped.expired
    assert len(heap) == 0 and heap.armed == float("inf")  # nothing left, no timer armed


async def test_work_that_ends_early_costs_no_timer_of_its_own() -> None:
    real = asyncio.get_running_loop()
    loop = CountingLoop(real)
    heap = DeadlineHeap(loop)  # type: ignore[arg-type]
    for _ in range(500):
        heap.at(loop.time() + 0.3, lambda: pytest.fail("fired")).cancel()
        await asyncio.sleep(0)
    assert loop.timers == 1  # armed once, for the first; the later ones wait behind it
    await asyncio.sleep(0.4)
    assert len(heap) == 0  # the timer swept every finished deadline when it fired
    assert loop.timers <= 3


async def test_a_late_timer_gives_the_time_back_up_to_the_limit() -> None:
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop, stall_tolerance=0.02)
    fired: list[float] = []
    start = loop.time()
    heap.at(start + 0.01, lambda: fired.append(loop.time()), limit=start + 1.0)
    loop.call_soon(time.sleep, 0.1)  # the loop stalls past the deadline
    await asyncio.sleep(0.15)
    assert not fired  # moved by the ~0.1 s the timer was late
    await asyncio.sleep(0.15)
    assert fired and fired[0] - start < 0.5


async def test_without_a_limit_a_late_timer_fires_at_once() -> None:
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop, stall_tolerance=0.02)
    fired: list[float] = []
    heap.at(loop.time() + 0.01, lambda: fired.append(loop.time()))
    loop.call_soon(time.sleep, 0.1)
    await asyncio.sleep(0.12)
    assert len(fired) == 1


async def test_a_failing_callback_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop)
    fired: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    now = loop.time()
    heap.at(now + 0.01, boom)
    heap.at(now + 0.01, lambda: fired.append(1))
    heap.at(now + 0.03, lambda: fired.append(2))
    await asyncio.sleep(0.06)
    assert fired == [1, 2]
    assert "deadline callback failed" in caplog.text


# ------------------------------------------------------------- timeout(): asyncio.timeout on it


async def test_timeout_raises_timeout_error_at_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), loop_deadlines().timeout(started + 0.02) as cm:
        await asyncio.sleep(5)
    assert cm.expired and loop.time() - started < 0.5
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_timeout_met_leaves_nothing_behind() -> None:
    loop = asyncio.get_running_loop()
    with loop_deadlines().timeout(loop.time() + 0.02) as cm:
        await asyncio.sleep(0)
    assert not cm.expired
    await asyncio.sleep(0.05)  # the deadline passes: nothing fires into this task
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        with loop_deadlines().timeout(loop.time() + 5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_block_that_swallows_its_cancellation_keeps_its_result() -> None:
    loop = asyncio.get_running_loop()
    result = "none"
    with loop_deadlines().timeout(loop.time() + 0.02) as cm:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            result = "late answer"
    assert result == "late answer" and cm.expired
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # and no cancellation is delivered later


async def test_one_heap_per_loop() -> None:
    assert loop_deadlines() is loop_deadlines(asyncio.get_running_loop())


def test_a_closed_loop_and_its_heap_go_away_together() -> None:
    import gc
    import weakref

    async def use() -> None:
        loop = asyncio.get_running_loop()
        loop_deadlines().at(loop.time() + 60, lambda: None)  # a timer still armed at the end

    loop = asyncio.new_event_loop()
    loop.run_until_complete(use())
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None


def answered_while_busy(value: T) -> asyncio.Future[T]:
    """A dependency's answer that comes 8 ms from now - in time for a 10 ms deadline - while
    the loop is busy (a 15 ms callback from 2 ms on: other requests), so whoever awaits it
    runs only after that deadline. Also used by test_chain_deadlines."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()
    start = loop.time()
    loop.call_at(start + 0.002, time.sleep, 0.015)  # the worker busy with other requests
    loop.call_at(start + 0.008, answer.set_result, value)  # the dependency answers in time
    return answer


async def _answered_in_time_but_run_late(limit: float | None) -> str:
    """A guarded wait whose answer comes 2 ms before the deadline, but the task only gets to
    run after the deadline: the deadline's timer runs on time (7 ms late, under the stall
    tolerance) and finds the task's wait already over."""
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop, stall_tolerance=0.02)
    start = loop.time()
    answer = answered_while_busy("answer")

    async def guarded() -> str:
        with heap.timeout(start + 0.010, limit=None if limit is None else start + limit):
            return await answer

    try:
        return await guarded()
    except TimeoutError:
        return "timeout"


async def test_a_wait_that_ended_in_time_is_not_cut_while_its_task_waits_for_the_cpu() -> None:
    assert await _answered_in_time_but_run_late(limit=1.0) == "answer"


async def test_without_a_limit_the_deadline_is_kept_even_for_a_runnable_task() -> None:
    assert await _answered_in_time_but_run_late(limit=None) == "timeout"


async def test_a_wait_still_pending_at_the_deadline_times_out_despite_the_limit() -> None:
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop)
    start = loop.time()
    with pytest.raises(TimeoutError), heap.timeout(start + 0.01, limit=start + 1.0):
        await loop.create_future()  # never answered
    assert loop.time() - start < 0.5  # at its deadline, not at the limit


class _Reply(asyncio.Protocol):
    def __init__(self, reply: asyncio.Future[bytes]) -> None:
        self.reply = reply

    def data_received(self, data: bytes) -> None:
        if not self.reply.done():
            self.reply.set_result(data)


async def _socket_reply_in_time_read_late() -> bytes | str:
    """A real socket: the reply reaches the kernel 2 ms in, while the loop runs a 15 ms
    callback (other requests); the deadline is at 10 ms, its limit far later."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    reply: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.connect_accepted_socket(lambda: _Reply(reply), ours)
    heap = DeadlineHeap(loop, stall_tolerance=0.02)
    start = loop.time()

    def busy() -> None:
        theirs.send(b"reply")
        time.sleep(0.015)

    loop.call_at(start + 0.002, loop.call_soon, busy)
    try:
        with heap.timeout(start + 0.010, limit=start + 1.0):
            return await reply
    except TimeoutError:
        return "timeout"
    finally:
        transport.close()
        theirs.close()
        await asyncio.sleep(0)  # the transport's close runs


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_socket_reply_that_came_in_time_is_read_on_both_loops(loop_kind: str) -> None:
    """uvloop runs timers before it polls I/O in each turn: the reply that reached the socket
    during the busy callback is read in that turn's poll, so the deadline, next turn, finds the
    task's wait over (as on asyncio, which polls first)."""
    import uvloop

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(_socket_reply_in_time_read_late()) == b"reply"
    finally:
        loop.close()


async def _own_timeout_due_first() -> str:
    """The guarded work bounds its own wait (20 ms; a plugin's Redis read) inside its
    deadline (30 ms, limit far later) and falls back when that bound ends it. Another
    deadline (5 ms) has the heap's one timer armed early, and a long turn (40 ms) makes all
    three due at once: the heap's timer runs first and finds the deadline due and the task
    still waiting, since the work's own bound, due earlier, has not run yet."""
    loop = asyncio.get_running_loop()
    heap = DeadlineHeap(loop, stall_tolerance=0.02)
    start = loop.time()
    heap.at(start + 0.005, lambda: None)  # another request's deadline
    loop.call_at(start + 0.001, time.sleep, 0.04)  # the worker busy with other requests

    async def guarded() -> str:
        with heap.timeout(start + 0.03, limit=start + 1.0):
            try:
                async with asyncio.timeout_at(start + 0.02):
                    await loop.create_future()  # the dependency does not answer
            except TimeoutError:
                return "fallback"
            return "answer"

    try:
        return await guarded()
    except TimeoutError:
        return "timeout"


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_deadline_is_decided_after_the_work_s_own_earlier_timeout(loop_kind: str) -> None:
    """Due together, the work's own timeout (due first) ends its wait, and the deadline finds
    the task runnable: the plugin's fallback answers, not its failure policy (before: a 503
    from jwt_auth for a valid token whose Redis read ran out of its 20 ms in a busy spell)."""
    import uvloop

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(_own_timeout_due_first()) == "fallback"
    finally:
        loop.close()
