"""How long the cyclic garbage collector stops the process: ``extproc_gc_pause_seconds``.

A collection runs on the thread that happened to allocate - the event loop's, nearly always -
and the loop waits for it: each pause is added to the requests in flight. Measured on the
benchmark's sidecar with jwt_auth + rate_limit at 1,000 req/s (2026-11-30): about 9
young-generation collections a second, p99 0.9 ms; one of the middle generation every ~1.3 s,
1-5 ms. (Raising the young threshold to 50,000 made them rare but 30 ms long: not done.) The
heap frozen at start (``extproc.server.freeze_heap``) keeps full collections short.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Final

from extproc.observability.metrics import Registry

__all__ = ["GcPauses"]

#: 50 µs .. 100 ms
BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class GcPauses:
    """Observes every collection's wall time by generation while installed."""

    def __init__(self, registry: Registry) -> None:
        pauses = registry.histogram(
            "extproc_gc_pause_seconds",
            "pauses of the cyclic garbage collector (the event loop waits)",
            ("generation",),
            buckets=BUCKETS,
        )
        self._by_generation = [pauses.labels(str(g)) for g in range(3)]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
