"""How long the cyclic garbage collector stops the process: ``extproc_gc_pause_seconds``.

A collection runs on the thread that happened to allocate - the event loop's, nearly always -
and the loop waits for it: each pause is added to the requests in flight. Measured on the
benchmark's sidecar with jwt_auth + rate_limit at 1,000 req/s (2026-11-30, Python's young
threshold of 700): about 9 young-generation collections a second, p99 0.9 ms; one of the
middle generation every ~1.3 s, 1-5 ms. The heap frozen at start
(``extproc.server.freeze_heap``) keeps full collections short. Since 2026-12-07 the young
threshold is 5,000 (``extproc.server.YOUNG_THRESHOLD``): at saturation 0.7 collections a
second of ~1.4 ms on http2 instead of ~220 of ~0.2 ms (5 % of the time); 50,000 had made
them 30 ms long.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, Final

from extproc.observability.metrics import Registry

__all__ = ["GcPauses", "GcTimer"]

#: 50 µs .. 100 ms
BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class GcTimer:
    """Times every collection while installed: ``on_pause(generation, seconds)`` (wall time,
    ``time.perf_counter``). Also a context manager that installs it for the block."""

    def __init__(self, on_pause: Callable[[int, float], None]) -> None:
        self._on_pause = on_pause
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._on_pause(info["generation"], time.perf_counter() - self._started)

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def __enter__(self) -> GcTimer:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


class GcPauses(GcTimer):
    """Observes every collection's wall time by generation while installed."""

    def __init__(self, registry: Registry) -> None:
        pauses = registry.histogram(
            "extproc_gc_pause_seconds",
            "pauses of the cyclic garbage collector (the event loop waits)",
            ("generation",),
            buckets=BUCKETS,
        )
        self._by_generation = [pauses.labels(str(g)) for g in range(3)]
        super().__init__(self._observe)

    def _observe(self, generation: int, seconds: float) -> None:
        self._by_generation[generation].observe(seconds)
