"""Hot-path metrics: cheap, pre-bound, in-process aggregates.

Recording is a dict lookup done once (``labels(...)`` returns a bound child to keep) and then an
integer/float add, well under a microsecond. The aggregates are read at collection time by the
exporters (Prometheus text on ``/metrics``, and the OpenTelemetry bridge), never per request.

Names follow ``extproc_*_total`` (counters) and ``extproc_*_seconds`` (histograms).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "LATENCY_BUCKETS",
    "BoundCounter",
    "BoundHistogram",
    "Counter",
    "Gauge",
    "Histogram",
    "PluginMetrics",
    "Registry",
]

#: seconds; fine below a millisecond, where plugin work lives, up to the message budget
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class BoundCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class BoundHistogram:
    __slots__ = ("_bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value

    def quantile(self, q: float) -> float:
        """Estimate a quantile by linear interpolation inside the bucket (as Prometheus'
        ``histogram_quantile`` does)."""
        if self.count == 0:
            return math.nan
        rank = q * self.count
        seen = 0
        lower = 0.0
        for i, n in enumerate(self.counts):
            upper = self._bounds[i] if i < len(self._bounds) else self._bounds[-1]
            if seen + n >= rank and n:
                return lower + (upper - lower) * (rank - seen) / n
            seen += n
            lower = upper
        return self._bounds[-1]


@dataclass(slots=True)
class _Family:
    name: str
    description: str
    label_names: tuple[str, ...]
    kind: str
    children: dict[tuple[str, ...], object] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Labelled:
    """A metric family whose series are bound once per label values and then kept."""

    def __init__(self, family: _Family) -> None:
        self._f = family

    def _child(self, values: tuple[str, ...], make: Callable[[], object]) -> object:
        child = self._f.children.get(values)
        if child is None:
            if len(values) != len(self._f.label_names):
                raise ValueError(f"{self._f.name} takes labels {self._f.label_names}")
            with self._f.lock:
                child = self._f.children.setdefault(values, make())
        return child


class Counter(_Labelled):
    """A monotonically increasing count, by labels."""

    def labels(self, *values: str) -> BoundCounter:
        child = self._child(values, BoundCounter)
        assert isinstance(child, BoundCounter)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class Histogram(_Labelled):
    """A distribution (durations in seconds), by labels, with fixed buckets."""

    def __init__(self, family: _Family, buckets: tuple[float, ...]) -> None:
        super().__init__(family)
        self.buckets = buckets

    def labels(self, *values: str) -> BoundHistogram:
        child = self._child(values, lambda: BoundHistogram(self.buckets))
        assert isinstance(child, BoundHistogram)
        return child

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class Gauge:
    """A value read at collection time from a callback returning ``{label values: value}``."""

    def __init__(
        self, family: _Family, callback: Callable[[], Iterable[tuple[tuple[str, ...], float]]]
    ) -> None:
        self._f = family
        self.callback = callback


class Registry:
    """All metric families of one process."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[_Family, Counter | Histogram | Gauge]] = {}
        self._lock = threading.Lock()

    def _family(self, name: str, description: str, labels: Sequence[str], kind: str) -> _Family:
        return _Family(name, description, tuple(labels), kind)

    def counter(self, name: str, description: str, labels: Sequence[str] = ()) -> Counter:
        return self._get(name, description, labels, "counter", Counter)  # type: ignore[return-value]

    def histogram(
        self,
        name: str,
        description: str,
        labels: Sequence[str] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._get(name, description, labels, "histogram", lambda f: Histogram(f, buckets))  # type: ignore[return-value]

    def gauge(
        self,
        name: str,
        description: str,
        callback: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: Sequence[str] = (),
    ) -> Gauge:
        with self._lock:
            fam = self._family(name, description, labels, "gauge")
            gauge = Gauge(fam, callback)
            self._families[name] = (fam, gauge)  # a reload re-binds the callback
            return gauge

    def _get(
        self,
        name: str,
        description: str,
        labels: Sequence[str],
        kind: str,
        make: Callable[[_Family], Counter | Histogram],
    ) -> Counter | Histogram:
        with self._lock:
            existing = self._families.get(name)
            if existing is not None:
                fam, metric = existing
                if fam.kind != kind or fam.label_names != tuple(labels):
                    raise ValueError(f"metric {name} already registered with another shape")
                assert not isinstance(metric, Gauge)
                return metric
            fam = self._family(name, description, labels, kind)
            metric = make(fam)
            self._families[name] = (fam, metric)
            return metric

    def collect(self) -> Iterator[tuple[_Family, Counter | Histogram | Gauge]]:
        with self._lock:
            items = list(self._families.values())
        yield from items

    def render_prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        for fam, metric in self.collect():
            out.append(f"# HELP {fam.name} {fam.description}")
            out.append(f"# TYPE {fam.name} {fam.kind}")
            if isinstance(metric, Gauge):
                try:
                    samples = list(metric.callback())
                except Exception:  # a broken callback must not break /metrics
                    samples = []
                for values, v in samples:
                    out.append(f"{fam.name}{_labels(fam.label_names, values)} {_num(v)}")
                continue
            for values, child in list(fam.children.items()):
                if isinstance(child, BoundCounter):
                    out.append(f"{fam.name}{_labels(fam.label_names, values)} {_num(child.value)}")
                elif isinstance(child, BoundHistogram):
                    assert isinstance(metric, Histogram)
                    cumulative = 0
                    for bound, n in zip(metric.buckets, child.counts, strict=False):
                        cumulative += n
                        lbl = _labels((*fam.label_names, "le"), (*values, _num(bound)))
                        out.append(f"{fam.name}_bucket{lbl} {cumulative}")
                    lbl = _labels((*fam.label_names, "le"), (*values, "+Inf"))
                    out.append(f"{fam.name}_bucket{lbl} {child.count}")
                    base = _labels(fam.label_names, values)
                    out.append(f"{fam.name}_sum{base} {_num(child.sum)}")
                    out.append(f"{fam.name}_count{base} {child.count}")
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class PluginMetrics:
    """The metrics a plugin gets through its context: every name is prefixed with
    ``extproc_<plugin>_`` so plugins cannot collide with each other or with the core."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self.prefix = f"extproc_{plugin}_"

    def counter(self, name: str, description: str, labels: Sequence[str] = ()) -> Counter:
        return self._registry.counter(self.prefix + name, description, labels)

    def histogram(
        self,
        name: str,
        description: str,
        labels: Sequence[str] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._registry.histogram(self.prefix + name, description, labels, buckets)

    def gauge(
        self,
        name: str,
        description: str,
        callback: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: Sequence[str] = (),
    ) -> Gauge:
        return self._registry.gauge(self.prefix + name, description, callback, labels)
