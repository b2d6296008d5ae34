"""The OpenTelemetry bridge: /metrics through the SDK shows exactly our series, read at
collection time only."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.measurement_consumer import (
    SynchronousMeasurementConsumer,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    InMemoryMetricReader,
    MetricsData,
    Sum,
)
from prometheus_client.parser import text_string_to_metric_families

from extproc.observability.metrics import LATENCY_BUCKETS, Registry
from extproc.observability.otel import (
    PROMETHEUS_CONTENT_TYPE,
    build_meter_provider,
    render_metrics,
    shutdown_meter_provider,
)

Sample = tuple[str, frozenset[tuple[str, str]], float]


def samples(text: str) -> set[Sample]:
    """Sample name, labels and value; ``le`` compared as a number (``1`` is ``1.0``)."""
    out: set[Sample] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: (repr(float(v)) if k == "le" else v) for k, v in s.labels.items()}
            out.add((s.name, frozenset(labels.items()), float(s.value)))
    return out


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    duration = reg.histogram(
        "extproc_plugin_duration_seconds", "time in a plugin hook", ("plugin", "phase")
    )
    decisions = reg.counter(
        "extproc_plugin_decisions_total", "plugin results", ("plugin", "phase", "result")
    )
    reg.counter("extproc_streams_total", "ext_proc streams by end", ("end",)).labels("ok").inc(7)
    reg.counter("extproc_loop_stalls_total", "stalls").inc()
    reg.gauge("extproc_active_streams", "open streams", lambda: [((), 3.0)])
    reg.gauge(
        "extproc_rate_limit_breaker_state",
        "breaker state by plugin",
        lambda: [(("a",), 0.0), (("b",), 2.0)],
        ("plugin",),
    )
    jwt = duration.labels("jwt_auth", "request_headers")
    for v in (0.000004, 0.00001, 0.00003, 0.0002, 0.0002, 0.0049, 0.7, 3.0):
        jwt.observe(v)  # includes a value on a bound (le is inclusive) and one above the last
    duration.labels("rate_limit", "request_headers").observe(0.00002)
    duration.labels("headers", "response_headers")  # a series with no observation yet
    decisions.labels("jwt_auth", "request_headers", "continue").inc(5)
    decisions.labels("jwt_auth", "request_headers", "reject").inc()
    decisions.labels('we"ird\\name\n', "request_headers", "continue").inc(0.5)
    return reg


@pytest.fixture
def providers() -> Iterator[list[MeterProvider]]:
    made: list[MeterProvider] = []
    yield made
    for provider in made:
        provider.shutdown()


def test_prometheus_through_the_sdk_matches_the_reference(
    registry: Registry, providers: list[MeterProvider]
) -> None:
    provider = build_meter_provider(registry)
    providers.append(provider)
    body, ctype = render_metrics(provider)
    assert ctype == PROMETHEUS_CONTENT_TYPE
    text = body.decode()
    assert samples(text) == samples(registry.render_prometheus())
    # our names, nothing appended, no SDK extras
    assert "_total_total" not in text and "_seconds_seconds" not in text
    assert "target_info" not in text and "otel_scope" not in text
    assert (
        'extproc_plugin_duration_seconds_bucket{le="+Inf",phase="request_headers",'
        'plugin="jwt_auth"} 8.0'
    ) in text
    assert "# TYPE extproc_plugin_duration_seconds histogram" in text
    assert "# TYPE extproc_plugin_decisions_total counter" in text
    assert (
        'extproc_plugin_decisions_total{phase="request_headers",plugin="jwt_auth",'
        'result="continue"} 5.0'
    ) in text


def test_the_bucket_layout_is_ours(registry: Registry, providers: list[MeterProvider]) -> None:
    provider = build_meter_provider(registry)
    providers.append(provider)
    les = {
        dict(labels)["le"]
        for name, labels, _ in samples(render_metrics(provider)[0].decode())
        if name == "extproc_plugin_duration_seconds_bucket"
    }
    assert les == {repr(float(b)) for b in LATENCY_BUCKETS} | {"inf"}


def test_otel_points_carry_the_aggregates(
    registry: Registry, providers: list[MeterProvider]
) -> None:
    reader = InMemoryMetricReader()
    providers.append(build_meter_provider(registry, exporters=(), readers=[reader]))
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert set(metrics) == {
        "extproc_plugin_duration_seconds",
        "extproc_plugin_decisions_total",
        "extproc_streams_total",
        "extproc_loop_stalls_total",
        "extproc_active_streams",
        "extproc_rate_limit_breaker_state",
    }
    hist = metrics["extproc_plugin_duration_seconds"]
    assert hist.unit == "s"
    assert isinstance(hist.data, Histogram)
    assert hist.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    point = next(
        p
        for p in hist.data.data_points
        if p.attributes == {"plugin": "jwt_auth", "phase": "request_headers"}
    )
    assert tuple(point.explicit_bounds) == LATENCY_BUCKETS
    assert len(point.bucket_counts) == len(LATENCY_BUCKETS) + 1
    assert point.count == 8 == sum(point.bucket_counts)
    assert point.bucket_counts[0] == 2  # 4 µs and exactly 10 µs
    assert point.bucket_counts[-1] == 1  # 3 s, above the last bound
    assert math.isclose(point.sum, 0.000004 + 0.00001 + 0.00003 + 0.0004 + 0.0049 + 3.7)
    decisions = metrics["extproc_plugin_decisions_total"]
    assert isinstance(decisions.data, Sum)
    assert decisions.data.is_monotonic
    assert decisions.unit == ""


def test_a_counter_incremented_after_a_collection_shows_at_the_next(
    registry: Registry, providers: list[MeterProvider]
) -> None:
    provider = build_meter_provider(registry)
    providers.append(provider)
    counter = registry.counter("extproc_streams_total", "ext_proc streams by end", ("end",))
    key = ("extproc_streams_total", frozenset({("end", "idle")}), 1.0)
    assert key not in samples(render_metrics(provider)[0].decode())
    counter.labels("idle").inc()
    assert key in samples(render_metrics(provider)[0].decode())
    counter.labels("ok").inc()
    ok = ("extproc_streams_total", frozenset({("end", "ok")}), 8.0)
    assert ok in samples(render_metrics(provider)[0].decode())


def test_recording_never_touches_opentelemetry(
    registry: Registry, providers: list[MeterProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = build_meter_provider(registry)
    providers.append(provider)
    measured: list[object] = []
    collected: list[object] = []
    original = SynchronousMeasurementConsumer.consume_measurement
    read = registry.collect

    def consume(self: SynchronousMeasurementConsumer, measurement: Any) -> None:
        measured.append(measurement)
        original(self, measurement)

    def collect() -> Any:
        collected.append(1)
        return read()

    monkeypatch.setattr(SynchronousMeasurementConsumer, "consume_measurement", consume)
    monkeypatch.setattr(registry, "collect", collect)

    bound = registry.histogram(
        "extproc_plugin_duration_seconds", "time in a plugin hook", ("plugin", "phase")
    ).labels("jwt_auth", "request_headers")
    counter = registry.counter("extproc_streams_total", "x", ("end",)).labels("ok")
    for _ in range(1000):
        bound.observe(0.0001)
        counter.inc()
    assert measured == [] and collected == []

    text = render_metrics(provider)[0].decode()
    assert len(collected) == 1 and measured == []
    assert ("extproc_streams_total", frozenset({("end", "ok")}), 1007.0) in samples(text)


def test_sdk_instruments_are_exported_beside_ours(
    registry: Registry, providers: list[MeterProvider]
) -> None:
    provider = build_meter_provider(registry)
    providers.append(provider)
    provider.get_meter("a.plugin").create_counter("plugin_things").add(2, {"kind": "x"})
    text = render_metrics(provider)[0].decode()
    assert 'plugin_things_total{kind="x"} 2.0' in text
    assert samples(registry.render_prometheus()) <= samples(text)


def test_a_broken_gauge_does_not_break_the_scrape(
    registry: Registry, providers: list[MeterProvider]
) -> None:
    def broken() -> list[tuple[tuple[str, ...], float]]:
        raise RuntimeError("boom")

    registry.gauge("extproc_broken", "raises", broken)
    provider = build_meter_provider(registry)
    providers.append(provider)
    assert samples(render_metrics(provider)[0].decode()) == samples(registry.render_prometheus())


def test_render_from_a_registry_is_the_reference(registry: Registry) -> None:
    body, ctype = render_metrics(registry)
    assert body.decode() == registry.render_prometheus()
    assert ctype == PROMETHEUS_CONTENT_TYPE


def test_render_needs_the_prometheus_exporter(
    registry: Registry, providers: list[MeterProvider]
) -> None:
    provider = build_meter_provider(registry, exporters=())
    providers.append(provider)
    with pytest.raises(ValueError, match="no prometheus exporter"):
        render_metrics(provider)


def test_unknown_exporter_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="unknown metrics exporters"):
        build_meter_provider(registry, exporters=("statsd",))


def test_otlp_without_its_package_names_it(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", None)
    with pytest.raises(RuntimeError, match="opentelemetry-exporter-otlp-proto-grpc"):
        build_meter_provider(registry, exporters=("otlp",))


def test_our_points_encode_as_otlp(registry: Registry, providers: list[MeterProvider]) -> None:
    # a dev dependency (the otlp extra): missing it must fail, not skip
    encoder = importlib.import_module("opentelemetry.exporter.otlp.proto.common.metrics_encoder")
    reader = InMemoryMetricReader()
    providers.append(build_meter_provider(registry, exporters=(), readers=[reader]))
    data = reader.get_metrics_data()
    assert isinstance(data, MetricsData)
    request = encoder.encode_metrics(data)
    names = {
        m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert "extproc_plugin_duration_seconds" in names
    (resource,) = request.resource_metrics
    assert any(a.key == "service.name" for a in resource.resource.attributes)


def test_otlp_is_wired_and_an_unreachable_collector_does_not_fail_shutdown(
    registry: Registry,
) -> None:
    importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.metric_exporter")
    provider = build_meter_provider(
        registry, exporters=("otlp",), otlp_endpoint="http://127.0.0.1:1", export_interval_s=3600
    )
    shutdown_meter_provider(provider, timeout_s=0.3)
