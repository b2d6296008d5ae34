"""How saturated the event loop's thread is: the signal behind every "wait for company only
when waiting is cheap" decision (the rate limiter's batching, the server's reply coalescing).

A worker that shares too few cores is saturated although its own CPU time is not 100 %: it
waits in the run queue instead. So the signal is the thread's *demand* - time on a CPU plus
time waiting for one (Linux schedstat) - as a share of wall time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

__all__ = [
    "ArrivalRate",
    "CpuPressure",
    "InFlight",
    "LoopSaturation",
    "cpu_pressure",
    "loop_saturation",
    "pressure_path",
    "streams_in_flight",
    "thread_demand",
]


_SCHEDSTAT: Final = "/proc/thread-self/schedstat"
#: the machine's CPU pressure (Linux PSI, 4.20+ with CONFIG_PSI)
_PRESSURE: Final = "/proc/pressure/cpu"
#: a cgroup's own CPU pressure, in its cgroup v2 directory (Linux 5.2+)
_CGROUP_PRESSURE: Final = "cpu.pressure"


def _smoothed(previous: float, sample: float, elapsed: float, interval: float) -> float:
    """A new sample averaged with the last value - or taken as it is after a quiet spell (more
    than four intervals since the last one), when the old value says nothing."""
    return sample if elapsed > 4 * interval else (previous + sample) / 2


def thread_demand() -> float:
    """Seconds the calling thread has been on a CPU *or waiting for one* (Linux schedstat:
    run time + run-queue wait). A worker that shares too few cores with Envoy and others is
    saturated although its own CPU time is not 100 %: it waits in the run queue instead."""
    with open(_SCHEDSTAT, "rb") as f:
        run_ns, wait_ns, _ = f.read().split()
    return (int(run_ns) + int(wait_ns)) / 1e9


def _demand_clock() -> Callable[[], float]:
    try:
        thread_demand()
    except (OSError, ValueError):  # not Linux, or no schedstat: CPU time only
        return time.thread_time
    return thread_demand


class LoopSaturation:
    """How saturated the calling thread (the event loop's) is, in [0, 1].

    The share of wall time the thread ran or waited to run (:func:`thread_demand`; its CPU
    time where that is unavailable), sampled at most every ``interval`` seconds when asked (so
    an idle worker costs nothing) and smoothed; below ``low`` it is 0, above ``high`` 1, linear
    between. The loop's *lag* is no signal here: grpc.aio hands the loop about one message per
    wake-up, so a saturated loop still answers a probe within a millisecond. Clocks are
    injectable for tests.
    """

    def __init__(
        self,
        *,
        interval: float = 0.05,
        low: float = 0.75,
        high: float = 0.95,
        cpu_clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 <= low < high <= 1 or interval <= 0:
            raise ValueError("need 0 <= low < high <= 1 and interval > 0")
        self.interval = interval
        self.low = low
        self.high = high
        self._cpu_clock = cpu_clock if cpu_clock is not None else _demand_clock()
        self._wall_clock = wall_clock
        self._cpu = self._cpu_clock()
        self._wall = wall_clock()
        self.busy = 0.0  # smoothed CPU share
        self.level = 0.0

    def __call__(self) -> float:
        wall = self._wall_clock()
        elapsed = wall - self._wall
        if elapsed >= self.interval:
            cpu = self._cpu_clock()
            share = min(1.0, (cpu - self._cpu) / elapsed)
            self.busy = _smoothed(self.busy, share, elapsed, self.interval)
            self._cpu, self._wall = cpu, wall
            self.level = min(1.0, max(0.0, (self.busy - self.low) / (self.high - self.low)))
        return self.level


class ArrivalRate:
    """Events per second, measured on the events themselves (:meth:`tick`, with the event's
    loop time) at most every ``interval`` and smoothed; an idle source measures nothing.

    The other half of "wait for company only when waiting is cheap": a saturated worker that
    sees few events would hold each one for company that does not come. On a slow or crowded
    machine the meter reads saturated at moderate rates (it also counts the wait for a CPU
    that other processes hold), where a batch window gathers one or two requests.
    """

    __slots__ = ("_count", "_since", "interval", "rate")

    def __init__(self, interval: float = 0.05) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.rate = 0.0
        self._count = 0
        self._since = 0.0  # the first event starts the first measurement

    def tick(self, now: float) -> float:
        """Count one event at ``now``; returns the rate (events/s) as last measured."""
        self._count += 1
        elapsed = now - self._since
        if elapsed >= self.interval:
            rate = self._count / elapsed
            self.rate = _smoothed(self.rate, rate, elapsed, self.interval)
            self._count, self._since = 0, now
        return self.rate


def _psi_total(path: str) -> float | None:
    """Seconds of ``some`` pressure so far in a PSI file (its ``total=`` is in
    microseconds); ``None`` when it cannot be read or is not PSI."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
        return int(line.rpartition(b"total=")[2]) / 1e6 if line.startswith(b"some") else None
    except (OSError, ValueError):
        return None


def _cgroup_dir(cgroup: str, mountinfo: str) -> str | None:
    """This process's cgroup v2 directory: its path in ``cgroup`` (``/proc/self/cgroup``,
    the ``0::`` line) under the cgroup2 mount of ``mountinfo`` (``/proc/self/mountinfo``)
    that holds it; ``None`` without cgroup v2 or when the mount does not show it."""
    try:
        with open(cgroup, encoding="utf-8") as f:
            path = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
        with open(mountinfo, encoding="utf-8") as f:
            mounts = [ln.split() for ln in f]
    except (OSError, UnicodeDecodeError):
        return None
    if path is None:
        return None
    for fields in mounts:
        # id parent dev root mountpoint options [optional...] - fstype source superoptions
        if "-" not in fields[6:-1] or fields[fields.index("-", 6) + 1] != "cgroup2":
            continue
        root, point = (f.replace("\\040", " ") for f in fields[3:5])
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return point.rstrip("/") + "/" + path[len(root) :].strip("/")
    return None


def pressure_path(
    cgroup: str = "/proc/self/cgroup",
    mountinfo: str = "/proc/self/mountinfo",
    machine: str = _PRESSURE,
) -> str:
    """The CPU pressure file that describes this process: its own cgroup's
    ``cpu.pressure`` where cgroup v2 gives it one (a container, a systemd service, a
    Kubernetes pod's container), else the machine's ``/proc/pressure/cpu``. A cgroup's
    pressure counts only its own tasks' waits for a core - whoever else keeps the cores
    busy - so a worker in a container on a crowded host reads its own queue, not the
    host's. (In the root cgroup the two are the same: kernels that give it the file show the
    machine's pressure there.)"""
    directory = _cgroup_dir(cgroup, mountinfo)
    if directory is not None:
        own = directory.rstrip("/") + "/" + _CGROUP_PRESSURE
        if _psi_total(own) is not None:
            return own
    return machine


class CpuPressure(LoopSaturation):
    """The share of wall time in which some task was ready to run and waited for a CPU
    (Linux PSI, the ``some`` line of :func:`pressure_path`: this process's cgroup's
    ``cpu.pressure``, else the machine's ``/proc/pressure/cpu``), in [0, 1]: the same
    sampling and smoothing as :class:`LoopSaturation`, on the pressure's total instead of the
    thread's demand, mapped 1:1 (``low`` 0, ``high`` 1).

    It sees the queue a worker's own signals miss. With several workers on a full machine
    each one keeps up with what reaches it - its loop reads below saturated now and then,
    and few of its streams are in flight - while Envoy and the load wait for a core
    (measured on this project's 2-vCPU machine, closed loop, two grpc.aio workers: 0.54-0.77
    in the middle 80 % of 50 ms samples; one worker or two at 1,000 req/s: 0.18-0.39; one
    saturated worker, whose queue is its own loop's: 0.15-0.32; read from the machine's
    file, the process being in the root cgroup there). Reads 0 where PSI is not available.
    ``path`` (default: :func:`pressure_path`, found once) names the file read."""

    def __init__(
        self,
        *,
        interval: float = 0.05,
        path: str | None = None,
        wall_clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        #: the PSI file read: a cgroup's ``cpu.pressure`` or ``/proc/pressure/cpu``
        self.path = path if path is not None else pressure_path()
        self._total = self._read()
        #: whether PSI could be read at all (a kernel without it: always 0, no file read)
        self.available = self._total is not None
        super().__init__(
            interval=interval, low=0.0, high=1.0, cpu_clock=self._clock, wall_clock=wall_clock
        )

    @property
    def share(self) -> float:
        """The pressure as last read (0 .. 1)."""
        return self.level

    def _read(self) -> float | None:
        return _psi_total(self.path)

    def _clock(self) -> float:
        """The total as a clock for the sampler: the last good reading when one fails."""
        if self.available and (total := self._read()) is not None:
            self._total = total
        return self._total or 0.0


_PER_THREAD = threading.local()


class InFlight:
    """The ext_proc streams this worker is serving now (every generation's), kept by the
    servicer as streams start and end, beside its own ``open_streams``.

    The meter above needs a sample interval to see a burst begin; this count sees it at
    once. A task that awaits I/O while other streams are in flight is resumed only after the
    loop has worked through their ready events and whatever arrived meanwhile: on a busy
    worker, tens of milliseconds. (Streams that wait for nothing start and end within one
    callback, so even a saturated worker seldom has many in flight at once.)"""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def streams_in_flight() -> InFlight:
    """The calling thread's (the event loop's) :class:`InFlight`, made on first use."""
    counter: InFlight | None = getattr(_PER_THREAD, "in_flight", None)
    if counter is None:
        counter = _PER_THREAD.in_flight = InFlight()
    return counter


def loop_saturation() -> LoopSaturation:
    """The calling thread's meter with the default bounds, made on first use: every user in a
    worker (the server's reply coalescing, each rate limiter's batcher) reads one signal
    instead of sampling the same clocks each on its own."""
    meter: LoopSaturation | None = getattr(_PER_THREAD, "meter", None)
    if meter is None:
        meter = _PER_THREAD.meter = LoopSaturation()
    return meter


def cpu_pressure() -> CpuPressure:
    """The calling thread's :class:`CpuPressure`, made on first use (one per worker loop)."""
    meter: CpuPressure | None = getattr(_PER_THREAD, "pressure", None)
    if meter is None:
        meter = _PER_THREAD.pressure = CpuPressure()
    return meter
