"""Stream tracing: sampled once per stream by a local ratio, parents from Envoy or the request,
nothing created for unsampled streams."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, Tracer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from extproc.config import TracingSettings
from extproc.observability.tracing import (
    StreamTracer,
    TraceIdFilter,
    configure_tracing,
    current_stream,
    current_trace_id,
)

ENVOY_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ENVOY_SPAN = "00f067aa0ba902b7"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
ENVOY_TP = f"00-{ENVOY_TRACE}-{ENVOY_SPAN}-01"
CLIENT_TP = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture(autouse=True)
def no_stream_left() -> Iterator[None]:
    """Streams are task-scoped in the server; here every test must end what it starts."""
    assert current_stream() is None
    yield
    assert current_stream() is None


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracers(exporter: InMemorySpanExporter) -> Iterator[list[StreamTracer]]:
    made: list[StreamTracer] = []
    yield made
    for tracer in made:
        tracer.shutdown()


def make(
    ratio: float, exporter: InMemorySpanExporter, tracers: list[StreamTracer], **kw: object
) -> StreamTracer:
    tracer = configure_tracing(
        TracingSettings(sample_ratio=ratio),
        span_processors=[SimpleSpanProcessor(exporter)],
        **kw,  # type: ignore[arg-type]
    )
    tracers.append(tracer)
    return tracer


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_ratio_zero_creates_no_span_even_when_the_client_asks(
    exporter: InMemorySpanExporter,
    tracers: list[StreamTracer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[str] = []
    original = Tracer.start_span

    def start_span(self: Tracer, name: str, *args: Any, **kwargs: Any) -> Any:
        started.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(Tracer, "start_span", start_span)
    tracer = make(0.0, exporter, tracers)
    for _ in range(200):
        stream = tracer.start_stream(
            [("traceparent", ENVOY_TP)], {"traceparent": CLIENT_TP, "x-request-id": "r"}
        )
        assert stream is None
    assert started == []
    assert exporter.get_finished_spans() == ()
    assert current_stream() is None and current_trace_id() is None


def test_the_decision_is_local_whatever_the_parent_flag_says(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    draws = iter([0.9, 0.1, 0.9, 0.1])
    tracer = make(0.5, exporter, tracers, random=lambda: next(draws))
    assert tracer.start_stream([("traceparent", ENVOY_TP)], {"traceparent": CLIENT_TP}) is None
    # the client said "not sampled"; the local draw wins, and the trace id is kept
    sampled = tracer.start_stream((), {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert sampled is not None and sampled.trace_id == CLIENT_TRACE
    sampled.end()
    assert tracer.start_stream((), {"traceparent": CLIENT_TP}) is None
    last = tracer.start_stream()
    assert last is not None
    last.end()


def test_a_stream_span_with_a_child_per_plugin_call_under_envoy_span(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    stream = tracer.start_stream(
        [("x-envoy-expected-rq-timeout-ms", "200"), ("traceparent", ENVOY_TP)],
        {"traceparent": CLIENT_TP, "x-request-id": "req-1", ":path": "/"},
    )
    assert stream is not None
    assert current_stream() is stream and current_trace_id() == ENVOY_TRACE
    stream.message("request_headers")
    with stream.plugin_span("jwt_auth", "request_headers") as call:
        call.set_result("continue")
    with stream.plugin_span("rate_limit", "request_headers") as call:
        call.set_result("reject")
    stream.message("response_headers")
    stream.end("ok", decision="reject", status_code=429, responder="rate_limit")
    assert current_stream() is None

    spans = by_name(exporter)
    assert set(spans) == {
        "envoy.service.ext_proc.v3.ExternalProcessor/Process",
        "plugin jwt_auth",
        "plugin rate_limit",
    }
    root = spans["envoy.service.ext_proc.v3.ExternalProcessor/Process"]
    assert root.kind is SpanKind.SERVER
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == ENVOY_SPAN
    assert format(root.context.trace_id, "032x") == ENVOY_TRACE
    assert root.context.trace_flags.sampled
    attrs = dict(root.attributes or {})
    assert attrs["extproc.request_id"] == "req-1"
    assert attrs["extproc.decision"] == "reject"
    assert attrs["http.response.status_code"] == 429
    assert attrs["extproc.responder"] == "rate_limit"
    assert attrs["extproc.messages.request_headers"] == 1
    assert attrs["extproc.messages.response_headers"] == 1
    assert attrs["rpc.system"] == "grpc"
    # the client's own trace is linked, not lost
    (link,) = root.links
    assert format(link.context.trace_id, "032x") == CLIENT_TRACE
    for name, result in (("plugin jwt_auth", "continue"), ("plugin rate_limit", "reject")):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
        assert dict(child.attributes or {})["extproc.result"] == result
        assert dict(child.attributes or {})["extproc.phase"] == "request_headers"


def test_metadata_is_read_only_for_sampled_streams(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    calls: list[int] = []

    def invocation_metadata() -> list[tuple[str, str]]:
        calls.append(1)
        return [("traceparent", ENVOY_TP)]

    assert make(0.0, exporter, tracers).start_stream(invocation_metadata, None) is None
    assert calls == []
    stream = make(1.0, exporter, tracers).start_stream(invocation_metadata, None)
    assert stream is not None and stream.trace_id == ENVOY_TRACE and calls == [1]
    stream.end()


def test_the_request_traceparent_is_the_parent_without_envoy_tracing(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    stream = tracer.start_stream([("content-type", "application/grpc")], {"traceparent": CLIENT_TP})
    assert stream is not None and stream.trace_id == CLIENT_TRACE
    stream.end()
    (root,) = exporter.get_finished_spans()
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
    assert root.links == ()


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
        f"00-{CLIENT_TRACE}-{'0' * 16}-01",
        f"00-{CLIENT_TRACE[:-1]}-{CLIENT_SPAN}-01",
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01" + "x" * 600,
    ],
)
def test_a_malformed_traceparent_is_ignored(
    bad: str, exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    stream = tracer.start_stream([("traceparent", bad)], {"traceparent": bad})
    assert stream is not None and stream.trace_id != CLIENT_TRACE
    stream.end()
    (root,) = exporter.get_finished_spans()
    assert root.parent is None
    # a bad value in the metadata falls back to a good one in the request
    exporter.clear()
    stream = tracer.start_stream([("traceparent", bad)], {"traceparent": CLIENT_TP})
    assert stream is not None and stream.trace_id == CLIENT_TRACE
    stream.end()


def test_envoy_b3_metadata_is_a_parent(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    multi = tracer.start_stream(
        [("x-b3-traceid", ENVOY_TRACE.encode()), ("x-b3-spanid", ENVOY_SPAN.encode())],
        {"traceparent": CLIENT_TP},
    )
    assert multi is not None and multi.trace_id == ENVOY_TRACE
    multi.end()
    single = tracer.start_stream([("b3", f"{ENVOY_TRACE[16:]}-{ENVOY_SPAN}-1")], None)
    assert single is not None and single.trace_id == ENVOY_TRACE[16:].rjust(32, "0")
    single.end()
    bad = tracer.start_stream([("b3", "0x12-0x34")], None)
    assert bad is not None and bad.trace_id not in (ENVOY_TRACE, "0" * 30 + "12")
    bad.end()


def test_a_failing_plugin_marks_its_span_and_the_error_propagates(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    stream = tracer.start_stream()
    assert stream is not None
    with pytest.raises(TimeoutError), stream.plugin_span("slow", "request_body"):
        raise TimeoutError
    stream.end("local_error")
    spans = by_name(exporter)
    assert spans["plugin slow"].status.status_code is StatusCode.ERROR
    assert dict(spans["plugin slow"].attributes or {})["error.type"] == "TimeoutError"
    root = spans["envoy.service.ext_proc.v3.ExternalProcessor/Process"]
    assert root.status.status_code is StatusCode.ERROR
    stream.end("ok")  # a second end does nothing
    assert len(exporter.get_finished_spans()) == 2


def test_plugin_spans_through_the_api_nest_and_stray_roots_are_dropped(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    assert tracer.provider is not None
    api_tracer = tracer.provider.get_tracer("a.plugin")
    with api_tracer.start_as_current_span("outside any stream") as stray:
        assert not stray.is_recording()
    stream = tracer.start_stream()
    assert stream is not None
    with (
        stream.plugin_span("jwt_auth", "request_headers"),
        api_tracer.start_as_current_span("jwks"),
    ):
        pass
    stream.end()
    spans = by_name(exporter)
    assert "outside any stream" not in spans
    assert spans["jwks"].parent is not None
    assert spans["jwks"].parent.span_id == spans["plugin jwt_auth"].context.span_id


def test_log_records_carry_the_trace_id(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)
    filt = TraceIdFilter()
    record = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
    assert filt.filter(record) and not hasattr(record, "trace_id")
    stream = tracer.start_stream((), {"traceparent": CLIENT_TP})
    assert stream is not None
    assert filt.filter(record) and getattr(record, "trace_id", None) == CLIENT_TRACE
    stream.end()
    assert current_trace_id() is None


def test_exporter_none_without_processors_never_samples() -> None:
    tracer = configure_tracing(TracingSettings(exporter="none", sample_ratio=1.0))
    assert not tracer.enabled and tracer.provider is None
    assert tracer.start_stream([("traceparent", ENVOY_TP)], {"traceparent": CLIENT_TP}) is None


def test_otlp_without_its_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(RuntimeError, match="opentelemetry-exporter-otlp-proto-grpc"):
        configure_tracing(TracingSettings(exporter="otlp"))


def test_otlp_exporter_is_wired() -> None:
    importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    tracer = configure_tracing(
        TracingSettings(exporter="otlp", otlp_endpoint="http://127.0.0.1:4317", sample_ratio=0.5)
    )
    try:
        assert tracer.enabled and tracer.ratio == 0.5
    finally:
        tracer.shutdown()


async def test_the_stream_is_scoped_to_its_task_and_the_tasks_it_starts(
    exporter: InMemorySpanExporter, tracers: list[StreamTracer]
) -> None:
    tracer = make(1.0, exporter, tracers)

    async def in_child_task() -> str | None:
        await asyncio.sleep(0)
        return current_trace_id()

    async def process(traceparent: str) -> tuple[str | None, str | None]:
        stream = tracer.start_stream((), {"traceparent": traceparent})
        assert stream is not None
        try:
            # the server runs a slow message in a task of its own (override_message_timeout)
            inner = await asyncio.ensure_future(in_child_task())
            return current_trace_id(), inner
        finally:
            stream.end()

    other = f"00-{ENVOY_TRACE}-{ENVOY_SPAN}-00"
    results = await asyncio.gather(process(CLIENT_TP), process(other))
    assert list(results) == [(CLIENT_TRACE, CLIENT_TRACE), (ENVOY_TRACE, ENVOY_TRACE)]
    assert current_stream() is None
    assert len(exporter.get_finished_spans()) == 2
