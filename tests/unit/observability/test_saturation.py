"""The saturation meter: the smoothed share of wall time the loop's thread ran or waited to
run, mapped between ``low`` and ``high``; and the schedstat clock under it."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from extproc.observability.saturation import (
    CpuPressure,
    LoopSaturation,
    cpu_pressure,
    loop_saturation,
    pressure_path,
    thread_demand,
)


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


@pytest.mark.parametrize("shared", [loop_saturation, cpu_pressure])
def test_one_shared_meter_per_thread(shared: Callable[[], object]) -> None:
    mine = shared()
    assert shared() is mine
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(shared()))
    thread.start()
    thread.join()
    assert other and other[0] is not mine  # each worker loop's thread has its own


def _psi(path: Path, some_us: int) -> None:
    path.write_text(
        f"some avg10=1.00 avg60=2.00 avg300=3.00 total={some_us}\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def test_cpu_pressure_is_the_smoothed_share_of_time_some_task_waited(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    _psi(psi, 5_000_000)
    wall = [0.0]
    meter = CpuPressure(interval=0.05, path=str(psi), wall_clock=lambda: wall[0])
    assert meter.available and meter() == 0.0
    wall[0] += 0.3
    _psi(psi, 5_000_000 + 240_000)  # 0.24 s of 0.3: a first sample after a quiet spell
    assert meter() == pytest.approx(0.8)
    wall[0] += 0.1
    _psi(psi, 5_240_000 + 40_000)
    assert meter() == pytest.approx((0.8 + 0.4) / 2)  # smoothed with the last value
    wall[0] += 0.01
    _psi(psi, 9_999_999_999)
    assert meter() == pytest.approx(0.6)  # within the interval: the file is not read
    wall[0] += 1.0
    _psi(psi, 5_280_000)
    assert meter() == 0.0  # no task waited for a second: 0 at once, not averaged


def test_cpu_pressure_reads_zero_without_psi(tmp_path: Path) -> None:
    missing = CpuPressure(path=str(tmp_path / "absent"), wall_clock=lambda: 1e9)
    assert not missing.available and missing() == 0.0
    garbage = tmp_path / "garbage"
    garbage.write_text("full avg10=0.00 total=12\n")  # no "some" line first: not PSI
    wall = [0.0]
    meter = CpuPressure(path=str(garbage), wall_clock=lambda: wall[0])
    wall[0] += 1.0
    assert not meter.available and meter() == 0.0
    with pytest.raises(ValueError, match="interval"):
        CpuPressure(interval=0.0)


def _proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> tuple[str, str]:
    """A ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` of our own, in ``tmp_path``."""
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text("".join(m + "\n" for m in mounts))
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


def _mount(root: str, point: Path | str, fstype: str = "cgroup2") -> str:
    return f"41 31 0:38 {root} {point} rw,nosuid shared:9 - {fstype} {fstype} rw"


def test_pressure_path_prefers_the_cgroups_own_cpu_pressure(tmp_path: Path) -> None:
    machine = tmp_path / "machine"
    _psi(machine, 1)
    # a container with its own cgroup namespace: "0::/", the mount's root is its cgroup
    fs = tmp_path / "fs"
    fs.mkdir()
    _psi(fs / "cpu.pressure", 7)
    mounts = [_mount("/", tmp_path / "proc", "proc"), _mount("/", fs)]
    files = _proc(tmp_path, "0::/\n", mounts)
    assert pressure_path(*files, machine=str(machine)) == f"{fs}/cpu.pressure"
    meter = CpuPressure(path=pressure_path(*files, machine=str(machine)))
    assert meter.available and meter.path == f"{fs}/cpu.pressure"
    # the host's namespace, a hybrid mount: the cgroup's path below the mount point
    nested = tmp_path / "unified" / "kubepods.slice" / "pod 1"
    nested.mkdir(parents=True)
    _psi(nested / "cpu.pressure", 9)
    mounts = [
        "25 1 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu",  # v1: not read
        "26 1 0:23 / /x rw shared:1 -",  # cut short: skipped, not a crash
        "",
        _mount("/", str(tmp_path / "unified").replace(" ", "\\040")),
    ]
    files = _proc(tmp_path, "4:memory:/x\n0::/kubepods.slice/pod 1\n", mounts)
    assert pressure_path(*files, machine=str(machine)) == f"{nested}/cpu.pressure"


@pytest.mark.parametrize(
    ("cgroup", "why"),
    [
        ("0::/\n", "the root cgroup has no cpu.pressure"),
        ("1:cpu:/\n", "cgroup v1 only: no 0:: line"),
        ("0::/elsewhere\n", "no cgroup2 mount holds the path"),
        ("0::/bad\n", "the cgroup's file is not PSI (pressure turned off)"),
    ],
)
def test_pressure_path_falls_back_to_the_machines(tmp_path: Path, cgroup: str, why: str) -> None:
    machine = tmp_path / "machine"
    _psi(machine, 1)
    fs = tmp_path / "fs"
    (fs / "bad").mkdir(parents=True)
    (fs / "bad" / "cpu.pressure").write_text("")  # what a read that fails leaves
    mounts = [_mount("/", fs) if "elsewhere" not in cgroup else _mount("/other", fs)]
    files = _proc(tmp_path, cgroup, mounts)
    assert pressure_path(*files, machine=str(machine)) == str(machine), why
    assert pressure_path(str(tmp_path / "absent"), files[1], machine="m") == "m"
