"""Tracing cost benchmark (not a test): µs per stream for an unsampled stream (what 99% of
streams pay at the default ratio) vs an OpenTelemetry span under a non-recording sampler, and
what a sampled stream with two plugin calls costs.

    .venv/bin/python bench/tracing_cost.py [--number 200000]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from extproc.config import TracingSettings
from extproc.observability.tracing import configure_tracing, current_stream

METADATA = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
HEADERS = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-request-id": "5b1e0f4c-1b9a-4c53-9b0e-3f0c7f0d8a11",
}


def per_op_us(fn: Callable[[], object], number: int) -> float:
    """Best of 5 runs, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    n = args.number

    exporter = InMemorySpanExporter()
    unsampled = configure_tracing(
        TracingSettings(sample_ratio=0.0), span_processors=[SimpleSpanProcessor(exporter)]
    )
    default_ratio = configure_tracing(
        TracingSettings(sample_ratio=0.01), span_processors=[SimpleSpanProcessor(exporter)]
    )
    sampled = configure_tracing(
        TracingSettings(sample_ratio=1.0), span_processors=[SimpleSpanProcessor(exporter)]
    )
    off = TracerProvider(sampler=ALWAYS_OFF).get_tracer("bench")

    def otel_unsampled_span() -> None:
        off.start_span("stream").end()

    def otel_unsampled_current_span() -> None:
        with off.start_as_current_span("stream"):
            pass

    def sampled_stream() -> None:
        stream = sampled.start_stream(METADATA, HEADERS)
        assert stream is not None
        for plugin in ("jwt_auth", "rate_limit"):
            with stream.plugin_span(plugin, "request_headers") as call:
                call.set_result("continue")
        stream.end("ok", decision="continue")
        exporter.clear()

    def ratio_stream() -> None:
        stream = default_ratio.start_stream(METADATA, HEADERS)
        if stream is not None:
            stream.end()
            exporter.clear()

    ours = per_op_us(lambda: unsampled.start_stream(METADATA, HEADERS), n)
    rows = [
        ("ours start_stream, unsampled (-> None)", ours),
        ("ours current_stream() (chain, per call)", per_op_us(current_stream, n)),
        ("ours start_stream at ratio 0.01 (mixed)", per_op_us(ratio_stream, n)),
        ("otel start_span().end(), ALWAYS_OFF", per_op_us(otel_unsampled_span, n)),
        ("otel start_as_current_span, ALWAYS_OFF", per_op_us(otel_unsampled_current_span, n)),
        ("ours sampled: stream + 2 plugin spans", per_op_us(sampled_stream, n // 20)),
    ]
    print(f"{'per stream':44} {'µs/op':>8} {'x ours':>8}")
    for name, us in rows:
        print(f"{name:44} {us:8.3f} {us / ours:8.1f}")
    for tracer in (unsampled, default_ratio, sampled):
        tracer.shutdown()


if __name__ == "__main__":
    main()
