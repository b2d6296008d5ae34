"""The real server on a free port, driven by FakeEnvoy over gRPC (grpc's C-core client), on
both transports: grpc.aio and extproc's own HTTP/2 (every test runs on each)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import ConfigError, load_config
from extproc.protocol.events import BodySendMode
from extproc.server import Server
from extproc.testing.fake_envoy import EnvoyMode, FakeEnvoy, _Grpc
from extproc.testing.processes import free_port
from tests.support import TRANSPORTS

HEADERS_CONFIG = """
version: 1
server: {{listen: "127.0.0.1:0", admin: "127.0.0.1:0", message_timeout_ms: 200,
         drain_delay_s: 0.5, transport: {transport}}}
plugins:
  - plugin: headers
    config:
      request_id_header: x-rid
      rules: [{{path_prefix: /, request_set: {{x-added: "{value}"}}, response_set: {{x-out: "1"}}}}]
  - plugin: tests.support.plugins:HangPlugin
    timeout_ms: 50
    fail: {hang_fail}
    config: {{path: /hang, seconds: 5}}
  - plugin: tests.support.plugins:RaisePlugin
    fail: closed
    config: {{path: /raise}}
  - plugin: tests.support.plugins:TeapotPlugin
    config: {{path: /teapot}}
"""


#: the transport of the running test (set by the ``transport`` fixture)
CURRENT = {"transport": "grpcio"}


@pytest.fixture(autouse=True, params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    CURRENT["transport"] = request.param
    yield request.param
    CURRENT["transport"] = "grpcio"


def write_config(path: Path, value: str = "one", hang_fail: str = "closed") -> Path:
    path.write_text(
        HEADERS_CONFIG.format(value=value, hang_fail=hang_fail, transport=CURRENT["transport"])
    )
    return path


@contextlib.asynccontextmanager
async def running(config: Path) -> AsyncIterator[tuple[Server, str]]:
    port = free_port()
    server = Server(
        load_config(config),
        config_path=str(config),
        listen=f"127.0.0.1:{port}",
        admin="127.0.0.1:0",
    )
    await server.start()
    assert (server._http2 is not None) == (CURRENT["transport"] == "http2")
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop()


MODE = EnvoyMode(response_headers=True)


async def test_headers_added_and_response_mutated_over_grpc(tmp_path: Path) -> None:
    async with running(write_config(tmp_path / "c.yaml")) as (_, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            ex = await envoy.request(path="/x", headers={"x-request-id": "r-1"})
        finally:
            await envoy.aclose()
    assert ex.status == 200
    assert ex.upstream_header("x-added") == "one"
    assert ex.header("x-out") == "1"
    assert ex.header("x-rid") == "r-1"


async def test_respond_reaches_the_client_and_stops_the_chain(tmp_path: Path) -> None:
    async with running(write_config(tmp_path / "c.yaml")) as (_, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            ex = await envoy.request(path="/teapot")
        finally:
            await envoy.aclose()
    assert ex.immediate and ex.status == 418
    assert ex.response_body == b"short and stout\n"
    assert ex.header("x-teapot") == "yes"
    assert ex.details == "teapot"
    assert ex.upstream_headers is None


@pytest.mark.parametrize(("policy", "status"), [("closed", 503), ("open", 200)])
async def test_hanging_plugin_gets_its_failure_policy_within_the_budget(
    tmp_path: Path, policy: str, status: int
) -> None:
    async with running(write_config(tmp_path / "c.yaml", hang_fail=policy)) as (_, target):
        envoy = FakeEnvoy.connect(target, MODE)
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            ex = await envoy.request(path="/hang")
            elapsed = loop.time() - t0
        finally:
            await envoy.aclose()
    assert ex.status == status
    assert elapsed < 1.0  # 50 ms deadline, generous ceiling for a noisy machine


async def test_raising_plugin_answers_500_without_internals(tmp_path: Path) -> None:
    async with running(write_config(tmp_path / "c.yaml")) as (server, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            ex = await envoy.request(path="/raise")
            ok = await envoy.request(path="/fine")
        finally:
            await envoy.aclose()
        metrics = server.services.registry.render_prometheus()
    assert ex.status == 500
    body = json.loads(ex.response_body)
    assert body == {"error": "internal_error", "message": "The request could not be processed."}
    assert b"hunter2" not in ex.response_body
    assert ok.status == 200  # other requests are unaffected
    assert 'extproc_plugin_errors_total{plugin="raise",kind="exception"} 1' in metrics


async def test_health_admin_and_status(tmp_path: Path) -> None:
    async with running(write_config(tmp_path / "c.yaml")) as (server, target):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "extproc"):
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert server._admin is not None
        base = f"http://127.0.0.1:{server._admin.port}"
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{base}/healthz")).status_code == 200
            ready = await client.get(f"{base}/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            status = (await client.get(f"{base}/status")).json()
            assert status["generation"] == 1
            assert [p["name"] for p in status["plugins"]] == ["hang", "raise", "teapot", "headers"]
            metrics = (await client.get(f"{base}/metrics")).text
            assert "extproc_config_generation 1" in metrics
            assert 'extproc_gc_pause_seconds_count{generation="2"}' in metrics
            assert (await client.get(f"{base}/nope")).status_code == 404


async def test_reload_swaps_generation_and_refuses_a_bad_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", value="one")
    async with running(cfg) as (server, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            write_config(cfg, value="two")
            assert await server.reload() is True
            ex = await envoy.request(path="/x")
            assert ex.upstream_header("x-added") == "two"
            cfg.write_text("plugins: [\n")  # broken
            assert await server.reload() is False
            ex = await envoy.request(path="/x")
            assert ex.upstream_header("x-added") == "two"  # the running config stays
        finally:
            await envoy.aclose()
        status = server.runtime.status()
    assert status["generation"] == 2
    assert status["reloads"] == {"ok": 1, "failed": 1}
    assert "YAML syntax error" in status["last_reload_error"]


async def test_reload_that_changes_exporters_says_they_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_config(tmp_path / "c.yaml", value="one")
    async with running(cfg) as (server, _):
        text = cfg.read_text()
        cfg.write_text(text.replace("version: 1", "version: 1\ntracing: {sample_ratio: 0.5}"))
        with caplog.at_level("WARNING", logger="extproc"):
            assert await server.reload() is True  # the plugins' change applies at once
        assert "tracing and metrics exporter settings apply after a restart" in caplog.text
        caplog.clear()
        write_config(cfg, value="two")  # exporters back as they started: nothing to say
        cfg.write_text(cfg.read_text().replace("version: 1", "version: 1\ntracing: {}"))
        with caplog.at_level("WARNING", logger="extproc"):
            assert await server.reload() is True
        assert "apply after a restart" not in caplog.text


async def test_in_flight_stream_finishes_on_its_generation(tmp_path: Path) -> None:
    """A stream that started before a reload keeps the plugins it started with."""
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as g

    cfg = write_config(tmp_path / "c.yaml", value="one")
    async with running(cfg) as (server, target), grpc.aio.insecure_channel(target) as channel:
        call = g.ExternalProcessorStub(channel).Process()
        req = pb.ProcessingRequest()
        for k, v in ((":method", "GET"), (":path", "/x")):
            h = req.request_headers.headers.headers.add()
            h.key, h.raw_value = k, v.encode()
        await call.write(req)
        first = await call.read()
        sets = first.request_headers.response.header_mutation.set_headers
        assert {o.header.key: o.header.raw_value for o in sets}["x-added"] == b"one"
        write_config(cfg, value="two")
        assert await server.reload()
        old = server.runtime._old[0]
        assert old.active == 1  # still pinned by our stream
        resp = pb.ProcessingRequest()
        h = resp.response_headers.headers.headers.add()
        h.key, h.raw_value = ":status", b"200"
        await call.write(resp)
        second = await call.read()
        assert second.HasField("response_headers")
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        await asyncio.wait_for(old.drained.wait(), 5)
        assert old.active == 0


async def test_body_modes_over_grpc(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    async with running(cfg) as (_, target):
        for mode in (
            BodySendMode.BUFFERED,
            BodySendMode.STREAMED,
            BodySendMode.FULL_DUPLEX_STREAMED,
        ):
            envoy = FakeEnvoy.connect(
                target, EnvoyMode(response_headers=True, request_body=mode, request_trailers=True)
            )
            envoy.chunk_size = 5
            try:
                ex = await envoy.request("POST", "/x", body=b"0123456789abc", trailers={"x-t": "1"})
            finally:
                await envoy.aclose()
            assert ex.status == 200, mode
            assert ex.upstream_body == b"0123456789abc", mode


async def test_graceful_stop_lets_open_streams_finish(tmp_path: Path) -> None:
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as g

    cfg = write_config(tmp_path / "c.yaml")
    port = free_port()
    server = Server(load_config(cfg), listen=f"127.0.0.1:{port}", admin="")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = g.ExternalProcessorStub(channel).Process()
        req = pb.ProcessingRequest()
        h = req.request_headers.headers.headers.add()
        h.key, h.raw_value = ":path", b"/x"
        await call.write(req)
        await call.read()
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.1)  # inside the 0.5 s drain delay: health says NOT_SERVING
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = pb.ProcessingRequest()
        h = resp.response_headers.headers.headers.add()
        h.key, h.raw_value = ":status", b"200"
        await call.write(resp)
        assert (await call.read()).HasField("response_headers")
        await call.done_writing()
        await asyncio.wait_for(stopping, 20)


async def test_streams_in_flight_counts_the_worker_s_open_streams(tmp_path: Path) -> None:
    """The count plugins read to tell a burst at once (jwt_auth skips its Redis tier past a
    few): one per open stream, on both transports, back when each ends."""
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as g
    from extproc.observability.saturation import streams_in_flight

    counter = streams_in_flight()
    before = counter.count
    async with (
        running(write_config(tmp_path / "c.yaml")) as (_, target),
        grpc.aio.insecure_channel(target) as channel,
    ):
        stub = g.ExternalProcessorStub(channel)
        calls = [stub.Process() for _ in range(3)]
        for call in calls:  # request headers answered; the streams stay open for more
            req = pb.ProcessingRequest()
            h = req.request_headers.headers.headers.add()
            h.key, h.raw_value = ":path", b"/x"
            await call.write(req)
            assert (await call.read()).HasField("request_headers")
        assert counter.count == before + 3
        for call in calls:
            call.cancel()
        deadline = time.monotonic() + 5
        while counter.count != before:
            assert time.monotonic() < deadline, counter.count
            await asyncio.sleep(0.01)


def _block_config(path: Path, threshold_ms: float, seconds: float) -> Path:
    """A sidecar whose one plugin blocks the loop for ``seconds`` on ``/block``."""
    path.write_text(
        f"server: {{loop_lag_threshold_ms: {threshold_ms}, transport: {CURRENT['transport']}}}\n"
        "plugins:\n"
        "  - plugin: tests.support.plugins:BlockPlugin\n"
        "    timeout_ms: 100\n"
        "    fail: open\n"
        f"    config: {{path: /block, seconds: {seconds}}}\n"
    )
    return path


async def test_watchdog_names_the_plugin_that_blocks_the_loop(tmp_path: Path) -> None:
    cfg = _block_config(tmp_path / "c.yaml", 100, 0.5)
    async with running(cfg) as (server, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            await envoy.request(path="/block")
        finally:
            await envoy.aclose()
        for _ in range(50):
            if server.watchdog.last_stall is not None:
                break
            await asyncio.sleep(0.02)
        metrics = server.services.registry.render_prometheus()
    assert server.watchdog.last_stall is not None
    assert server.watchdog.last_stall[0] == "block"
    assert 'extproc_loop_stalls_total{plugin="block"} 1' in metrics


async def test_watchdog_sees_a_block_while_the_worker_is_idle(tmp_path: Path) -> None:
    """No stream, so the heartbeat is at its idle pace (every 0.25 s). A background job (here
    run from the test, on the server's loop) blocks for 0.22 s just after a beat: no beat is
    late by more than the 50 ms threshold, but the idle watchdog, looking every 0.1 s, probes
    the loop it sees out of epoll."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"server: {{loop_lag_threshold_ms: 50, transport: {CURRENT['transport']}}}\nplugins: []\n"
    )
    async with running(cfg) as (server, _):
        dog = server.watchdog
        async with asyncio.timeout(5):
            while not dog.idle:
                await asyncio.sleep(0.02)
            beats = dog.lag.labels().count
            while dog.lag.labels().count == beats:
                await asyncio.sleep(0.002)
        time.sleep(0.22)  # noqa: ASYNC251 - the blocking job
        for _ in range(50):
            if dog.last_stall is not None:
                break
            await asyncio.sleep(0.02)
        metrics = server.services.registry.render_prometheus()
    assert dog.last_stall is not None and dog.last_stall[0] == "(none)"
    assert 'extproc_loop_stalls_total{plugin="(none)"} 1' in metrics


async def test_loop_lag_threshold_zero_runs_no_watchdog(tmp_path: Path) -> None:
    """``loop_lag_threshold_ms: 0`` turns the watchdog off: no thread, no heartbeat, no
    loop-lag series; the same blocking plugin is answered all the same and nobody names it."""
    import threading

    cfg = _block_config(tmp_path / "c.yaml", 0, 0.2)
    async with running(cfg) as (server, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            reply = await envoy.request(path="/block")
        finally:
            await envoy.aclose()
        threads = {t.name for t in threading.enumerate()}
        metrics = server.services.registry.render_prometheus()
    assert server.watchdog is None and server.servicer.watchdog is None
    assert "extproc-watchdog" not in threads
    assert "extproc_loop_lag_seconds" not in metrics
    assert "extproc_loop_stalls_total{" not in metrics
    assert not reply.immediate  # the blocked hook still answered: the request went on


async def test_slow_plugin_gets_override_message_timeout_only_when_envoy_allows(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "c.yaml"
    body = (
        "plugins:\n"
        "  - plugin: tests.support.plugins:HangPlugin\n"
        "    timeout_ms: 400\n"
        "    fail: open\n"
        "    config: {path: /slow, seconds: 0.3}\n"
    )
    cfg.write_text(
        "server: {message_timeout_ms: 200, max_message_timeout_ms: 1000, "
        f"transport: {CURRENT['transport']}}}\n" + body
    )
    async with running(cfg) as (_, target):
        envoy = FakeEnvoy.connect(target, MODE)
        try:
            ex = await envoy.request(path="/slow")
            fast = await envoy.request(path="/fast")
        finally:
            await envoy.aclose()
    assert ex.status == 200 and fast.status == 200
    assert isinstance(envoy.transport, _Grpc)
    assert envoy.transport.extensions == 1  # the slow message only, once
    # without max_message_timeout_ms the same plugin cannot fit the budget at all
    cfg.write_text("server: {message_timeout_ms: 200}\n" + body)
    with pytest.raises(ConfigError, match="cannot fit the message budget of 180 ms"):
        load_config(cfg)


async def test_sampled_stream_has_a_span_per_plugin_call_under_the_callers_trace(
    tmp_path: Path,
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    cfg = write_config(tmp_path / "c.yaml")
    text = cfg.read_text().replace("version: 1", "version: 1\ntracing: {sample_ratio: 1.0}")
    cfg.write_text(text)
    exporter = InMemorySpanExporter()
    port = free_port()
    server = Server(load_config(cfg), listen=f"127.0.0.1:{port}", admin="",
                    span_processors=[SimpleSpanProcessor(exporter)])  # fmt: skip
    await server.start()
    trace_id = "4bf92f3577b34a4736e6f8b5c1b2a6a1"
    try:
        envoy = FakeEnvoy.connect(f"127.0.0.1:{port}", MODE)
        try:
            await envoy.request(
                path="/x", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
            )
        finally:
            await envoy.aclose()
    finally:
        await server.stop()
    spans = exporter.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names.count("plugin headers") == 2  # request and response headers
    stream = [s for s in spans if not s.name.startswith("plugin ")]
    assert len(stream) == 1
    assert format(stream[0].context.trace_id, "032x") == trace_id
    assert all(s.context.trace_id == stream[0].context.trace_id for s in spans)


async def test_saturated_worker_writes_replies_of_many_streams_together(tmp_path: Path) -> None:
    """Coalescing forced on (a saturation meter that reads 1.0): concurrent streams get their
    own replies, released in rounds; /status reports it."""
    from extproc.coalesce import ReplyCoalescer

    async with running(write_config(tmp_path / "c.yaml", value="c")) as (server, target):
        assert server.servicer is not None
        assert server.servicer.coalescer.max_hold == 0.003  # the default, 3 ms
        server.servicer.coalescer = ReplyCoalescer(0.02, saturation=lambda: 1.0, min_company=0)
        envoys = [FakeEnvoy.connect(target, MODE) for _ in range(20)]  # a stream at a time each
        try:
            exchanges = await asyncio.gather(
                *(
                    e.request(path=f"/x{i}", headers={"x-request-id": f"r{i}"})
                    for i, e in enumerate(envoys)
                )
            )
        finally:
            for e in envoys:
                await e.aclose()
        assert [ex.header("x-rid") for ex in exchanges] == [f"r{i}" for i in range(20)]
        assert all(ex.upstream_header("x-added") == "c" for ex in exchanges)
        c = server.servicer.coalescer
        assert c.held == 40  # request and response headers of each stream
        assert 2 <= c.rounds < 40  # held together, not one by one
        assert server._admin is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            status = (await client.get(f"http://127.0.0.1:{server._admin.port}/status")).json()
        assert status["reply_coalescing"]["rounds"] == c.rounds
        assert status["reply_coalescing"]["max_hold_ms"] == 20.0


async def test_health_watch_follows_shutdown_and_does_not_hold_it(tmp_path: Path) -> None:
    """Watch (client-side gRPC health checking) gets SERVING, then NOT_SERVING as soon as the
    server starts to stop; the open Watch does not keep the stop waiting for its grace."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"server: {{drain_delay_s: 0.3, shutdown_grace_s: 30, transport: {CURRENT['transport']}}}\n"
        "plugins: []\n"
    )
    port = free_port()
    server = Server(load_config(cfg), listen=f"127.0.0.1:{port}", admin="")
    await server.start()
    pb = health_pb2.HealthCheckResponse
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="extproc")
        )
        assert (await watch.read()).status == pb.SERVING
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.ensure_future(server.stop())
        assert (await asyncio.wait_for(watch.read(), 5)).status == pb.NOT_SERVING
        await asyncio.wait_for(stopping, 20)
        took = loop.time() - began
        assert took < 10, f"the stop waited {took:.1f} s for an open Watch"
        assert await watch.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
