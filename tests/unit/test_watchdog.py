"""The loop-lag watchdog: it names the blocking plugin, slows down while the worker is idle, and
watches the first piece of work after a quiet spell at full speed again."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import select
import threading
import time
from typing import Protocol

import pytest

from extproc.observability.gcpause import GcTimer
from extproc.observability.metrics import Registry
from extproc.observability.watchdog import LoopLagWatchdog, ThreadState, plugin_hook_codes


class Blocking:
    async def on_request(self, seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 - what the watchdog is for


def _beats(dog: LoopLagWatchdog) -> int:
    return dog.lag.labels().count


async def _reported(dog: LoopLagWatchdog) -> None:
    """Give the watchdog's thread half a second to report a stall."""
    for _ in range(50):
        if dog.last_stall is not None:
            return
        await asyncio.sleep(0.01)


def _watchdog(
    busy: list[bool], plugin: Blocking | None = None, idle_interval: float = 0.2
) -> LoopLagWatchdog:
    codes = plugin_hook_codes({"blocking": plugin}) if plugin is not None else {}
    return LoopLagWatchdog(
        Registry(),
        threshold=0.05,
        hook_codes=lambda: codes,
        interval=0.01,
        idle_interval=idle_interval,
        busy=lambda: busy[0],
    )


async def test_an_idle_worker_beats_at_the_idle_interval_and_a_busy_one_at_full_speed() -> None:
    busy = [False]
    dog = _watchdog(busy)
    dog.start()
    try:
        await asyncio.sleep(0.1)  # the first beat finds no work
        assert dog.idle
        idle_start = _beats(dog)
        await asyncio.sleep(0.7)
        idle_beats = _beats(dog) - idle_start
        busy[0] = True
        dog.wake()
        busy_start = _beats(dog)
        await asyncio.sleep(0.3)
        busy_beats = _beats(dog) - busy_start
    finally:
        dog.stop()
    assert idle_beats <= 5  # every 0.2 s, not every 0.01 s
    assert busy_beats >= 10
    assert not dog.idle


async def test_a_busy_healthy_loop_wakes_the_thread_about_once_per_threshold() -> None:
    """No beat can be late before its due time + threshold, so the thread sleeps until then
    rather than looking every half threshold: each look takes the GIL from the loop's thread.
    Over 0.6 s with a 0.05 s threshold: ~11 looks (it was 24 at half a threshold)."""
    dog = _watchdog([True])
    dog.start()
    try:
        start = dog.looks
        await asyncio.sleep(0.6)
        looks = dog.looks - start
    finally:
        dog.stop()
    assert 1 <= looks <= 15
    assert dog.last_stall is None


async def test_a_quiet_loop_is_not_a_stall() -> None:
    """Lateness counts from when the next beat was due, not from the last one: 0.2 s between
    idle beats, four times the threshold, is no stall."""
    dog = _watchdog([False])
    dog.start()
    try:
        await asyncio.sleep(1.0)
    finally:
        dog.stop()
    assert dog.last_stall is None
    assert dog.stalls.labels("(none)").value == 0


async def test_the_first_work_after_a_quiet_spell_is_watched_at_full_speed() -> None:
    plugin = Blocking()
    busy = [False]
    dog = _watchdog(busy, plugin)
    dog.start()
    try:
        await asyncio.sleep(0.1)
        assert dog.idle
        busy[0] = True
        dog.wake()  # what the servicer does when a stream starts
        # blocks for less than idle_interval + threshold: unseen if the beat stayed idle
        await plugin.on_request(0.15)
        await _reported(dog)
    finally:
        dog.stop()
    assert dog.last_stall is not None
    name, late = dog.last_stall
    assert name == "blocking"
    assert 0.05 < late < 0.15  # a lower bound of the 0.15 s it blocked


async def test_stop_returns_at_once_while_idle() -> None:
    dog = LoopLagWatchdog(Registry(), threshold=5.0, idle_interval=10.0, busy=lambda: False)
    dog.start()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    dog.stop()
    assert time.monotonic() - started < 0.5
    assert dog._thread is not None and not dog._thread.is_alive()


async def test_a_process_that_did_not_run_is_no_stall() -> None:
    """The clock jumps a second while the process uses no CPU (what SIGSTOP or a paused VM
    look like from inside): logged as a freeze, not counted as a loop stall."""
    offset = [0.0]
    dog = LoopLagWatchdog(
        Registry(), threshold=0.05, interval=0.01, clock=lambda: time.monotonic() + offset[0]
    )
    dog.start()
    try:
        await asyncio.sleep(0.1)
        offset[0] = 1.0  # every thread of the process stood still for a second
        await asyncio.sleep(0.2)
    finally:
        dog.stop()
    assert dog.frozen == 1
    assert dog.last_stall is None


async def test_a_plugin_holding_the_gil_in_c_code_is_still_a_stall() -> None:
    """The watchdog's thread cannot run while C code holds the GIL either, so it oversleeps as
    in a freeze; but the process is on a CPU meanwhile, which tells the two apart."""

    class GilHolding:
        async def on_request(self) -> None:
            sum(range(30_000_000))  # one C call: the GIL is not released until it returns

    plugin = GilHolding()
    codes = plugin_hook_codes({"gil": plugin})
    dog = LoopLagWatchdog(Registry(), threshold=0.05, hook_codes=lambda: codes, interval=0.01)
    dog.start()
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await plugin.on_request()
        blocked = time.monotonic() - started
        await _reported(dog)
    finally:
        dog.stop()
    assert blocked > 0.1, "the C call was too quick to be a stall on this machine"
    assert dog.frozen == 0
    assert dog.last_stall is not None and dog.last_stall[0] == "gil"


class _Hook(Protocol):
    async def on_request(self) -> None: ...


async def _watched_call(dog: LoopLagWatchdog, plugin: _Hook) -> None:
    """The hook called once under a running watchdog, until its stall is reported."""
    dog.start()
    try:
        await asyncio.sleep(0.05)
        await plugin.on_request()
        await _reported(dog)
    finally:
        dog.stop()


async def test_a_long_garbage_collection_is_the_collectors_stall_not_the_plugins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A collection holds the GIL throughout and ends in Python finalizers, where the thread
    finds the loop inside the hook that allocated last: the stall is the collector's."""

    class Allocating:
        async def on_request(self) -> None:
            gc.collect()  # a full collection, as an allocation past the thresholds starts one

    plugin = Allocating()
    codes = plugin_hook_codes({"allocating": plugin})
    heap = [[i] for i in range(2_000_000)]  # tracked objects for the collector to walk
    dog = LoopLagWatchdog(Registry(), threshold=0.05, hook_codes=lambda: codes, interval=0.01)
    pauses: list[float] = []
    with (
        caplog.at_level(logging.WARNING, "extproc.watchdog"),
        GcTimer(lambda _, seconds: pauses.append(seconds)),
    ):
        await _watched_call(dog, plugin)
    del heap
    assert max(pauses) > 0.1, "the collection was too quick to be a stall on this machine"
    assert dog.last_stall is not None and dog.last_stall[0] == "(gc)"
    assert dog.stalls.labels("(gc)").value == 1
    assert dog.stalls.labels("allocating").value == 0
    (record,) = [r for r in caplog.records if "garbage collector" in r.getMessage()]
    assert record.during == "allocating"  # type: ignore[attr-defined]
    assert record.gc_generation == 2  # type: ignore[attr-defined]
    assert dog._on_gc not in gc.callbacks  # stop() took its callback out


async def _right_after_a_beat(dog: LoopLagWatchdog) -> None:
    """Return just after the heartbeat ran: the next one is a whole interval away."""
    seen = _beats(dog)
    async with asyncio.timeout(2):
        while _beats(dog) == seen:
            await asyncio.sleep(0.002)


def _background_job(seconds: float) -> None:
    time.sleep(seconds)


async def test_a_background_task_blocking_an_idle_worker_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing calls wake() for a plugin's own background task. It blocks the idle loop for
    0.2 s starting just after a beat: it is over before the next idle beat is due (0.3 s), so
    no beat is ever late. The idle thread, looking every 0.1 s, sees the loop's thread out of
    epoll and sends a probe, which is still unanswered 0.05 s later (0.15 s at most)."""
    dog = _watchdog([False], idle_interval=0.3)
    dog.start()
    try:
        await asyncio.sleep(0.1)
        assert dog.idle and dog.thread_state is not None
        await _right_after_a_beat(dog)
        _background_job(0.2)
        await _reported(dog)
    finally:
        dog.stop()
    assert dog.probes >= 1
    assert dog.last_stall is not None
    name, late = dog.last_stall
    assert name == "(none)"  # no plugin hook on the stack
    assert 0.05 < late < 0.2
    warning = next(r for r in caplog.records if r.name == "extproc.watchdog")
    assert "test_watchdog.py" in warning.where and "(_background_job)" in warning.where  # type: ignore[attr-defined]


async def test_without_the_probe_that_block_goes_unseen() -> None:
    """The same block with the probe off (what other systems get): the blind spot."""
    dog = _watchdog([False], idle_interval=0.3)
    dog.start(probe_when_idle=False)
    try:
        await asyncio.sleep(0.1)
        await _right_after_a_beat(dog)
        _background_job(0.2)
        await asyncio.sleep(0.3)
    finally:
        dog.stop()
    assert dog.last_stall is None


async def test_an_idle_loop_is_looked_at_but_not_woken() -> None:
    """Idle, the thread looks every two thresholds (~10 times over a second here); the
    loop's thread waits in epoll each time, so no probe is sent to it."""
    dog = _watchdog([False])
    dog.start()
    try:
        await asyncio.sleep(0.1)
        looks, probes = dog.looks, dog.probes
        await asyncio.sleep(1.0)
    finally:
        dog.stop()
    assert 6 <= dog.looks - looks <= 14
    assert dog.probes - probes <= 2  # only if a look lands on a beat being run
    assert dog.last_stall is None


def test_thread_state_tells_epoll_from_other_waits() -> None:
    ready, release = threading.Event(), threading.Event()
    epoll = select.epoll()

    def in_epoll() -> None:
        ready.set()
        epoll.poll(5)

    def in_sleep() -> None:
        ready.set()
        release.wait(5)

    try:
        for target, expected in ((in_epoll, True), (in_sleep, False)):
            ready.clear()
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            ready.wait()
            assert thread.native_id is not None
            state = ThreadState.open(thread.native_id)
            assert state is not None
            try:
                deadline = time.monotonic() + 2
                while state.in_epoll() != expected and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the thread has entered its wait
                assert state.in_epoll() is expected
            finally:
                state.close()
            if target is in_epoll:
                r, w = os.pipe()
                epoll.register(r, select.EPOLLIN)
                os.write(w, b"x")
                thread.join(2)
                os.close(r)
                os.close(w)
            else:
                release.set()
                thread.join(2)
    finally:
        epoll.close()


def test_thread_state_is_none_where_it_cannot_be_read() -> None:
    assert ThreadState.open(2**31 - 1) is None  # no such thread
    assert ThreadState(threading.get_native_id(), machine="sparc64")._fd == -1


async def test_several_collections_in_one_stall_are_added_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Collections back to back, each 0.4 of the stall threshold: when the watchdog's thread
    gets the GIL between two of them and finds the stall, the last one alone is under half of
    it, under the mark that makes a stall the collector's; added up they are nearly all."""

    class Allocating:
        async def on_request(self) -> None:
            for _ in range(6):
                gc.collect()

    plugin = Allocating()
    codes = plugin_hook_codes({"allocating": plugin})
    heap = [[i] for i in range(300_000)]
    started = time.perf_counter()
    gc.collect()
    one = time.perf_counter() - started
    dog = LoopLagWatchdog(Registry(), threshold=2.5 * one, hook_codes=lambda: codes, interval=0.01)
    with caplog.at_level(logging.WARNING, "extproc.watchdog"):
        await _watched_call(dog, plugin)
    del heap
    assert dog.last_stall is not None and dog.last_stall[0] == "(gc)"
    assert dog.stalls.labels("allocating").value == 0
    (record,) = [r for r in caplog.records if "garbage collector" in r.getMessage()]
    assert record.gc_ms >= record.lag_ms / 2  # type: ignore[attr-defined]
    assert record.gc_generation == 2  # type: ignore[attr-defined]
