"""The always-on loop-lag watchdog: names the plugin that blocked the event loop.

asyncio cannot interrupt synchronous code. This watchdog wakes up every ``interval`` seconds and
measures how late it woke; a stall past the threshold is logged and counted with the plugin
that was running at the time (the chain records it in :data:`current_plugin`). asyncio's debug
mode finds the same stalls but costs far too much for production.
"""

from __future__ import annotations

import asyncio
import logging
import time

from extproc.observability.metrics import Registry

__all__ = ["LoopLagWatchdog", "current_plugin"]

log = logging.getLogger("extproc.watchdog")

#: the plugin whose hook runs right now (set by the chain; "" between calls). A one-element
#: list: reads and writes are a plain index on the hot path.
current_plugin: list[str] = [""]


class LoopLagWatchdog:
    def __init__(self, registry: Registry, threshold: float, interval: float = 0.05) -> None:
        self.threshold = threshold
        self.interval = interval
        self.stalls = registry.counter(
            "extproc_loop_stalls_total", "event-loop stalls past the threshold", ("plugin",)
        )
        self.lag = registry.histogram("extproc_loop_lag_seconds", "event-loop wake-up lateness")
        self.last_stall: tuple[str, float] | None = None

    async def run(self) -> None:
        bound_lag = self.lag.labels()
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            late = time.perf_counter() - before - self.interval
            bound_lag.observe(max(late, 0.0))
            if late > self.threshold:
                plugin = current_plugin[0] or "(none)"
                self.stalls.labels(plugin).inc()
                self.last_stall = (plugin, late)
                log.warning(
                    "event loop blocked for %.0f ms; plugin %s was running - a plugin must not "
                    "block (use async I/O, or run CPU work in a thread)",
                    late * 1000,
                    plugin,
                    extra={"plugin": plugin, "lag_ms": round(late * 1000, 1)},
                )
