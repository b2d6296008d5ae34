"""Traces: one span per ext_proc stream, a child span per plugin call.

Sampling is decided **once per stream, locally**: :meth:`StreamTracer.start_stream` draws a
random number against ``tracing.sample_ratio`` before it reads anything, and an unsampled
stream gets ``None``: no span, no context, no parsing (~0.1 µs; an OpenTelemetry span costs
~8 µs even when its sampler drops it). The draw ignores the parent entirely: a client sending
``traceparent: ...-01`` cannot force tracing, and neither can a client choosing a trace id that
a trace-id-ratio sampler would always keep. A sampled stream keeps the parent's trace id so the
trace links up.

The parent is, in order: Envoy's span context in the gRPC initial metadata (Envoy's own
ext_proc client span, when Envoy tracing is on; ``traceparent``/``tracestate`` with the
OpenTelemetry tracer, ``b3`` or ``x-b3-*`` with Zipkin), else the HTTP request's W3C
``traceparent``. When both are there and differ, the request's is added as a link.

The SDK's sampler (:class:`StreamSampler`) agrees with that: a span without a local parent is
sampled only when :meth:`StreamTracer.start_stream` decided so; spans under a sampled local
parent (our plugin spans, and a plugin's own spans through the OpenTelemetry API) follow it.

This is the only module that configures the tracing SDK.
"""

from __future__ import annotations

import contextlib
import logging
import random as _random
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from extproc.config import TracingSettings
from extproc.observability.otel import service_resource

__all__ = [
    "PluginSpan",
    "StreamSampler",
    "StreamSpan",
    "StreamTracer",
    "TraceIdFilter",
    "configure_tracing",
    "current_stream",
    "current_trace_id",
    "extract_parent",
]

Metadata = Sequence[tuple[str, str | bytes]]

STREAM_SPAN_NAME: Final = "envoy.service.ext_proc.v3.ExternalProcessor/Process"
_STREAM_ATTRIBUTES: Final = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.ext_proc.v3.ExternalProcessor",
    "rpc.method": "Process",
}
_ERROR_ENDS: Final = frozenset({"remote_error", "local_error", "idle"})
_MAX_HEADER: Final = 512  # the W3C propagator's own limit; longer values are ignored quietly
_HEX16: Final = re.compile(r"[0-9a-f]{16}")
_HEX16_32: Final = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_W3C: Final = TraceContextTextMapPropagator()
_TRACE_KEYS: Final = frozenset(
    {"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"}
)

#: the marker start_stream puts in the context of a stream span it decided to sample
_DECIDED: Final = otel_context.create_key("extproc-stream-sampled")
#: the sampled stream of the running task (and the tasks it starts); unset when unsampled
_STREAM: ContextVar[StreamSpan | None] = ContextVar("extproc_stream_span", default=None)


def current_stream() -> StreamSpan | None:
    """The sampled stream the current task serves, or ``None`` (~0.05 µs)."""
    return _STREAM.get()


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the current sampled stream, for log lines."""
    span = _STREAM.get()
    return span.trace_id if span is not None else None


class TraceIdFilter(logging.Filter):
    """A logging filter that adds ``trace_id`` to records emitted inside a sampled stream.

    Install it on the handler (``handler.addFilter(TraceIdFilter())``); it never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        span = _STREAM.get()
        if span is not None and not hasattr(record, "trace_id"):
            record.trace_id = span.trace_id
        return True


class StreamSampler(Sampler):
    """Samples a span without a local parent only when :class:`StreamTracer` decided so; a
    span with a sampled local parent follows it. A remote parent's flag is never trusted."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if parent.is_valid and not parent.is_remote:
            sampled = parent.trace_flags.sampled
        else:
            sampled = otel_context.get_value(_DECIDED, parent_context) is True
        state = parent.trace_state if parent.is_valid else None
        if not sampled:
            return SamplingResult(Decision.DROP, None, state)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)

    def get_description(self) -> str:
        return "ExtprocStreamSampler"


def _w3c(traceparent: str | None, tracestate: str | None) -> SpanContext | None:
    if not traceparent or len(traceparent) > _MAX_HEADER:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate and len(tracestate) <= _MAX_HEADER:
        carrier["tracestate"] = tracestate
    parent = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return parent if parent.is_valid else None


def _b3(trace_id: str | None, span_id: str | None) -> SpanContext | None:
    if not trace_id or not span_id:
        return None
    trace_id, span_id = trace_id.lower(), span_id.lower()
    if not _HEX16_32.fullmatch(trace_id) or not _HEX16.fullmatch(span_id):
        return None
    parent = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(0))
    return parent if parent.is_valid else None


def _b3_single(value: str | None) -> SpanContext | None:
    if not value or len(value) > _MAX_HEADER:
        return None
    parts = value.split("-")
    return _b3(parts[0], parts[1]) if len(parts) >= 2 else None


def _metadata_parent(metadata: Metadata) -> SpanContext | None:
    found: dict[str, str] = {}
    for key, value in metadata:
        if key in _TRACE_KEYS and key not in found:
            found[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    if not found:
        return None
    return (
        _w3c(found.get("traceparent"), found.get("tracestate"))
        or _b3_single(found.get("b3"))
        or _b3(found.get("x-b3-traceid"), found.get("x-b3-spanid"))
    )


def extract_parent(
    metadata: Metadata, request_headers: Mapping[str, str] | None
) -> tuple[SpanContext | None, SpanContext | None]:
    """``(from Envoy's gRPC metadata, from the request's traceparent)``; malformed values are
    ignored. Both are remote span contexts; their sampled flags mean nothing to us."""
    envoy = _metadata_parent(metadata)
    request = None
    if request_headers is not None:
        request = _w3c(request_headers.get("traceparent"), request_headers.get("tracestate"))
    return envoy, request


class PluginSpan:
    """The span of one plugin call; a context manager that makes it the current span, so a
    plugin's own OpenTelemetry spans nest under it. An exception leaving the block marks the
    span as an error (and is not swallowed)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._token: object = None

    def set_result(self, result: str) -> None:
        """The plugin's result: continue, respond, reject, failed, shadow_deny."""
        self.span.set_attribute("extproc.result", result)

    def __enter__(self) -> PluginSpan:
        self._token = otel_context.attach(trace.set_span_in_context(self.span, Context()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.span.set_status(Status(StatusCode.ERROR, exc_type.__name__))
            self.span.set_attribute("error.type", exc_type.__qualname__)
        otel_context.detach(self._token)  # type: ignore[arg-type]
        self.span.end()


class StreamSpan:
    """The span of one sampled stream. Created by :meth:`StreamTracer.start_stream` only."""

    __slots__ = (
        "_ctx",
        "_ended",
        "_messages",
        "_token",
        "_tracer",
        "request_id",
        "span",
        "trace_id",
    )

    def __init__(self, tracer: trace.Tracer, span: trace.Span, request_id: str | None) -> None:
        self._tracer = tracer
        self.span = span
        self.request_id = request_id
        self.trace_id = format(span.get_span_context().trace_id, "032x")
        self._ctx = trace.set_span_in_context(span, Context())
        self._messages: dict[str, int] = {}
        self._ended = False
        self._token: Token[StreamSpan | None] | None = _STREAM.set(self)

    def message(self, phase: str) -> None:
        """Count one message of ``phase`` (reported as ``extproc.messages.<phase>``)."""
        self._messages[phase] = self._messages.get(phase, 0) + 1

    def plugin_span(self, plugin: str, phase: str) -> PluginSpan:
        """A child span for one plugin call: ``with stream.plugin_span(name, phase) as p:``."""
        span = self._tracer.start_span(
            f"plugin {plugin}",
            context=self._ctx,
            kind=SpanKind.INTERNAL,
            attributes={"extproc.plugin": plugin, "extproc.phase": phase},
        )
        return PluginSpan(span)

    def end(
        self,
        outcome: str = "ok",
        *,
        decision: str | None = None,
        status_code: int | None = None,
        responder: str | None = None,
        error: str | None = None,
    ) -> None:
        """Close the stream span (once; later calls do nothing).

        ``outcome``: how the stream ended (the ``end`` label of ``extproc_streams_total``);
        ``decision``: continue / respond / reject; ``status_code``: the immediate response's
        HTTP status; ``responder``: the plugin that answered.
        """
        if self._ended:
            return
        self._ended = True
        span = self.span
        span.set_attribute("extproc.end", outcome)
        for phase, n in self._messages.items():
            span.set_attribute(f"extproc.messages.{phase}", n)
        if decision is not None:
            span.set_attribute("extproc.decision", decision)
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
        if responder is not None:
            span.set_attribute("extproc.responder", responder)
        if error is not None or outcome in _ERROR_ENDS:
            span.set_status(Status(StatusCode.ERROR, error or outcome))
        span.end()
        if self._token is not None:
            # ValueError: ended from another context, which never saw it set
            with contextlib.suppress(ValueError):
                _STREAM.reset(self._token)
            self._token = None


class StreamTracer:
    """Starts stream spans for the sampled share of streams; see the module doc."""

    __slots__ = ("_random", "_tracer", "provider", "ratio")

    def __init__(
        self,
        provider: TracerProvider | None,
        ratio: float,
        *,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("sample ratio must be within [0, 1]")
        self.provider = provider
        self.ratio = ratio if provider is not None else 0.0
        self._random = random
        self._tracer = provider.get_tracer("extproc") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self.ratio > 0.0

    def start_stream(
        self,
        metadata: Metadata | Callable[[], Metadata | None] = (),
        request_headers: Mapping[str, str] | None = None,
        *,
        start_time: int | None = None,
    ) -> StreamSpan | None:
        """Decide whether this stream is traced; if so, start its span and return it.

        Call it once per stream, when the first message (request headers) arrives, with the
        stream's gRPC invocation metadata and the request's headers (lower-case names).
        ``metadata`` may be a callable (``context.invocation_metadata``), called only when the
        stream is sampled, so unsampled streams never build it.
        ``start_time``: epoch nanoseconds, when the span should start (default now).
        Returns ``None`` for an unsampled stream: create nothing then.
        """
        if self._random() >= self.ratio:
            return None
        tracer = self._tracer
        assert tracer is not None
        if callable(metadata):
            metadata = metadata() or ()
        envoy, request = extract_parent(metadata, request_headers)
        parent = envoy or request
        ctx = Context()
        if parent is not None:
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent), ctx)
        ctx = otel_context.set_value(_DECIDED, True, ctx)
        request_id = request_headers.get("x-request-id") if request_headers is not None else None
        attributes: dict[str, str] = dict(_STREAM_ATTRIBUTES)
        if request_id:
            attributes["extproc.request_id"] = request_id
        links = None
        if envoy is not None and request is not None and request.trace_id != envoy.trace_id:
            links = [Link(request, {"extproc.link": "request_traceparent"})]
        span = tracer.start_span(
            STREAM_SPAN_NAME,
            context=ctx,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
            start_time=start_time,
        )
        return StreamSpan(tracer, span, request_id)

    def shutdown(self) -> None:
        """Flush and stop the exporters (at process exit)."""
        if self.provider is not None:
            self.provider.shutdown()


def configure_tracing(
    settings: TracingSettings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    set_global: bool = False,
    random: Callable[[], float] = _random.random,
) -> StreamTracer:
    """The process's stream tracer, from the ``tracing`` section.

    ``exporter: none`` with no ``span_processors`` gives a tracer that never samples (nothing
    would see the spans). ``console`` and ``otlp`` export through a ``BatchSpanProcessor`` (off
    the event loop); ``otlp`` needs the package ``opentelemetry-exporter-otlp-proto-grpc``.
    ``span_processors``: more processors (tests pass a ``SimpleSpanProcessor`` over an
    ``InMemorySpanExporter``). ``set_global`` makes the provider the API's global one, so
    plugins' own spans join the stream's trace.
    """
    processors = list(span_processors)
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    elif settings.exporter == "otlp":
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processors.append(BatchSpanProcessor(_otlp_span_exporter(settings.otlp_endpoint)))
    if not processors:
        return StreamTracer(None, 0.0)
    provider = TracerProvider(
        sampler=StreamSampler(),
        resource=service_resource(settings.service_name),
    )
    for processor in processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    return StreamTracer(provider, settings.sample_ratio, random=random)


def _otlp_span_exporter(endpoint: str | None) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter,
        )
    except ImportError as exc:
        raise RuntimeError(
            "tracing.exporter otlp needs the package opentelemetry-exporter-otlp-proto-grpc"
        ) from exc
    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
