"""Reply coalescing: nothing is held with spare CPU; under saturation a round's replies are
released together, after the scaled window; a cancelled waiter cancels only itself."""

from __future__ import annotations

import asyncio

import pytest

from extproc.coalesce import ReplyCoalescer


async def test_spare_cpu_or_zero_hold_writes_at_once() -> None:
    loop = asyncio.get_running_loop()
    assert ReplyCoalescer(0.003, saturation=lambda: 0.0).hold(loop) is None
    assert ReplyCoalescer(0.0, saturation=lambda: 1.0).hold(loop) is None


async def test_a_round_is_released_together_after_the_scaled_window() -> None:
    loop = asyncio.get_running_loop()
    level = 0.5
    c = ReplyCoalescer(0.04, saturation=lambda: level)
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
    c = ReplyCoalescer(0.01, saturation=lambda: 1.0)

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
