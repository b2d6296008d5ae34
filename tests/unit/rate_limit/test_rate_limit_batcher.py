"""The adaptive batcher against a fake store whose round trips the test releases by hand."""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Callable, Sequence

import pytest

from plugins.rate_limit.batcher import RATE_INTERVAL, Batcher, BatcherClosedError, QueueFullError

FAR = 1e12  # a deadline that never matters


def idle() -> float:
    """A worker with spare CPU (the real meter would read this test's own CPU use)."""
    return 0.0


def saturated() -> float:
    return 1.0


class GatedStore:
    """Records each batch; a round trip finishes only when the test opens its gate."""

    def __init__(self, *, auto: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()
        self.second = asyncio.Event()  # set when a second round trip starts
        self.auto = auto
        self.fail: Exception | None = None

    async def send(self, items: Sequence[int], deadline: float) -> list[int]:
        self.batches.append(list(items))
        gate = asyncio.Event()
        if self.auto:
            gate.set()
        self.gates.append(gate)
        self.started.set()
        if len(self.batches) >= 2:
            self.second.set()
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]

    def release(self, index: int) -> None:
        self.gates[index].set()


def arriving_at(b: Batcher[int, int], rate: float) -> None:
    """Make the batcher's arrival meter read ``rate`` requests/s for the rest of the test
    (its next measurement is an hour away, however slow the machine)."""
    b._arrivals.rate = rate
    b._arrivals._since = asyncio.get_running_loop().time() + 3600.0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def answered_without_a_window(b: Batcher[int, int], item: int) -> int:
    """Submit ``item`` and show it was sent at once: no window opened, and its answer came
    within a few loop turns, which a timer-held batch cannot (it waits for its window on
    the clock). Counted in turns rather than timed, so a slow machine cannot fail it."""
    future = b.submit(item, FAR)
    assert b.window == 0.0
    await settle()
    assert future.done()
    return future.result()


async def test_idle_sends_at_once_alone() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=1
    )
    assert await b.submit(1, FAR) == 10
    assert store.batches == [[1]]  # no waiting for company when idle


async def test_idle_batches_what_arrives_in_the_same_loop_tick() -> None:
    """Requests handled in one pass of the event loop (several streams read from one poll)
    share the round trip that would only start on the next tick anyway."""
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=1
    )
    futures = [b.submit(i, FAR) for i in range(4)]  # no await in between: one tick
    assert await asyncio.gather(*futures) == [0, 10, 20, 30]
    assert store.batches == [[0, 1, 2, 3]]


async def test_idle_round_trip_is_sent_on_the_next_tick() -> None:
    """An idle batcher's round trip starts on the very next loop turn (its own task takes the
    batch), not one turn later through a callback that then starts a task."""
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=1
    )
    futures = [b.submit(i, FAR) for i in range(2)]
    await asyncio.sleep(0)
    assert store.batches == [[0, 1]]
    futures.append(b.submit(2, FAR))  # in flight now: it waits for the first to return
    assert await asyncio.gather(*futures) == [0, 10, 20]
    assert store.batches == [[0, 1], [2]]


async def test_a_flush_before_the_idle_round_trip_runs_sends_each_item_once() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=2
    )
    futures = [b.submit(i, FAR) for i in range(3)]
    assert await b.flush(1.0)  # before the idle round trip's task has run
    assert await asyncio.gather(*futures) == [0, 10, 20]
    assert store.batches == [[0, 1, 2]]
    await settle()
    assert store.batches == [[0, 1, 2]] and b.in_flight == 0 and b.queued == 0


async def test_closing_before_the_idle_round_trip_runs_fails_its_items() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=1
    )
    future = b.submit(1, FAR)
    close = asyncio.ensure_future(b.close(0.05))  # the flush sends it; nobody answers
    await asyncio.sleep(0)
    assert not await close
    with pytest.raises(BatcherClosedError):
        await future


async def test_gathers_while_in_flight_and_sends_on_return() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=1
    )
    first = b.submit(0, FAR)
    await settle()
    rest = [b.submit(i, FAR) for i in range(1, 6)]
    await settle()
    assert store.batches == [[0]]  # the others wait for the round trip in flight
    store.release(0)
    assert await first == 0
    await settle()
    assert store.batches == [[0], [1, 2, 3, 4, 5]]  # one round trip for all of them
    store.release(1)
    assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50]


async def test_each_request_s_wait_before_its_round_trip_is_reported() -> None:
    store = GatedStore()
    waits: list[float] = []
    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=idle,
        max_batch=100,
        max_wait=10.0,
        max_in_flight=1,
        on_wait=waits.append,
    )
    first = b.submit(0, FAR)
    await settle()
    assert len(waits) == 1 and 0 <= waits[0] < 0.04  # sent on the next loop tick
    rest = [b.submit(i, FAR) for i in (1, 2)]
    await asyncio.sleep(0.05)
    assert len(waits) == 1  # held behind the round trip in flight: not sent, not reported
    store.release(0)
    assert await first == 0
    await settle()
    assert len(waits) == 3 and all(w >= 0.04 for w in waits[1:]), waits
    store.release(1)
    assert await asyncio.gather(*rest) == [10, 20]


def test_the_reported_wait_is_not_rounded_to_uvloop_s_millisecond_clock() -> None:
    """uvloop's loop time moves in whole milliseconds, once per loop turn: a wait of one turn
    read from it is 0 or 1 ms (at 1,000 req/s about 1 % read 1 ms, the whole p99). The
    reported wait is measured with a fine clock instead."""
    import uvloop  # a dependency of the project on Linux

    waits: list[float] = []

    async def main() -> None:
        store = GatedStore(auto=True)
        b: Batcher[int, int] = Batcher(store.send, saturation=idle, on_wait=waits.append)
        for i in range(20):
            assert await b.submit(i, FAR) == i * 10

    uvloop.run(main())
    assert len(waits) == 20
    # one loop turn each: never exactly 0 (no turn takes no time), typically well under 1 ms
    assert all(w > 0 for w in waits), waits
    assert statistics.median(waits) < 0.0009, waits


async def test_full_batch_goes_while_another_is_in_flight() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=3, max_wait=10.0, max_in_flight=2
    )
    futures = [b.submit(0, FAR)]
    await settle()
    futures += [b.submit(i, FAR) for i in range(1, 8)]
    await settle()
    # the first alone; then a full batch of 3 as the second round trip; the rest wait
    assert store.batches == [[0], [1, 2, 3]]
    assert b.queued == 4
    store.release(0)
    await settle()
    assert store.batches[2] == [4, 5, 6]  # a slot freed: the next full batch
    for i in range(1, 4):
        store.release(i)
        await settle()
    assert await asyncio.gather(*futures) == [i * 10 for i in range(8)]
    assert store.batches[3] == [7]


@pytest.mark.parametrize("with_start", [False, True])
async def test_a_moderate_rate_takes_the_free_slot_instead_of_waiting_behind(
    with_start: bool,
) -> None:
    """Below min_gather requests per in_flight_wait, a request behind a round trip in flight
    goes on the next tick, with the requests of its tick, in the second slot; with both
    slots out the rest wait for one."""
    store: GatedStore | CallbackStore = CallbackStore() if with_start else GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send,
        start=store.start if isinstance(store, CallbackStore) else None,
        saturation=idle,
        in_flight_wait=1.0,
        max_wait=10.0,
        max_in_flight=2,
    )
    arriving_at(b, 3.99)  # 3.99 within in_flight_wait (1 s): under min_gather (4)
    first = b.submit(1, FAR)
    await settle()
    second = [b.submit(2, FAR), b.submit(3, FAR)]
    await settle()
    assert store.batches == [[1], [2, 3]]  # not held for the 1 s in_flight_wait
    third = b.submit(4, FAR)
    await settle()
    assert store.batches == [[1], [2, 3]]  # both slots out: waits for one
    done = store.settle if isinstance(store, CallbackStore) else store.release
    done(0)
    await settle()
    assert store.batches == [[1], [2, 3], [4]]
    done(1)
    done(2)
    assert await asyncio.gather(first, *second, third) == [10, 20, 30, 40]


async def test_a_high_rate_waits_behind_the_round_trip_in_flight() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, in_flight_wait=1.0, max_wait=10.0, max_in_flight=2
    )
    arriving_at(b, 4.0)  # 4 within in_flight_wait: company worth waiting for
    first = b.submit(1, FAR)
    await settle()
    second = b.submit(2, FAR)
    await settle()
    assert store.batches == [[1]]
    store.release(0)
    await settle()
    assert store.batches == [[1], [2]]
    store.release(1)
    assert await asyncio.gather(first, second) == [10, 20]


async def test_max_wait_sends_a_partial_batch_when_a_slot_is_free() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=idle,
        max_batch=100,
        max_wait=0.005,
        max_in_flight=2,
        min_gather=0,  # always waits behind a round trip in flight
    )
    b.submit(0, FAR)
    await settle()
    second = b.submit(1, FAR)
    await settle()
    assert store.batches == [[0]]  # gathering
    async with asyncio.timeout(5):
        await store.second.wait()  # the max_wait timer fires (no release needed)
    assert store.batches == [[0], [1]]
    store.release(1)
    assert await second == 10
    store.release(0)
    await b.close(within=1.0)


async def test_spare_cpu_waits_at_most_in_flight_wait_not_max_wait() -> None:
    """max_wait is the saturated worker's window; with spare CPU a request gives the round
    trip in flight 1 ms to come back, then takes the free slot."""
    store = GatedStore()
    b: Batcher[int, int] = Batcher(store.send, saturation=idle, max_wait=10.0, max_in_flight=2)
    arriving_at(b, 10_000.0)
    b.submit(0, FAR)
    await settle()
    loop = asyncio.get_running_loop()
    started = loop.time()
    second = b.submit(1, FAR)
    async with asyncio.timeout(5):
        await store.second.wait()
    assert loop.time() - started < 1.0  # about 1 ms, certainly not max_wait (10 s)
    store.release(1)
    assert await second == 10
    store.release(0)
    await b.close(within=1.0)


async def test_bounded_queue_refuses_and_counts() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=10, max_wait=10.0, max_in_flight=1, max_queue=3
    )
    b.submit(0, FAR)
    await settle()
    for i in range(3):
        b.submit(i + 1, FAR)
    with pytest.raises(QueueFullError):
        b.submit(99, FAR)
    assert b.dropped == 1
    store.release(0)
    await settle()
    store.release(1)
    assert await b.flush(within=1.0)


async def test_cancelled_waiters_are_not_sent() -> None:
    store = GatedStore()
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=10, max_wait=10.0, max_in_flight=1
    )
    b.submit(0, FAR)
    await settle()
    gone = b.submit(1, FAR)
    kept = b.submit(2, FAR)
    gone.cancel()  # its caller hit its deadline
    store.release(0)
    await settle()
    assert store.batches[1] == [2]
    store.release(1)
    assert await kept == 20


async def test_items_that_leave_unsent_are_reported_once() -> None:
    """``on_drop`` gets each item that is never sent: cancelled before its round trip (taken
    from the queue, or purged when it is full), or failed by ``close``."""
    store = GatedStore()
    dropped: list[int] = []
    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=idle,
        max_batch=10,
        max_wait=10.0,
        max_in_flight=1,
        max_queue=3,
        on_drop=dropped.append,
    )
    b.submit(0, FAR)
    await settle()  # 0 is out; the rest queue behind it
    gone = b.submit(1, FAR)
    b.submit(2, FAR)
    purged = b.submit(3, FAR)
    purged.cancel()
    b.submit(4, FAR)  # the queue is full: its cancelled item is purged to make room
    assert dropped == [3]
    gone.cancel()
    store.release(0)
    await settle()  # the next batch is taken without the cancelled item
    assert store.batches[1] == [2, 4]
    assert dropped == [3, 1]
    left = b.submit(5, FAR)
    assert not await b.close(within=0.02)  # the round trip of [2, 4] never returns
    assert dropped == [3, 1, 5]  # what was sent (0, 2, 4) is never reported
    with pytest.raises(BatcherClosedError):
        await left


async def test_store_error_reaches_every_waiter_of_the_batch() -> None:
    store = GatedStore(auto=True)
    store.fail = RuntimeError("down")
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=10, max_wait=10.0, max_in_flight=1
    )
    with pytest.raises(RuntimeError):
        await b.submit(1, FAR)


async def test_flush_sends_gathered_items_and_waits() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=100, max_wait=10.0, max_in_flight=1
    )
    futures = [b.submit(i, FAR) for i in range(5)]
    assert await b.flush(within=1.0)
    assert all(f.done() for f in futures)
    assert b.in_flight == 0 and b.queued == 0


async def test_close_is_bounded_and_fails_what_is_left() -> None:
    store = GatedStore()  # never released: the round trip hangs
    b: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_batch=1, max_wait=10.0, max_in_flight=1
    )
    hung = b.submit(1, FAR)
    queued = b.submit(2, FAR)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await b.close(within=0.05)
    assert loop.time() - started < 2.0
    for future in (hung, queued):
        with pytest.raises(BatcherClosedError):
            await future
    with pytest.raises(BatcherClosedError):
        b.submit(3, FAR)


def test_bounds_are_checked() -> None:
    async def send(items: Sequence[int], deadline: float) -> list[int]:
        return list(items)

    with pytest.raises(ValueError, match="positive"):
        Batcher(send, max_batch=0)


async def test_saturated_worker_gathers_for_the_window_with_nothing_in_flight() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=saturated,
        max_batch=100,
        max_wait=0.02,
        max_in_flight=2,
        min_gather=0,
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    futures = [b.submit(0, FAR)]
    await settle()
    assert store.batches == []  # nothing in flight, yet it waits for company
    assert b.window == pytest.approx(0.02)
    futures += [b.submit(i, FAR) for i in range(1, 4)]
    assert await asyncio.gather(*futures) == [0, 10, 20, 30]
    assert store.batches == [[0, 1, 2, 3]]  # one round trip for all four
    assert loop.time() - started >= 0.015  # uvloop's clock has millisecond steps


async def test_saturated_worker_without_a_queue_sends_at_once() -> None:
    """The meter reads saturated, but the worker keeps up (few requests in progress) on a
    machine with cores to spare: a window would only delay them. With a backlog it gathers
    as before; without one it gathers too while the machine's CPU is under pressure (several
    workers on a full machine, each keeping up with what reaches it, while others wait)."""
    store = GatedStore(auto=True)
    machine = {"backlog": 7, "pressure": 0.49}
    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=saturated,
        max_wait=0.02,
        min_gather=0,
        backlog=lambda: int(machine["backlog"]),
        min_backlog=8,
        pressure=lambda: machine["pressure"],
        min_pressure=0.5,
    )
    assert await answered_without_a_window(b, 1) == 10
    assert b.saturation == 1.0
    loop = asyncio.get_running_loop()
    for queue in ({"backlog": 8, "pressure": 0.0}, {"backlog": 0, "pressure": 0.5}):
        machine.update(queue)
        started = loop.time()
        assert await b.submit(2, FAR) == 20
        assert b.window == pytest.approx(0.02)
        assert loop.time() - started >= 0.015
    assert store.batches == [[1], [2], [2]]


async def test_worker_keeping_up_on_a_full_machine_gathers_for_the_pressure() -> None:
    """The loop does not read saturated (several workers share the cores, each keeps up with
    what reaches it), but the CPU is under pressure: a window in proportion to the pressure,
    still only at a rate that fills it. Below ``min_pressure`` it sends at once."""
    store = GatedStore(auto=True)
    machine = {"pressure": 0.49}
    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=idle,
        max_wait=0.04,
        min_gather=0,
        pressure=lambda: machine["pressure"],
        min_pressure=0.5,
    )
    assert await answered_without_a_window(b, 1) == 10
    assert b.saturation == 0.0
    machine["pressure"] = 0.5
    loop = asyncio.get_running_loop()
    started = loop.time()
    futures = [b.submit(2, FAR)]
    assert b.window == pytest.approx(0.02)  # 0.5 x max_wait
    assert b.saturation == 0.0  # the loop's own reading, for /status
    futures.append(b.submit(3, FAR))
    assert await asyncio.gather(*futures) == [20, 30]
    assert loop.time() - started >= 0.015
    assert store.batches == [[1], [2, 3]]
    # the arrival rate still decides: too few requests for company, no window
    slow: Batcher[int, int] = Batcher(
        store.send, saturation=idle, max_wait=0.04, pressure=lambda: 1.0, min_pressure=0.5
    )
    for i in range(3):  # ~20 a second x 40 ms = 0.8 < 4
        assert await answered_without_a_window(slow, i) == i * 10
        await asyncio.sleep(RATE_INTERVAL)
    assert slow.window == 0.0


@pytest.mark.parametrize(
    ("meter", "backlog"),
    [
        (idle, None),  # spare CPU
        (saturated, lambda: 0),  # a slow machine, no queue (min_backlog 8)
    ],
    ids=["spare-cpu", "saturated-without-a-queue"],
)
async def test_a_light_load_never_reads_the_pressure(
    meter: Callable[[], float], backlog: Callable[[], int] | None
) -> None:
    """The pressure (a PSI file read, at most every 50 ms) is asked only at an arrival rate
    that could fill a window: a worker with spare CPU, or one whose meter reads saturated
    but that has no queue, sends at once at a light load without reading it; at a rate that
    fills the window it is read and opens one."""
    store = GatedStore(auto=True)
    reads: list[float] = []

    def pressure() -> float:
        reads.append(1.0)
        return 1.0

    b: Batcher[int, int] = Batcher(
        store.send,
        saturation=meter,
        max_wait=0.04,
        pressure=pressure,
        min_pressure=0.5,
        backlog=backlog,
        min_backlog=8,
    )
    arriving_at(b, 50.0)  # 50 a second x 40 ms = 2 < min_gather (4)
    for i in range(3):
        assert await answered_without_a_window(b, i) == i * 10
    assert reads == []
    assert b.saturation == meter()  # the meter's own reading, for /status
    arriving_at(b, 1000.0)  # 1,000 a second x 40 ms = 40: a window would fill
    future = b.submit(9, FAR)
    assert reads == [1.0]
    assert b.window == pytest.approx(0.04)  # pressure 1.0 x max_wait
    assert await future == 90


async def test_saturated_worker_sends_a_full_batch_at_once() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=saturated, max_batch=3, max_wait=10.0, max_in_flight=1
    )
    futures = [b.submit(i, FAR) for i in range(3)]
    async with asyncio.timeout(5):  # not 10 s: the full batch goes without waiting
        assert await asyncio.gather(*futures) == [0, 10, 20]
    assert store.batches == [[0, 1, 2]]


async def test_half_saturated_worker_waits_half_of_max_wait() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(store.send, saturation=lambda: 0.5, max_wait=0.04, min_gather=0)
    future = b.submit(1, FAR)
    assert b.window == pytest.approx(0.02)
    assert b.saturation == pytest.approx(0.5)  # what sized it, for /status
    assert await future == 10


async def test_gathering_never_takes_more_than_a_quarter_of_the_budget() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(store.send, saturation=saturated, max_wait=10.0, min_gather=0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        assert await b.submit(1, started + 0.04) == 10  # budget 40 ms: waits about 10 ms
    assert loop.time() - started < 1.0


async def test_saturated_worker_at_a_low_rate_sends_at_once() -> None:
    """Saturated by the meter, but requests come too slowly for a window to collect company:
    waiting would save no round trip, so each goes as with spare CPU."""
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=saturated, max_batch=100, max_wait=0.02, max_in_flight=2
    )
    for i in range(4):  # ~1 request per RATE_INTERVAL: ~20 a second, x 20 ms = 0.4 < 4
        assert await answered_without_a_window(b, i) == i * 10
        await asyncio.sleep(RATE_INTERVAL)
    assert 0 < b.arrival_rate < 100
    assert b.window == 0.0 and b.saturation == 1.0  # saturated, and no window all the same
    assert store.batches == [[0], [1], [2], [3]]


async def test_saturated_worker_at_a_high_rate_gathers() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(
        store.send, saturation=saturated, max_batch=1000, max_wait=0.02, max_in_flight=2
    )
    burst = [b.submit(i, FAR) for i in range(200)]  # unmeasured yet: goes at once
    await asyncio.gather(*burst)
    await asyncio.sleep(RATE_INTERVAL * 1.2)
    # 200 in ~60 ms measured now: thousands a second, x 20 ms is far above 4
    first = b.submit(1000, FAR)
    assert b.arrival_rate > 1000
    assert b.window == pytest.approx(0.02)
    await settle()
    assert len(store.batches) == 1  # the new request waits for company
    rest = [b.submit(i, FAR) for i in range(1001, 1004)]
    assert await asyncio.gather(first, *rest) == [10000, 10010, 10020, 10030]
    assert store.batches[1] == [1000, 1001, 1002, 1003]


async def test_arrival_rate_after_a_quiet_spell_is_the_new_one() -> None:
    store = GatedStore(auto=True)
    b: Batcher[int, int] = Batcher(store.send, saturation=idle, max_wait=0.02)
    await asyncio.gather(*(b.submit(i, FAR) for i in range(100)))
    await asyncio.sleep(RATE_INTERVAL * 1.2)
    await b.submit(0, FAR)
    busy = b.arrival_rate
    assert busy > 500
    await asyncio.sleep(RATE_INTERVAL * 5)  # quiet: more than 4 intervals
    await b.submit(0, FAR)
    assert b.arrival_rate < busy / 10  # not averaged with the busy spell's rate


class CallbackStore:
    """A callback-shaped store (``start``): records each batch and its ``done``; the test
    settles them by hand, as the read that brings a reply would."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.dones: list[Callable[[Sequence[int] | BaseException], None]] = []
        self.refuse = refuse
        self.sent: list[list[int]] = []  # through the awaited path

    def start(
        self,
        items: Sequence[int],
        deadline: float,
        done: Callable[[Sequence[int] | BaseException], None],
    ) -> bool:
        if self.refuse:
            return False
        self.batches.append(list(items))
        self.dones.append(done)
        return True

    def settle(self, index: int) -> None:
        self.dones[index]([i * 10 for i in self.batches[index]])

    async def send(self, items: Sequence[int], deadline: float) -> list[int]:
        self.sent.append(list(items))
        return [i * 10 for i in items]


async def test_start_idle_sends_the_ticks_requests_and_settles_in_the_replys_turn() -> None:
    store = CallbackStore()
    b: Batcher[int, int] = Batcher(store.send, start=store.start, saturation=idle)
    futures = [b.submit(1, FAR), b.submit(2, FAR)]
    assert store.batches == []
    await asyncio.sleep(0)
    assert store.batches == [[1, 2]]  # on the next tick, with this tick's company
    assert b.in_flight == 1
    asyncio.get_running_loop().call_soon(store.settle, 0)  # the reply's read
    await asyncio.sleep(0)  # that read's turn ...
    assert [f.result() for f in futures] == [10, 20]  # ... settled the callers in it
    assert b.in_flight == 0 and store.sent == []


async def test_start_requests_gather_behind_the_round_trip_out() -> None:
    store = CallbackStore()
    b: Batcher[int, int] = Batcher(
        store.send, start=store.start, saturation=idle, in_flight_wait=10.0, max_wait=10.0
    )
    arriving_at(b, 1.0)  # 1 a second, but 4 within the 10 s in_flight_wait: gather
    first = b.submit(1, FAR)
    await asyncio.sleep(0)
    rest = [b.submit(i, FAR) for i in (2, 3, 4)]
    await settle()
    assert store.batches == [[1]]  # the others wait for it to return
    store.settle(0)
    assert store.batches == [[1], [2, 3, 4]]  # and go together when it does
    store.settle(1)
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]


async def test_start_refused_falls_back_to_send() -> None:
    store = CallbackStore(refuse=True)
    b: Batcher[int, int] = Batcher(store.send, start=store.start, saturation=idle)
    assert await b.submit(3, FAR) == 30
    assert store.sent == [[3]]
    assert b.in_flight == 0


async def test_start_errors_and_odd_results_reach_the_callers_and_free_the_slot() -> None:
    store = CallbackStore()
    b: Batcher[int, int] = Batcher(store.send, start=store.start, saturation=idle)
    failed = b.submit(1, FAR)
    await asyncio.sleep(0)
    store.dones[0](ConnectionError("gone"))
    with pytest.raises(ConnectionError):
        await failed
    odd = b.submit(2, FAR)
    await asyncio.sleep(0)
    store.dones[1]([1, 2])  # two results for one request
    with pytest.raises(ValueError, match="2 results for 1 requests"):
        await odd
    store.dones[1]([20])  # a second settle of the same round trip changes nothing
    assert b.in_flight == 0

    def broken(items: Sequence[int], deadline: float, done: object) -> bool:
        raise RuntimeError("store bug")

    b2: Batcher[int, int] = Batcher(store.send, start=broken, saturation=idle)
    with pytest.raises(RuntimeError, match="store bug"):
        await b2.submit(1, FAR)
    assert b2.in_flight == 0


async def test_close_fails_a_started_round_trip_and_ignores_its_late_reply() -> None:
    store = CallbackStore()
    b: Batcher[int, int] = Batcher(store.send, start=store.start, saturation=idle)
    future = b.submit(1, FAR)
    await asyncio.sleep(0)
    assert store.batches == [[1]]
    assert not await b.close(0.02)  # its reply never came within the bound
    with pytest.raises(BatcherClosedError):
        await future
    assert b.in_flight == 0
    store.settle(0)  # the late reply
    assert b.in_flight == 0


async def test_close_before_the_idle_callback_runs_sends_its_items_once() -> None:
    store = CallbackStore()
    b: Batcher[int, int] = Batcher(store.send, start=store.start, saturation=idle)
    future = b.submit(1, FAR)
    assert not await b.close(0.02)
    assert store.batches == [[1]]  # close's flush sent it, once (not again from the callback)
    with pytest.raises(BatcherClosedError):  # its reply did not come within the bound
        await future
    await settle()
    assert store.batches == [[1]] and b.in_flight == 0


async def test_start_settling_at_once_does_not_recurse_through_a_long_queue() -> None:
    """A store that answers within start (its breaker opened) while thousands of requests
    wait, one per round trip: each settles and the next goes, in a loop, not a recursion."""
    held: list[Callable[[Sequence[int] | BaseException], None]] = []
    depths: list[int] = []

    def breaker_opens_after_the_first(
        items: Sequence[int],
        deadline: float,
        done: Callable[[Sequence[int] | BaseException], None],
    ) -> bool:
        frame, depth = sys._getframe(), 0
        while frame is not None:
            frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
        depths.append(depth)
        if not held:
            held.append(done)  # out: the others queue behind it
        else:
            done(ConnectionError("breaker open"))
        return True

    store = CallbackStore()
    b: Batcher[int, int] = Batcher(
        store.send,
        start=breaker_opens_after_the_first,
        saturation=idle,
        max_batch=1,
        max_in_flight=1,
        max_queue=10_000,
    )
    first = b.submit(0, FAR)
    await asyncio.sleep(0)
    assert len(held) == 1
    rest = [b.submit(i, FAR) for i in range(1, 5_000)]
    assert b.queued == 4_999
    held[0]([0])  # its reply: the queue drains
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert b.in_flight == 0 and b.batches == 5_000
    assert max(depths) - min(depths) < 20  # the stack did not grow with the queue
