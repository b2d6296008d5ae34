"""The benchmark's reading of the sidecar's collector pauses: only the sample's own pauses,
all generations together, the pauses of 1 ms or more, and the report's table."""

from __future__ import annotations

import gc

import pytest

from bench import report
from bench.run import _SCRAPED_FAMILIES, _gc
from extproc.observability.gcpause import GcPauses
from extproc.observability.metrics import Registry


def scrape(registry: Registry) -> dict[str, float]:
    """What the harness keeps of one /metrics scrape (the same filter as ``_sidecar_metrics``)."""
    out: dict[str, float] = {}
    for line in registry.render_prometheus().splitlines():
        if line.startswith(_SCRAPED_FAMILIES):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_the_sample_s_own_pauses_from_the_sidecar_s_histogram() -> None:
    registry = Registry()
    pauses = GcPauses(registry)
    by_generation = pauses._by_generation
    by_generation[2].observe(0.030)  # before the sample: not counted
    before = scrape(registry)
    for _ in range(8):
        by_generation[0].observe(0.0002)
    by_generation[1].observe(0.0015)
    by_generation[2].observe(0.004)
    after = scrape(registry)
    seen = _gc(before, after, 2.0)
    assert seen["pauses_per_s"] == pytest.approx(5.0)
    assert seen["share"] == pytest.approx((8 * 0.0002 + 0.0015 + 0.004) / 2.0)
    assert seen["long_per_s"] == pytest.approx(1.0)


def test_a_real_collection_is_read() -> None:
    registry = Registry()
    pauses = GcPauses(registry)
    before = scrape(registry)
    pauses.install()
    try:
        gc.collect(0)
    finally:
        pauses.uninstall()
    seen = _gc(before, scrape(registry), 1.0)
    assert seen["pauses_per_s"] == pytest.approx(1.0)
    assert 0 < seen["share"] < 1


def test_no_pause_or_no_admin_port_gives_nothing() -> None:
    registry = Registry()
    GcPauses(registry)
    same = scrape(registry)
    assert _gc(same, same, 1.0) == {}
    assert _gc({}, {}, 1.0) == {}


def test_report_table_has_a_row_per_load() -> None:
    pauses = {"pauses_per_s": 9.25, "share": 0.0123, "long_per_s": 0.5}
    data = {
        "settings": {"latency_rate": 1000.0},
        "summary": {
            "passthrough": {"open_loop": {}},
            "extproc-jwt-rl-h2": {"gc": pauses, "open_loop": {"gc": dict(pauses, share=0.004)}},
        },
    }
    rows = [ln for ln in report._gc_table(data) if ln.startswith("| `")]
    assert rows == [
        "| `extproc-jwt-rl-h2` | saturated (closed loop) | 9.2 | 1.23 % | 0.50 |",
        "| `extproc-jwt-rl-h2` | 1000 req/s | 9.2 | 0.40 % | 0.50 |",
    ]
    assert report._gc_table({"settings": data["settings"], "summary": {}}) == []
