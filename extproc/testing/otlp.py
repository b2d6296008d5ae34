"""An OTLP/gRPC receiver for tests and benches: what a collector would be sent, kept in memory.

::

    with OtlpSink() as sink:
        config = {"tracing": {"exporter": "otlp", "otlp_endpoint": sink.endpoint}}
        ...
        spans = sink.wait_for_spans(lambda spans: any(s.name == STREAM_SPAN_NAME for s in spans))

(``STREAM_SPAN_NAME`` from :mod:`extproc.observability.tracing` names each stream's span; each
plugin call is a child of it.) The sink listens on 127.0.0.1 on a port the OS picks, in
plaintext (``sink.endpoint`` is an ``http://`` URL, which the OpenTelemetry exporters read as
"no TLS"), and answers every ``Export`` of the trace and metrics services with success. Needs
the ``otlp`` extra (``opentelemetry-exporter-otlp-proto-grpc``, which brings
``opentelemetry-proto``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc

__all__ = ["OtlpSink", "ReceivedSpan"]


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as the receiver got it (ids in hex, attributes as plain values)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    status_code: int = 0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


class OtlpSink:
    """A plaintext OTLP/gRPC receiver for traces and metrics (use as a context manager)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._spans: list[ReceivedSpan] = []
        self._metrics: dict[str, dict[str, Any]] = {}
        self.trace_exports = 0
        self.metric_exports = 0
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2,
            metrics_service_pb2_grpc,
        )
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        sink = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                sink._take_spans(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                sink._take_metrics(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ received

    def _take_spans(self, request: Any) -> None:
        received = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    received.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes=_attributes(s.attributes),
                            resource=resource,
                            scope=ss.scope.name,
                            status_code=s.status.code,
                        )
                    )
        with self._changed:
            self._spans.extend(received)
            self.trace_exports += 1
            self._changed.notify_all()

    def _take_metrics(self, request: Any) -> None:
        latest: dict[str, dict[str, Any]] = {}
        for rm in request.resource_metrics:
            resource = _attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    latest[m.name] = {"kind": m.WhichOneof("data"), "resource": resource}
        with self._changed:
            self._metrics.update(latest)
            self.metric_exports += 1
            self._changed.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Metric name -> its data kind (``sum``, ``histogram``, ``gauge`` ...) and resource,
        as last exported."""
        with self._lock:
            return dict(self._metrics)

    def wait_for_spans(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Block until ``done(spans)`` holds for the spans received so far; TimeoutError with
        what arrived otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self._spans})
                    raise TimeoutError(
                        f"OTLP sink: condition not met in {timeout:g}s; "
                        f"{len(self._spans)} spans received ({names})"
                    )
                self._changed.wait(left)
            return list(self._spans)
