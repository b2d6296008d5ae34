"""The OpenTelemetry side of our metrics: the hot path's aggregates, handed over at collection.

The hot path records into :mod:`extproc.observability.metrics` (a bound child and an add,
~0.1 µs); an OpenTelemetry instrument would cost ~6 µs per call. So nothing here runs per
request. When a reader collects (a scrape of ``/metrics``, or the OTLP exporter's timer), a
:class:`RegistryProducer` turns every family of the :class:`Registry` into OpenTelemetry points
(counters into monotonic cumulative ``Sum``, histograms into ``Histogram`` with our explicit
buckets, gauges into ``Gauge``) and they join whatever the SDK's own instruments collected.

The Python SDK (1.45) has no ``MetricProducer`` yet (open-telemetry/opentelemetry-python#4768),
so :func:`build_meter_provider` installs the producer where the spec puts it: around each
reader's collect callback. That is one private hook of the SDK, used in one function
(:func:`_attach`) and covered by the tests; switch to ``metric_producers=`` when it lands.

``/metrics`` goes through the SDK's Prometheus reader and ``prometheus_client``; the exposed
names are ours, unchanged (``extproc_plugin_decisions_total``,
``extproc_plugin_duration_seconds_bucket{plugin,phase,le}``): counters already end in ``_total``
and units are only given where the name already ends in them, so nothing is appended twice.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final, Literal

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from extproc.observability import metrics as ours

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "MetricsExporter",
    "RegistryProducer",
    "build_meter_provider",
    "render_metrics",
    "shutdown_meter_provider",
]

log = logging.getLogger("extproc.observability")

PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

MetricsExporter = Literal["prometheus", "otlp", "console"]
_EXPORTERS: Final[frozenset[MetricsExporter]] = frozenset({"prometheus", "otlp", "console"})
_PROMETHEUS_ONLY: Final[tuple[MetricsExporter, ...]] = ("prometheus",)

_SCOPE: Final = InstrumentationScope("extproc")
_CUMULATIVE: Final = AggregationTemporality.CUMULATIVE
#: name suffix -> UCUM unit; the Prometheus exporter maps the unit back to the same suffix and
#: appends it only when the name does not already end in it
_UNITS: Final = (("_seconds", "s"), ("_bytes", "By"))

# the prometheus_client registry each provider's Prometheus reader fills, for render_metrics()
_EXPOSITIONS: weakref.WeakKeyDictionary[MeterProvider, Any] = weakref.WeakKeyDictionary()


class RegistryProducer:
    """Reads a :class:`Registry` into OpenTelemetry metric points, once per collection.

    Safe to call from an exporter thread while the event loop records: every series is read by
    C-level copies (``list(dict.items())``, ``list(counts)``), and a histogram's count is the
    sum of the bucket counts it read, so ``+Inf`` always equals ``_count``.
    """

    def __init__(
        self,
        registry: ours.Registry,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.registry = registry
        self._clock_ns = clock_ns
        #: all our series are cumulative since the producer started (the process, in practice)
        self.start_time_ns = clock_ns()
        #: how many times the aggregates were read; the hot path never changes it
        self.collections = 0

    def produce(self) -> list[Metric]:
        now = self._clock_ns()
        self.collections += 1
        out: list[Metric] = []
        for family, metric in self.registry.collect():
            converted = self._convert(family, metric, now)
            if converted is not None:
                out.append(converted)
        return out

    def scope_metrics(self) -> ScopeMetrics | None:
        produced = self.produce()
        return ScopeMetrics(scope=_SCOPE, metrics=produced, schema_url="") if produced else None

    def _convert(
        self,
        family: Any,
        metric: ours.Counter | ours.Histogram | ours.Gauge,
        now: int,
    ) -> Metric | None:
        names: tuple[str, ...] = family.label_names
        start = self.start_time_ns
        data: Sum | Histogram | Gauge
        if isinstance(metric, ours.Gauge):
            try:
                samples = list(metric.callback())
            except Exception:  # a broken callback must not break the collection
                log.exception("gauge callback failed", extra={"metric": family.name})
                return None
            if not samples:
                return None
            data = Gauge(
                data_points=[
                    NumberDataPoint(_attributes(names, values), start, now, float(value))
                    for values, value in samples
                ]
            )
        elif isinstance(metric, ours.Histogram):
            bounds = metric.buckets
            points: list[HistogramDataPoint] = []
            for values, child in list(family.children.items()):
                assert isinstance(child, ours.BoundHistogram)
                counts = list(child.counts)
                points.append(
                    HistogramDataPoint(
                        attributes=_attributes(names, values),
                        start_time_unix_nano=start,
                        time_unix_nano=now,
                        count=sum(counts),
                        sum=child.sum,
                        bucket_counts=counts,
                        explicit_bounds=bounds,
                        # not recorded: the SDK's own convention when record_min_max=False
                        min=math.inf,
                        max=-math.inf,
                    )
                )
            if not points:
                return None
            data = Histogram(data_points=points, aggregation_temporality=_CUMULATIVE)
        else:
            counters = [
                NumberDataPoint(_attributes(names, values), start, now, child.value)
                for values, child in list(family.children.items())
                if isinstance(child, ours.BoundCounter)
            ]
            if not counters:
                return None
            data = Sum(data_points=counters, aggregation_temporality=_CUMULATIVE, is_monotonic=True)
        return Metric(
            name=family.name, description=family.description, unit=_unit(family.name), data=data
        )


def _attributes(names: tuple[str, ...], values: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(names, values, strict=True))


def _unit(name: str) -> str:
    base = name.removesuffix("_total")
    for suffix, unit in _UNITS:
        if base.endswith(suffix):
            return unit
    return ""


def _merge(
    data: MetricsData | None, extra: ScopeMetrics | None, resource: Resource
) -> MetricsData | None:
    if extra is None:
        return data
    if data is None or not data.resource_metrics:
        return MetricsData([ResourceMetrics(resource, [extra], resource.schema_url or "")])
    first, *rest = data.resource_metrics
    merged = ResourceMetrics(first.resource, [*first.scope_metrics, extra], first.schema_url)
    return MetricsData([merged, *rest])


def _attach(reader: MetricReader, producer: RegistryProducer, resource: Resource) -> None:
    """Make ``reader`` collect the producer's points along with the SDK's own.

    The spec's ``MetricProducer`` hook, done by hand: the reader's collect callback (set by the
    MeterProvider when the reader was registered) is wrapped so its result gets our scope.
    """
    sdk_collect: Any = getattr(reader, "_collect", None)
    if sdk_collect is None:
        raise RuntimeError("the reader must be registered on a MeterProvider first")

    def collect(r: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        return _merge(
            sdk_collect(r, timeout_millis=timeout_millis), producer.scope_metrics(), resource
        )

    reader._set_collect_callback(collect)  # type: ignore[arg-type]


_INSTANCE_ID: Final = str(uuid.uuid4())


def service_resource(service_name: str) -> Resource:
    """The OpenTelemetry resource of this process: ``service.name`` and a
    ``service.instance.id`` of its own, so the series and spans of several workers (or
    replicas) stay apart at the collector instead of overwriting each other."""
    return Resource.create({SERVICE_NAME: service_name, SERVICE_INSTANCE_ID: _INSTANCE_ID})


def build_meter_provider(
    registry: ours.Registry,
    *,
    exporters: Collection[str] = _PROMETHEUS_ONLY,
    otlp_endpoint: str | None = None,
    export_interval_s: float = 60.0,
    service_name: str = "extproc",
    readers: Sequence[MetricReader] = (),
    set_global: bool = False,
) -> MeterProvider:
    """The process's MeterProvider, fed by ``registry`` at each collection.

    ``exporters``: ``prometheus`` (pulled by :func:`render_metrics` for ``/metrics``), ``otlp``
    (pushed every ``export_interval_s`` to ``otlp_endpoint`` over gRPC; needs the package
    ``opentelemetry-exporter-otlp-proto-grpc``), ``console`` (pushed to stdout, for debugging).
    ``readers``: more readers (tests pass an ``InMemoryMetricReader``). ``set_global`` makes it
    the API's global provider, so plugins' own OpenTelemetry instruments are exported too.
    Call :func:`shutdown_meter_provider` at process exit (a last push to the exporters).
    """
    unknown = set(exporters) - _EXPORTERS
    if unknown:
        raise ValueError(f"unknown metrics exporters: {sorted(unknown)}")
    all_readers: list[MetricReader] = list(readers)
    prom_registry: Any = None
    if "prometheus" in exporters:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        prom_registry = CollectorRegistry(auto_describe=False)
        all_readers.append(
            PrometheusMetricReader(
                # no target_info family and no otel_scope_* labels: exactly our series
                disable_target_info=True,
                scope_info_enabled=False,
                registry=prom_registry,
            )
        )
    if "otlp" in exporters:
        all_readers.append(_periodic(_otlp_metric_exporter(otlp_endpoint), export_interval_s))
    if "console" in exporters:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        all_readers.append(_periodic(ConsoleMetricExporter(), export_interval_s))
    resource = service_resource(service_name)
    provider = MeterProvider(metric_readers=all_readers, resource=resource)
    producer = RegistryProducer(registry)
    for reader in all_readers:
        _attach(reader, producer, resource)
    if prom_registry is not None:
        _EXPOSITIONS[provider] = prom_registry
    if set_global:
        from opentelemetry import metrics as otel_metrics

        otel_metrics.set_meter_provider(provider)
    return provider


def shutdown_meter_provider(provider: MeterProvider, timeout_s: float = 5.0) -> None:
    """Flush the push exporters once more and stop; never raises (the SDK raises when an
    exporter misses the deadline, e.g. an unreachable collector): logs instead."""
    try:
        provider.shutdown(timeout_millis=timeout_s * 1000)
    except Exception as exc:
        log.warning("metrics exporters did not shut down cleanly", extra={"error": str(exc)})


def _periodic(exporter: Any, interval_s: float) -> MetricReader:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    return PeriodicExportingMetricReader(exporter, export_interval_millis=interval_s * 1000)


def _otlp_metric_exporter(endpoint: str | None) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPMetricExporter,
        )
    except ImportError as exc:
        raise RuntimeError(
            "the otlp exporter needs the package opentelemetry-exporter-otlp-proto-grpc"
        ) from exc
    return OTLPMetricExporter(endpoint=endpoint) if endpoint else OTLPMetricExporter()


def render_metrics(source: ours.Registry | MeterProvider) -> tuple[bytes, str]:
    """The body and content type of ``/metrics``.

    A provider from :func:`build_meter_provider` with the ``prometheus`` exporter renders
    through the OpenTelemetry SDK; a bare :class:`Registry` renders its own text (the
    reference the SDK path is tested against, and the fallback before OTel is set up).
    """
    if isinstance(source, ours.Registry):
        return source.render_prometheus().encode(), PROMETHEUS_CONTENT_TYPE
    prom_registry = _EXPOSITIONS.get(source)
    if prom_registry is None:
        raise ValueError("this MeterProvider has no prometheus exporter")
    from prometheus_client import generate_latest

    return generate_latest(prom_registry), PROMETHEUS_CONTENT_TYPE
