"""extproc_gc_pause_seconds observes real collections, by generation, only while installed."""

from __future__ import annotations

import gc

from extproc.observability.gcpause import GcPauses
from extproc.observability.metrics import Registry


def _counts(registry: Registry) -> dict[str, int]:
    out = {}
    for line in registry.render_prometheus().splitlines():
        if line.startswith("extproc_gc_pause_seconds_count"):
            labels, _, value = line.rpartition(" ")
            out[labels.split('"')[1]] = int(float(value))
    return out


def test_collections_are_observed_by_generation_while_installed() -> None:
    registry = Registry()
    pauses = GcPauses(registry)
    enabled = gc.isenabled()
    gc.disable()  # only the collections below
    try:
        pauses.install()
        pauses.install()  # once only
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        pauses.uninstall()
        gc.collect(1)  # not observed any more
    finally:
        pauses.uninstall()
        if enabled:
            gc.enable()
    assert _counts(registry) == {"0": 1, "1": 0, "2": 2}
