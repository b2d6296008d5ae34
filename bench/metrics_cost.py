"""Metrics cost benchmark (not a test): µs per hot-path recording, ours vs the OpenTelemetry SDK
(and prometheus_client), and the cost of one collection through the SDK's Prometheus reader.

    .venv/bin/python bench/metrics_cost.py [--number 200000]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as PromHistogram

from extproc.observability.metrics import LATENCY_BUCKETS, Registry
from extproc.observability.otel import build_meter_provider, render_metrics


def per_op_us(fn: Callable[[], object], number: int) -> float:
    """Best of 5 runs, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    n = args.number

    registry = Registry()
    ours_hist = registry.histogram("extproc_plugin_duration_seconds", "d", ("plugin", "phase"))
    ours_count = registry.counter("extproc_plugin_decisions_total", "d", ("plugin", "phase", "r"))
    bound_hist = ours_hist.labels("jwt_auth", "request_headers")
    bound_count = ours_count.labels("jwt_auth", "request_headers", "continue")

    reader = InMemoryMetricReader()
    sdk = MeterProvider(
        metric_readers=[reader],
        views=[
            View(
                instrument_name="otel_duration_seconds",
                aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
            )
        ],
    )
    meter = sdk.get_meter("bench")
    otel_hist = meter.create_histogram("otel_duration_seconds", unit="s")
    otel_count = meter.create_counter("otel_decisions")
    attrs = {"plugin": "jwt_auth", "phase": "request_headers"}
    count_attrs = {**attrs, "r": "continue"}

    prom = PromHistogram(
        "prom_duration_seconds",
        "d",
        ("plugin", "phase"),
        buckets=LATENCY_BUCKETS,
        registry=CollectorRegistry(),
    ).labels("jwt_auth", "request_headers")

    rows = [
        ("ours BoundHistogram.observe", per_op_us(lambda: bound_hist.observe(0.00012), n)),
        ("otel Histogram.record", per_op_us(lambda: otel_hist.record(0.00012, attrs), n)),
        ("prometheus_client bound .observe", per_op_us(lambda: prom.observe(0.00012), n)),
        ("ours BoundCounter.inc", per_op_us(bound_count.inc, n)),
        ("otel Counter.add", per_op_us(lambda: otel_count.add(1, count_attrs), n)),
    ]
    base = {"observe": rows[0][1], "inc": rows[3][1]}
    print(f"{'hot path, one call':40} {'µs/op':>8} {'x ours':>8}")
    for name, us in rows:
        ref = base["inc"] if "Counter" in name else base["observe"]
        print(f"{name:40} {us:8.3f} {us / ref:8.1f}")

    # one collection: 4 plugins x 6 phases histograms + 5 results each, through the SDK
    for p in range(4):
        for phase in range(6):
            ours_hist.labels(f"p{p}", f"ph{phase}").observe(0.0001)
            for r in range(5):
                ours_count.labels(f"p{p}", f"ph{phase}", f"r{r}").inc()
    bridged = build_meter_provider(registry)
    series = len(list(registry.collect()))
    scrape = per_op_us(lambda: render_metrics(bridged), 200)
    reference = per_op_us(registry.render_prometheus, 200)
    print(f"\none /metrics collection ({series} families, ~150 series)")
    print(f"{'through the OTel SDK (render_metrics)':40} {scrape:8.0f} µs")
    print(f"{'reference Registry.render_prometheus':40} {reference:8.0f} µs")
    bridged.shutdown()
    sdk.shutdown()


if __name__ == "__main__":
    main()
