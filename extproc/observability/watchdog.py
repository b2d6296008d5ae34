"""The always-on loop-lag watchdog: names the plugin that blocked the event loop.

asyncio cannot interrupt synchronous code. A heartbeat callback on the loop records when it
last ran; a daemon thread checks the heartbeat, and when the loop has not come back for longer
than the threshold it looks at the event loop thread's stack and finds the plugin hook being
executed (by the hook's code object, so it is exact, also after an ``await``). The stall is
logged once with the plugin's name and counted in ``extproc_loop_stalls_total{plugin}``.

asyncio's debug mode finds the same stalls but costs far too much for production; this costs
one loop callback per interval and a thread that sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import CodeType, FrameType

from extproc.observability.metrics import Registry

__all__ = ["LoopLagWatchdog", "plugin_hook_codes"]

log = logging.getLogger("extproc.watchdog")

_HOOKS = ("on_request", "on_response", "on_error", "initialize", "health_check", "shutdown")


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


class LoopLagWatchdog:
    def __init__(
        self,
        registry: Registry,
        threshold: float,
        hook_codes: Callable[[], Mapping[CodeType, str]] = dict,
        interval: float = 0.01,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        self.hook_codes = hook_codes
        self.stalls = registry.counter(
            "extproc_loop_stalls_total", "event-loop stalls past the threshold", ("plugin",)
        )
        self.lag = registry.histogram("extproc_loop_lag_seconds", "event-loop wake-up lateness")
        self.last_stall: tuple[str, float] | None = None
        self._beat = time.monotonic()
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        bound = self.lag.labels()

        def beat(expected: float) -> None:
            now = time.monotonic()
            bound.observe(max(now - expected, 0.0))
            self._beat = now
            if not self._stop.is_set():
                loop.call_later(self.interval, beat, now + self.interval)

        self._beat = time.monotonic()
        loop.call_later(self.interval, beat, self._beat + self.interval)
        self._thread = threading.Thread(target=self._watch, name="extproc-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _watch(self) -> None:
        reported_beat = 0.0
        while not self._stop.wait(self.threshold / 2):
            beat = self._beat
            late = time.monotonic() - beat
            if late <= self.threshold or beat == reported_beat:
                continue
            reported_beat = beat  # one report per stall
            frame = sys._current_frames().get(self._loop_thread)
            try:
                plugin = _blame(frame, self.hook_codes()) or "(none)"
            except Exception:  # never let the watchdog die
                plugin = "(unknown)"
            finally:
                del frame
            self.stalls.labels(plugin).inc()
            self.last_stall = (plugin, late)
            log.warning(
                "event loop blocked for more than %.0f ms in plugin %s: a plugin must not block "
                "(use async I/O, or run CPU-bound work with asyncio.to_thread)",
                late * 1000,
                plugin,
                extra={"plugin": plugin, "lag_ms": round(late * 1000, 1)},
            )
