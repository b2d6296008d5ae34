"""The saturation meter: the smoothed share of wall time the loop's thread ran or waited to
run, mapped between ``low`` and ``high``; and the schedstat clock under it."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from extproc.observability.saturation import LoopSaturation, loop_saturation, thread_demand


class FakeClocks:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def run(self, wall: float, share: float) -> None:
        self.wall += wall
        self.cpu += wall * share


def test_loop_saturation_maps_the_smoothed_cpu_share_between_low_and_high() -> None:
    c = FakeClocks()
    meter = LoopSaturation(
        interval=0.05, low=0.6, high=0.9, cpu_clock=lambda: c.cpu, wall_clock=lambda: c.wall
    )
    assert meter() == 0.0
    c.run(0.3, 0.3)  # a first sample after a quiet spell is taken as it is
    assert (meter(), meter.busy) == (0.0, pytest.approx(0.3))
    c.run(0.1, 0.9)
    assert (meter(), meter.busy) == (0.0, pytest.approx(0.6))  # smoothed: (0.3 + 0.9) / 2
    c.run(0.1, 0.9)
    assert meter() == pytest.approx(0.5)  # busy 0.75: half way from low to high
    c.run(0.1, 1.0)
    assert meter() == pytest.approx((0.875 - 0.6) / 0.3)
    c.run(0.1, 1.0)
    assert meter() == 1.0  # busy 0.9375: above high
    c.run(0.01, 0.0)
    assert meter() == 1.0  # within the interval: no new sample, no clock read
    c.run(1.0, 0.0)
    assert (meter(), meter.busy) == (0.0, 0.0)  # idle for a second: spare CPU at once


def test_loop_saturation_checks_its_bounds() -> None:
    with pytest.raises(ValueError, match="low < high"):
        LoopSaturation(low=0.9, high=0.5)
    with pytest.raises(ValueError, match="interval"):
        LoopSaturation(interval=0.0)


@pytest.mark.skipif(sys.platform != "linux", reason="schedstat is Linux's; elsewhere CPU time")
def test_thread_demand_counts_the_time_this_thread_runs() -> None:
    before, cpu = thread_demand(), time.thread_time()
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:
        pass
    ran = time.thread_time() - cpu
    # run time (the kernel updates it at scheduler ticks: up to one tick stale), plus any wait
    assert thread_demand() - before >= ran * 0.8


def test_one_shared_meter_per_thread() -> None:
    mine = loop_saturation()
    assert loop_saturation() is mine
    other: list[LoopSaturation] = []
    thread = threading.Thread(target=lambda: other.append(loop_saturation()))
    thread.start()
    thread.join()
    assert other and other[0] is not mine  # a thread's clock is its own
