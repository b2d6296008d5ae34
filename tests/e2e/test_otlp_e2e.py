"""Traces and metrics leave the sidecar over OTLP/gRPC, as a collector receives them: client ->
real Envoy -> sidecar process -> echo upstream, with an OTLP receiver (``OtlpSink``) on
127.0.0.1 in place of the collector."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extproc.observability.tracing import STREAM_SPAN_NAME as STREAM
from extproc.testing.otlp import OtlpSink, ReceivedSpan
from extproc.testing.stack import LocalStack

pytestmark = pytest.mark.e2e

CONFIG = """
version: 1
server: {{message_timeout_ms: 300, drain_delay_s: 0}}
tracing: {{exporter: otlp, otlp_endpoint: "{endpoint}", sample_ratio: 1.0, service_name: edge}}
metrics: {{otlp_endpoint: "{endpoint}", export_interval_s: 1}}
plugins:
  - plugin: headers
    config:
      rules: [{{path_prefix: /, request_set: {{x-added: "yes"}}}}]
  - plugin: tests.support.plugins:DenyPlugin
    config: {{path: /deny}}
"""

TRACE_ID = "4bf92f3577b34a4736e6f8b5c1b2a6a1"
CLIENT_SPAN = "00f067aa0ba902b7"


async def test_spans_and_metrics_reach_an_otlp_receiver(tmp_path: Path) -> None:
    with OtlpSink() as sink:
        config = tmp_path / "extproc.yaml"
        config.write_text(CONFIG.format(endpoint=sink.endpoint))
        async with LocalStack(config) as stack:
            ok = await stack.http.get(
                "/ok", headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}
            )
            denied = await stack.http.get("/deny")
            assert (ok.status_code, denied.status_code) == (200, 403)

            def both_streams(spans: list[ReceivedSpan]) -> bool:
                return len([s for s in spans if s.name == STREAM]) >= 2

            # the batch span processor exports on its own schedule (5 s by default)
            spans = await asyncio.to_thread(sink.wait_for_spans, both_streams, 20.0)

            def metrics_in() -> bool:
                return any(name.startswith("extproc_messages") for name in sink.metrics())

            for _ in range(100):  # pushed every second
                if metrics_in():
                    break
                await asyncio.sleep(0.1)
            metrics = sink.metrics()

    # the client's trace continues through Envoy into the sidecar's stream span
    stream = next(s for s in spans if s.trace_id == TRACE_ID and s.name == STREAM)
    assert stream.parent_span_id == CLIENT_SPAN
    children = [s for s in spans if s.parent_span_id == stream.span_id]
    assert {s.name for s in children} >= {"plugin headers"}
    assert stream.resource["service.name"] == "edge"
    assert stream.resource["service.instance.id"]
    # the denied request's stream is a trace of its own, ending in the plugin's answer
    other = next(s for s in spans if s.trace_id != TRACE_ID and s.name == STREAM)
    assert other.attributes.get("extproc.decision") == "respond", other.attributes
    # metrics: our registry's families, under the same resource
    assert metrics_in(), sorted(metrics)
    family = next(m for name, m in metrics.items() if name.startswith("extproc_messages"))
    assert family["resource"]["service.name"] == "edge"
    assert family["resource"]["service.instance.id"] == stream.resource["service.instance.id"]
