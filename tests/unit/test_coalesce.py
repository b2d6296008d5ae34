"""Reply coalescing: nothing is held with spare CPU; under saturation a round's replies are
released together, after the scaled window; a cancelled waiter cancels only itself."""

from __future__ import annotations

import asyncio

import pytest

from extproc.coalesce import ReplyCoalescer
from extproc.observability.saturation import ArrivalRate

RATE_INTERVAL = ArrivalRate().interval


async def test_spare_cpu_or_zero_hold_writes_at_once() -> None:
    loop = asyncio.get_running_loop()
    assert ReplyCoalescer(0.003, saturation=lambda: 0.0).hold(loop) is None
    assert ReplyCoalescer(0.0, saturation=lambda: 1.0).hold(loop) is None


async def test_a_round_is_released_together_after_the_scaled_window() -> None:
    loop = asyncio.get_running_loop()
    level = 0.5
    c = ReplyCoalescer(0.04, saturation=lambda: level, min_company=0)
    assert c.window == pytest.approx(0.02)
    started = loop.time()
    first = c.hold(loop)
    assert first is not None
    level = 1.0  # a round keeps the window it opened with
    rest = [c.hold(loop) for _ in range(4)]
    assert all(f is not None for f in rest)
    await asyncio.sleep(0.005)
    assert not any(f.done() for f in (first, *rest) if f is not None)
    await first
    took = loop.time() - started
    assert 0.019 <= took < 0.2
    assert all(f is not None and f.done() for f in rest)  # the same release
    assert (c.held, c.rounds) == (5, 1)
    nxt = c.hold(loop)  # a new round
    assert nxt is not None and not nxt.done()
    await nxt
    assert c.rounds == 2


async def test_a_cancelled_waiter_does_not_cancel_its_round() -> None:
    loop = asyncio.get_running_loop()
    c = ReplyCoalescer(0.01, saturation=lambda: 1.0, min_company=0)

    async def writer() -> str:
        held = c.hold(loop)
        assert held is not None
        await held
        return "written"

    tasks = [asyncio.create_task(writer()) for _ in range(3)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == ["written", "written"]


def test_negative_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="max_hold"):
        ReplyCoalescer(-1.0, saturation=lambda: 0.0)


async def test_saturated_but_few_replies_are_written_at_once() -> None:
    """Saturated by the meter, but replies come too slowly for a window to gather four."""
    loop = asyncio.get_running_loop()
    c = ReplyCoalescer(0.003, saturation=lambda: 1.0)
    for _ in range(4):  # ~20 replies a second x 3 ms: far from 4
        assert c.hold(loop) is None
        await asyncio.sleep(RATE_INTERVAL)
    assert c.rounds == 0


async def test_saturated_with_many_replies_holds_them() -> None:
    loop = asyncio.get_running_loop()
    c = ReplyCoalescer(0.01, saturation=lambda: 1.0)
    assert c.hold(loop) is None  # not measured yet
    for _ in range(200):
        c.hold(loop)  # the held ones (if any) join rounds; every reply is counted
    await asyncio.sleep(RATE_INTERVAL * 1.2)
    held = c.hold(loop)  # ~200 in 60 ms measured now: thousands a second x 10 ms
    assert held is not None
    await held


def test_arrival_rate_is_measured_per_interval_and_restarts_after_a_quiet_spell() -> None:
    rate = ArrivalRate(1 / 16)  # times below are exact binary fractions
    assert rate.tick(96.0) == pytest.approx(1 / 96)  # one event after 96 s of nothing
    for i in range(1, 64):
        assert rate.tick(96.0 + i / 1024) == pytest.approx(1 / 96)  # not measured again yet
    # 64 events in 1/16 s (1,024 a second), averaged with the last rate
    first = rate.tick(96.0 + 1 / 16)
    assert first == pytest.approx((1 / 96 + 1_024) / 2)
    for i in range(1, 129):
        rate.tick(96.0 + 1 / 16 + i / 2048)  # 2,048 a second for the next 1/16 s
    assert rate.rate == pytest.approx((first + 2_048) / 2)
    assert rate.tick(200.0) == pytest.approx(1 / (200.0 - 96.125))  # after quiet: the new alone
    with pytest.raises(ValueError, match="interval"):
        ArrivalRate(0)
