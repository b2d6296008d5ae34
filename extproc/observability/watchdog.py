"""The loop-lag watchdog: names the plugin that blocked the event loop (on unless
``server.loop_lag_threshold_ms`` is 0; its wake-ups cost 4-9 ms of CPU a second while work
arrives: ~1 % of a busy grpc.aio worker's CPU, 3-4 % of an http2 worker's at 300 req/s).

asyncio cannot interrupt synchronous code. A heartbeat callback on the loop records when it
last ran; a daemon thread checks the heartbeat, and when the loop has not come back for longer
than the threshold it looks at the event loop thread's stack and finds the plugin hook being
executed (by the hook's code object, so it is exact, also after an ``await``). The stall is
logged once with the plugin's name and counted in ``extproc_loop_stalls_total{plugin}``.

asyncio's debug mode finds the same stalls but costs far too much for production; this costs
one loop callback per interval and a thread that sleeps.

An idle worker should not pay for it: while no work arrives (the ``busy`` predicate), the
heartbeat slows to ``idle_interval``. ``wake()``, called where work starts (a stream, a health
check, a reload), brings it back to full speed at once, so the first request after a quiet
spell is watched like any other. Work that starts on its own while idle (a plugin's background
task) does not call ``wake()``; so, on Linux, the idle thread looks every two thresholds at
what the loop's thread is doing, from ``/proc/self/task/<tid>/syscall`` (one ``pread``,
~1.5 us): waiting in ``epoll`` is idle; anything else (running, sleeping, blocked on a socket)
gets a probe callback sent to the loop with ``call_soon_threadsafe``, and a probe that has not
run within the threshold is a stall like a late beat. So a block of an idle worker is always
reported when it lasts three thresholds (150 ms by default; without the probe it took the
threshold plus ``idle_interval``, 300 ms). An idle loop is not woken by this. Idle, the
watchdog wakes a sidecar ~4 times a second on the loop and ~10 in its own thread; busy, ~120
(100 beats on the loop, ~20 looks by the thread, one per threshold).

Lateness is measured against the time the next beat was *due*: a reported stall lasted at least
that long (the thread cannot tell how much earlier it began).

The cyclic garbage collector stops the loop too, and no plugin is to blame: a collection
holds the GIL for its whole length, and its finalizers (weakref callbacks) run Python code,
which is where the thread then finds the loop, inside whichever hook allocated last. So a gc
callback notes when each collection starts and ends, and a stall at least half spent in
collections (added up: one stall can hold several) is reported as the collector's
(``plugin="(gc)"``, with the oldest generation among them and the hook it interrupted), not
as that hook's.

A process that did not run at all - stopped (SIGSTOP, a debugger), or on a machine that
stalled (a VM paused, its host overloaded) - comes back with every beat late, though no code of
ours blocked anything. The thread tells the two apart by its own sleep: when it overslept by
more than the threshold while the process used almost no CPU time, the process stood still;
that is logged once (info) and not counted as a loop stall. A plugin that blocks in C code
holding the GIL also keeps the thread from waking, but the process is on a CPU meanwhile, so
that stays a stall.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import CodeType, FrameType

from extproc.observability.metrics import Registry

__all__ = ["LoopLagWatchdog", "plugin_hook_codes"]

log = logging.getLogger("extproc.watchdog")

_HOOKS = ("on_request", "on_response", "on_error", "initialize", "health_check", "shutdown")
#: the ``plugin`` of a stall the cyclic garbage collector caused
_GC = "(gc)"
#: collections remembered for a stall's account: under load they come a few a second at
#: most (extproc_gc_pause_seconds), a stall is looked at within ~10 ms of its end, and a hook
#: whose allocations set off more than this many within one stall is to blame itself
_GC_KEPT = 16


def plugin_hook_codes(plugins: Mapping[str, object]) -> dict[CodeType, str]:
    """Map the code object of every hook of the given plugin instances to the instance name."""
    out: dict[CodeType, str] = {}
    for name, plugin in plugins.items():
        for cls in type(plugin).__mro__:
            if cls.__module__.startswith("extproc."):
                continue  # the base class's no-op hooks block nothing
            for hook in _HOOKS:
                fn = cls.__dict__.get(hook)
                code = getattr(fn, "__code__", None)
                if code is not None:
                    out.setdefault(code, name)
    return out


def _blame(frame: FrameType | None, codes: Mapping[CodeType, str]) -> str:
    while frame is not None:
        name = codes.get(frame.f_code)
        if name is not None:
            return name
        frame = frame.f_back
    return ""


def _where(frame: FrameType | None) -> str:
    """The innermost Python frame of the loop's thread: what it was running when seen."""
    if frame is None:
        return "(unknown)"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"


#: the system calls an idle event loop waits in (epoll_wait, epoll_pwait, epoll_pwait2), as
#: numbered in ``/proc/<pid>/task/<tid>/syscall`` on each machine
_EPOLL_WAITS: dict[str, frozenset[bytes]] = {
    "x86_64": frozenset({b"232", b"281", b"441"}),
    "aarch64": frozenset({b"22", b"441"}),
}


class ThreadState:
    """Whether a thread of this process is waiting in ``epoll`` (Linux, x86-64 or arm64)."""

    def __init__(self, native_id: int, machine: str | None = None) -> None:
        self._waits = _EPOLL_WAITS.get(machine or platform.machine(), frozenset())
        self._fd = -1
        if self._waits:
            self._fd = os.open(f"/proc/self/task/{native_id}/syscall", os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def open(cls, native_id: int) -> ThreadState | None:
        """The thread's state reader, or None where it cannot be read."""
        try:
            state = cls(native_id)
            state.in_epoll()
        except OSError:
            return None
        return state if state._fd >= 0 else None

    def in_epoll(self) -> bool:
        # "running", or the number of the system call it is blocked in and its arguments
        return os.pread(self._fd, 16, 0).partition(b" ")[0] in self._waits

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LoopLagWatchdog:
    def __init__(
        self,
        registry: Registry,
        threshold: float,
        hook_codes: Callable[[], Mapping[CodeType, str]] = dict,
        interval: float = 0.01,
        *,
        idle_interval: float = 0.25,
        busy: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        #: the heartbeat's interval while ``busy()`` says no work arrived (no ``busy``: never)
        self.idle_interval = max(idle_interval, interval)
        self.hook_codes = hook_codes
        self._busy = busy
        self._clock = clock
        self._cpu_clock = cpu_clock
        #: how often the whole process stood still past the threshold (read by tests)
        self.frozen = 0
        #: how often the thread woke to look at the heartbeat (read by tests)
        self.looks = 0
        self.stalls = registry.counter(
            "extproc_loop_stalls_total", "event-loop stalls past the threshold", ("plugin",)
        )
        self.lag = registry.histogram("extproc_loop_lag_seconds", "event-loop wake-up lateness")
        self._lag = self.lag.labels()
        self.last_stall: tuple[str, float] | None = None
        #: the heartbeat runs at ``idle_interval`` (call :meth:`wake` when work starts)
        self.idle = False
        self._due = clock() + interval  # when the next beat should run
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._stop = threading.Event()
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None
        #: reads what the loop's thread is doing (None: not on this system, no idle probes)
        self.thread_state: ThreadState | None = None
        #: how many probes the idle thread sent to the loop (read by tests)
        self.probes = 0
        self._probe = 0.0  # when the last probe was sent
        self._answered = 0.0  # the send time of the last probe the loop ran
        #: the cyclic collection in progress: (start, generation), start 0 when none; and
        #: the last ones that ended: (start, end, generation) each, oldest first. Written by
        #: the gc callback, on whichever thread collects (each replaced by a new tuple: read
        #: whole by the watchdog's thread)
        self._gc_now: tuple[float, int] = (0.0, 0)
        self._gc_ended: tuple[tuple[float, float, int], ...] = ()

    def start(self, *, probe_when_idle: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if probe_when_idle and self._busy is not None:
            self.thread_state = ThreadState.open(threading.get_native_id())
        self._schedule(self.interval)
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=self._watch, name="extproc-watchdog", daemon=True)
        self._thread.start()

    def _schedule(self, delay: float) -> None:
        assert self._loop is not None
        self._due = self._clock() + delay
        self._timer = self._loop.call_later(delay, self._beat, self._due)

    def _beat(self, due: float) -> None:
        now = self._clock()
        self._lag.observe(max(now - due, 0.0))
        if self._stop.is_set():
            return
        self.idle = self._busy is not None and not self._busy()
        self._schedule(self.idle_interval if self.idle else self.interval)

    def wake(self) -> None:
        """Work starts: back to a beat every ``interval`` (from the loop's thread; cheap
        when already awake, so call it freely)."""
        if not self.idle or self._timer is None or self._stop.is_set():
            return
        self.idle = False
        self._timer.cancel()
        self._schedule(self.interval)
        self._woken.set()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_now = (self._clock(), info["generation"])
        elif self._gc_now[0]:  # (not a collection that began before the callback was in)
            ended = (self._gc_now[0], self._clock(), info["generation"])
            self._gc_ended = (*self._gc_ended[1 - _GC_KEPT :], ended)
            self._gc_now = (0.0, 0)

    def _in_gc(self, since: float, now: float) -> tuple[float, int]:
        """How long the cyclic collector ran between ``since`` and ``now``: the collection in
        progress and the last ones that ended, added up (a stall can hold several short
        ones); and the oldest generation among them."""
        total, oldest = 0.0, -1
        start, generation = self._gc_now
        if start:
            total, oldest = now - max(start, since), generation
        for start, end, generation in self._gc_ended:
            overlap = min(end, now) - max(start, since)
            if overlap > 0:
                total += overlap
                oldest = max(oldest, generation)
        return total, max(oldest, 0)

    def stop(self) -> None:
        while self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._stop.set()
        self._woken.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self.thread_state is not None and not (self._thread and self._thread.is_alive()):
            self.thread_state.close()

    def _answer(self, sent: float) -> None:
        self._answered = sent

    def _send_probe(self, now: float) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._answer, now)
        except RuntimeError:  # the loop is closed: nothing left to watch
            return
        self._probe = now
        self.probes += 1

    def _pending_due(self) -> float:
        """When the loop should have come back: its next beat, or an unanswered probe."""
        due = self._due
        if self._probe > self._answered:
            due = min(due, self._probe)
        return due

    def _watch(self) -> None:
        reported = 0.0
        while True:
            # No beat can be late before the pending one's due + threshold: sleep until then.
            # A healthy loop has moved its due on by the time this wakes, so the thread
            # wakes about once per threshold, busy or idle, and a stall is seen as early as
            # it can be. (After a reported stall, the due stays in the past: half a
            # threshold between looks.) Idle, with no probe out, it looks every two
            # thresholds (each look costs a thread wake-up: ~100 us of CPU on our VMs).
            wait = max(self.threshold / 2, self._pending_due() + self.threshold - self._clock())
            if self.idle and self.thread_state is not None and self._probe <= self._answered:
                wait = min(wait, 2 * self.threshold)
            slept_at, cpu_at = self._clock(), self._cpu_clock()
            self._woken.wait(wait)
            self._woken.clear()
            self.looks += 1
            if self._stop.is_set():
                return
            due = self._pending_due()
            now = self._clock()
            overslept = now - slept_at - wait
            if overslept > self.threshold and self._cpu_clock() - cpu_at < overslept / 4:
                # whether or not the loop has beaten since: its late beat is not a stall
                reported = due
                self.frozen += 1
                log.info(
                    "the process did not run for %.0f ms (stopped, or the machine stalled): "
                    "not a loop stall",
                    overslept * 1000,
                    extra={"frozen_ms": round(overslept * 1000, 1)},
                )
                continue
            late = now - due
            if late <= self.threshold or due == reported:
                if (
                    self.idle
                    and self.thread_state is not None
                    and self._probe <= self._answered
                    and not self._in_epoll()
                ):
                    self._send_probe(now)  # the loop is up to something: see if it answers
                continue
            reported = due  # one report per stall
            frame = sys._current_frames().get(self._loop_thread)
            try:
                plugin = _blame(frame, self.hook_codes()) or "(none)"
                where = _where(frame)
            except Exception:  # never let the watchdog die
                plugin, where = "(unknown)", "(unknown)"
            finally:
                del frame
            collecting, generation = self._in_gc(due, now)
            if collecting >= late / 2:
                # The collector held the GIL for most of it (finishing, it may be running
                # finalizers, which is where the loop's thread is seen): no plugin to blame
                self.stalls.labels(_GC).inc()
                self.last_stall = (_GC, late)
                log.warning(
                    "event loop stopped for more than %.0f ms by the garbage collector "
                    "(generation %d, %.0f ms of it), during plugin %s: not a plugin blocking; "
                    "see extproc_gc_pause_seconds",
                    late * 1000,
                    generation,
                    collecting * 1000,
                    plugin,
                    extra={
                        "plugin": _GC,
                        "during": plugin,
                        "lag_ms": round(late * 1000, 1),
                        "gc_ms": round(collecting * 1000, 1),
                        "gc_generation": generation,
                        "where": where,
                    },
                )
                continue
            self.stalls.labels(plugin).inc()
            self.last_stall = (plugin, late)
            log.warning(
                "event loop blocked for more than %.0f ms in plugin %s, at %s: a plugin must "
                "not block (use async I/O, or run CPU-bound work with asyncio.to_thread)",
                late * 1000,
                plugin,
                where,
                extra={"plugin": plugin, "lag_ms": round(late * 1000, 1), "where": where},
            )

    def _in_epoll(self) -> bool:
        assert self.thread_state is not None
        try:
            return self.thread_state.in_epoll()
        except OSError:  # the thread is gone, or /proc went away: probe (a probe is harmless)
            return False
