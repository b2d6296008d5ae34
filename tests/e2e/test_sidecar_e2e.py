"""End to end: client -> real Envoy -> sidecar process -> echo upstream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from extproc.testing.stack import LocalStack
from tests.support import TRANSPORTS

pytestmark = pytest.mark.e2e


CONFIG = """
version: 1
server: {message_timeout_ms: 300, drain_delay_s: 0, transport: TRANSPORT}
plugins:
  - plugin: headers
    config:
      request_id_header: x-rid
      rules:
        - {path_prefix: /, request_set: {x-added: "yes"}, response_set: {x-out: "1"}}
  - plugin: tests.support.plugins:HangPlugin
    timeout_ms: 100
    fail: closed
    config: {path: /hang-closed, seconds: 5}
  - plugin: tests.support.plugins:HangPlugin
    name: hang_open
    timeout_ms: 100
    fail: open
    config: {path: /hang-open, seconds: 5}
  - plugin: tests.support.plugins:RaisePlugin
    fail: closed
    config: {path: /raise}
  - plugin: tests.support.plugins:TeapotPlugin
    config: {path: /teapot}
  - plugin: tests.support.plugins:DenyPlugin
    config: {path: /deny}
"""


@pytest.fixture(params=TRANSPORTS)
def config(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    path = tmp_path / "extproc.yaml"
    path.write_text(CONFIG.replace("TRANSPORT", request.param))
    return path


async def test_plugins_at_work_through_real_envoy(config: Path) -> None:
    async with LocalStack(config) as stack:
        http = stack.http
        ok = await http.get("/hello?x=1", headers={"x-added": "forged"})
        assert ok.status_code == 200
        echoed = ok.json()
        assert echoed["headers"]["x-added"] == "yes"  # set by the plugin, overwriting the client
        assert echoed["path"] == "/hello?x=1"
        assert ok.headers["x-out"] == "1"
        assert ok.headers["x-rid"] == ok.headers["x-request-id"]

        teapot = await http.get("/teapot")
        assert teapot.status_code == 418
        assert teapot.text == "short and stout\n"
        assert teapot.headers["x-teapot"] == "yes"

        deny = await http.get("/deny/x")
        assert deny.status_code == 403
        assert deny.json() == {"error": "forbidden", "message": "Not on this path."}

        t0 = time.monotonic()
        hang = await http.get("/hang-closed")
        assert hang.status_code == 503
        assert time.monotonic() - t0 < 2.0
        assert (await http.get("/hang-open")).status_code == 200

        boom = await http.get("/raise")
        assert boom.status_code == 500
        assert "hunter2" not in boom.text
        assert json.loads(boom.text)["error"] == "internal_error"

        # every request reached the upstream only when allowed
        paths = [r["path"] for r in stack.upstream.requests]
        assert paths == ["/hello?x=1", "/hang-open"]
        assert stack.envoy is not None
        stats = stack.envoy.stats("http.extproc")
        failed = {k: v for k, v in stats.items() if k.endswith("streams_failed")}
        assert all(v == 0 for v in failed.values()), failed


@pytest.mark.parametrize(("allow", "expected"), [(False, 500), (True, 200)])
async def test_sidecar_stopped_follows_failure_mode_allow(
    config: Path, allow: bool, expected: int
) -> None:
    async with LocalStack(config, failure_mode_allow=allow) as stack:
        assert (await stack.http.get("/before")).status_code == 200
        await asyncio.to_thread(stack.sidecar.kill)
        statuses = []
        t0 = time.monotonic()
        for _ in range(5):
            statuses.append((await stack.http.get("/after")).status_code)
        assert time.monotonic() - t0 < 10.0  # fail fast, never hang
        # the first request may meet the connection being torn down; the rest follow policy
        assert statuses[1:] == [expected] * 4, statuses
        if not allow:
            assert all(500 <= s < 600 for s in statuses)


def headers_sidecar(tmp_path: Path, rule: str, transport: str = "grpcio") -> Path:
    """A sidecar config with the headers plugin and one rule (YAML flow mapping)."""
    path = tmp_path / "extproc.yaml"
    path.write_text(
        f"version: 1\nserver: {{drain_delay_s: 0, transport: {transport}}}\n"
        "plugins:\n  - plugin: headers\n    config:\n"
        f"      rules: [{rule}]\n"
    )
    return path


def ext_proc_counts(stack: LocalStack) -> dict[str, int]:
    """Envoy's ext_proc counters by their last name part (``streams_failed``, ...)."""
    assert stack.envoy is not None
    return {k.rsplit(".", 1)[-1]: v for k, v in stack.envoy.stats("ext_proc").items()}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sidecar_ends_the_stream_when_no_plugin_wants_more(
    tmp_path: Path, transport: str
) -> None:
    """Envoy configured to send every phase, plugins on request headers only: the sidecar
    answers the request headers and ends the stream with OK; Envoy sends it nothing more and
    finishes the exchange unchanged, with no stream counted as failed."""
    from extproc.envoy_spec import BodyMode, ProcessingModeSpec

    path = headers_sidecar(tmp_path, "{path_prefix: /, request_set: {x-added: 'yes'}}", transport)
    everything = ProcessingModeSpec(
        request_headers=True,
        response_headers=True,
        request_body=BodyMode.BUFFERED,
        response_body=BodyMode.BUFFERED,
        request_trailers=True,
        response_trailers=True,
    )
    async with LocalStack(path, ext_proc_overrides={"processing_mode": everything}) as stack:
        http = stack.http
        for _ in range(3):
            got = await http.post("/echo", content=b"payload")
            assert got.status_code == 200
            assert got.json()["headers"]["x-added"] == "yes"
            assert got.json()["body"] == "payload"
        counts = ext_proc_counts(stack)
    assert counts["streams_started"] == 3
    assert counts["stream_msgs_received"] == 3  # one reply each: to the request headers
    assert counts["server_half_closed"] == 3 and counts["streams_closed"] == 3
    # the buffered request body may already be on its way when the close arrives; nothing
    # of the response is sent (4 messages a request without the early end)
    assert counts["stream_msgs_sent"] <= 6
    assert counts["streams_failed"] == 0 and counts["spurious_msgs_received"] == 0
    assert counts["message_timeouts"] == 0


async def test_envoy_drops_its_own_431_when_a_plugin_runs_on_the_response(
    tmp_path: Path,
) -> None:
    """A canary for Envoy issue 29440, documented in docs/operations.md: with a response phase
    on, Envoy sends its codec-level rejection (431, too many headers) through ext_proc and
    closes the client connection before the answer is back. When this test fails, Envoy has
    fixed it: update the docs."""
    import httpx

    path = headers_sidecar(
        tmp_path, "{path_prefix: /, request_set: {x-a: '1'}, response_set: {x-b: '1'}}"
    )
    many = {f"x-h{i}": "v" for i in range(200)}
    async with LocalStack(path) as stack:
        ok = await stack.http.get("/x", headers={"x-h": "v"})
        assert ok.status_code == 200 and ok.headers["x-b"] == "1"
        with pytest.raises(httpx.RemoteProtocolError):
            await stack.http.get("/x", headers=many)
        counts = ext_proc_counts(stack)
    assert counts["streams_failed"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_envoy_closes_first_ends_cleanly(tmp_path: Path, transport: str) -> None:
    """A plugin wants the response headers but Envoy was configured not to send them: the
    sidecar keeps the stream open after the request headers until Envoy closes it, then
    ends it with OK (its closing message, an empty one, is ignored by Envoy)."""
    from extproc.envoy_spec import ProcessingModeSpec

    path = headers_sidecar(
        tmp_path, "{path_prefix: /, request_set: {x-a: '1'}, response_set: {x-b: '1'}}", transport
    )
    request_only = ProcessingModeSpec(request_headers=True, response_headers=False)
    async with LocalStack(path, ext_proc_overrides={"processing_mode": request_only}) as stack:
        # the upstream answers slowly: the sidecar's closing message arrives while the HTTP
        # exchange is still going on if Envoy closes its side as soon as it has sent all it
        # was configured to send
        for delay in (0, 300, 300):
            got = await stack.http.get("/x", headers={"x-echo-delay-ms": str(delay)})
            assert got.status_code == 200
            assert got.json()["headers"]["x-a"] == "1"
            assert "x-b" not in got.headers  # Envoy never asked
        await asyncio.sleep(0.5)  # the streams' ends reach Envoy's stats
        counts = ext_proc_counts(stack)
    assert counts["streams_started"] == 3 and counts["stream_msgs_received"] == 3
    assert counts["streams_failed"] == 0 and counts["spurious_msgs_received"] == 0
    assert counts["message_timeouts"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_observability_mode_streams_end_cleanly(tmp_path: Path, transport: str) -> None:
    """Envoy in observability mode sends without waiting and takes no answer: the requests
    go through unchanged, and the sidecar's end of each stream (a unary-response RPC still
    carries one, empty, message) is no failed stream and no spurious message."""
    from extproc.envoy_spec import ProcessingModeSpec

    path = headers_sidecar(
        tmp_path, "{path_prefix: /, request_set: {x-a: '1'}, response_set: {x-b: '1'}}", transport
    )
    overrides = {
        "observability_mode": True,
        "processing_mode": ProcessingModeSpec(request_headers=True, response_headers=True),
    }
    async with LocalStack(path, ext_proc_overrides=overrides) as stack:
        for delay in (0, 200, 0):
            got = await stack.http.get("/x", headers={"x-echo-delay-ms": str(delay)})
            assert got.status_code == 200
            assert "x-a" not in got.json()["headers"]  # observed, never changed
            assert "x-b" not in got.headers
        await asyncio.sleep(0.5)
        counts = ext_proc_counts(stack)
    assert counts["streams_started"] == 3
    assert counts["stream_msgs_sent"] == 6  # request and response headers, unanswered
    assert counts["streams_failed"] == 0 and counts["spurious_msgs_received"] == 0
