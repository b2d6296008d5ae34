"""Bad input straight at the sidecar process from a raw gRPC client (malformed protobuf, messages
out of order, oversized messages, odd headers, idle and excess streams), and oversized or odd
requests through real Envoy. Every stream ends answered or with a clean gRPC error, within
explicit limits, and the sidecar keeps serving the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.testing.jwt import make_ec_key
from extproc.testing.processes import SidecarProcess, free_port
from tests.faults.harness import Stack, budget, poll
from tests.support import TRANSPORTS

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
LIMITS = {
    "max_message_bytes": 65536,
    "max_concurrent_streams": 8,
    "max_body_bytes": 4096,
    "stream_idle_timeout_s": 1.0,
}

CONFIG = """
version: 1
server: {{message_timeout_ms: 200, drain_delay_s: 0, max_message_bytes: 65536,
         max_concurrent_streams: 8, max_body_bytes: 4096, stream_idle_timeout_s: 1.0,
         transport: {transport}}}
plugins:
  - plugin: headers
    config:
      rules: [{{path_prefix: /, request_set: {{x-added: "yes"}}}}]
  - plugin: jwt_auth
    config:
      providers:
        main:
          issuer: https://issuer.test
          algorithms: [ES256]
          jwks: {{inline: '{jwks}'}}
      rules:
        - {{match: {{prefix: /api}}, requires: {{provider: main}}}}
        - {{match: {{prefix: /}}, requires: {{allow_missing: true}}}}
  - plugin: rate_limit
    config:
      rules:
        - {{name: per_user, key: [header:x-user], limits: [{{requests: 1000000, per: hour}}]}}
  - plugin: tests.faults.plugins:BodySizePlugin
"""

#: answers a client may get for odd but well-formed requests (never a 5xx)
CLIENT_ANSWERS = {200, 400, 401, 403, 413, 429}


@pytest.fixture(scope="module", params=TRANSPORTS)
def config_file(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Every test here runs against both transports (grpc.aio and extproc's own HTTP/2)."""
    key = make_ec_key("k1")
    path = tmp_path_factory.mktemp("abuse") / "extproc.yaml"
    jwks = json.dumps({"keys": [key.jwk()]})
    path.write_text(CONFIG.format(jwks=jwks, transport=request.param))
    return path


@pytest.fixture(scope="module")
def sidecar(config_file: Path) -> Iterator[SidecarProcess]:
    admin = f"127.0.0.1:{free_port()}"
    with SidecarProcess(config_file, admin=admin) as process:
        yield process


@pytest.fixture(scope="module")
def channel(sidecar: SidecarProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 16 << 20)]
    with grpc.insecure_channel(sidecar.grpc_target, options=options) as ch:
        yield ch


# ---------------------------------------------------------------------------- helpers


def headers_msg(
    headers: list[tuple[str, bytes]],
    *,
    eos: bool = True,
    body_mode: int | None = None,
    phase: str = "request_headers",
) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    target = getattr(req, phase)
    target.SetInParent()  # an empty header map is still this phase
    field = target.trailers if phase.endswith("trailers") else target.headers
    field.SetInParent()
    for key, value in headers:
        h = field.headers.add()
        h.key, h.raw_value = key, value
    if not phase.endswith("trailers"):
        target.end_of_stream = eos
    if body_mode is not None:
        req.protocol_config.request_body_mode = body_mode  # type: ignore[assignment]
    return req


def body_msg(body: bytes, eos: bool = True) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    req.request_body.body = body
    req.request_body.end_of_stream = eos
    return req


GET = [(":method", b"GET"), (":path", b"/x"), (":authority", b"a"), (":scheme", b"http")]


def raw_call(
    channel: grpc.Channel, messages: list[bytes], timeout: float = 5.0
) -> tuple[grpc.StatusCode, list[pb.ProcessingResponse], float]:
    """Send raw bytes as messages, half-close, read everything: (status, replies, seconds)."""
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    t0 = time.monotonic()
    replies: list[pb.ProcessingResponse] = []
    try:
        for raw in call(iter(messages), timeout=timeout):
            replies.append(pb.ProcessingResponse.FromString(raw))
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    return code, replies, time.monotonic() - t0


def serves(channel: grpc.Channel) -> bool:
    """A well-formed stream still gets its answer."""
    code, replies, _ = raw_call(channel, [headers_msg(GET).SerializeToString()])
    if code is not grpc.StatusCode.OK or len(replies) != 1:
        return False
    sets = replies[0].request_headers.response.header_mutation.set_headers
    return any(o.header.key == "x-added" for o in sets)


def client_status(reply: pb.ProcessingResponse) -> int:
    if reply.HasField("immediate_response"):
        return reply.immediate_response.status.code
    return 200


# ---------------------------------------------------------------------------- raw gRPC


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=st.binary(min_size=1, max_size=300))
def test_malformed_protobuf_ends_the_stream_cleanly(channel: grpc.Channel, payload: bytes) -> None:
    code, replies, seconds = raw_call(channel, [payload, payload])
    # random bytes are either no valid ProcessingRequest (an error status) or one with odd
    # content (answered, or refused as a protocol error): never a hang, never a 5xx answer
    # (UNKNOWN is allowed here only because of the bug pinned by the next test)
    assert code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNKNOWN,
    ), code
    assert seconds < 3.0
    assert all(client_status(r) in CLIENT_ANSWERS for r in replies)


@pytest.mark.parametrize("payload", [b"\x00", b"\x0a\xff\xff\xff"], ids=["zero", "varint"])
def test_unparsable_message_is_a_clean_invalid_argument(
    channel: grpc.Channel, sidecar: SidecarProcess, payload: bytes
) -> None:
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([payload]), timeout=5))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "DecodeError" not in (caught.value.details() or "")
    assert "Unexpected [DecodeError]" not in sidecar.log_text()


def test_sidecar_serves_after_the_fuzzing(channel: grpc.Channel, sidecar: SidecarProcess) -> None:
    assert sidecar.running
    assert serves(channel)


H = headers_msg(GET, eos=False).SerializeToString()
B = body_msg(b"abc").SerializeToString()
RH = headers_msg([(":status", b"200")], phase="response_headers").SerializeToString()
# response headers with a body to follow. The violations below come while the request body,
# which body_size wants, is still to come: once nothing a plugin wants can arrive, the
# sidecar ends the stream and reads no further
RHB = headers_msg([(":status", b"200")], eos=False, phase="response_headers").SerializeToString()
RT = headers_msg([("x-t", b"1")], phase="request_trailers").SerializeToString()


@pytest.mark.parametrize(
    ("name", "messages"),
    [
        ("empty_message", [b""]),
        ("request_headers_twice", [H, H]),
        ("response_headers_twice", [H, RHB, RH]),
        ("request_headers_after_response_headers", [H, RHB, H]),
    ],
)
def test_out_of_order_and_malformed_messages_are_refused(
    channel: grpc.Channel, name: str, messages: list[bytes], figures: dict[str, Any]
) -> None:
    code, _replies, seconds = raw_call(channel, messages)
    figures["code"] = code.name
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (name, code)
    assert seconds < 3.0
    assert serves(channel)


@pytest.mark.parametrize(
    ("name", "messages", "kind"),
    [
        ("body_first", [B], "request_body"),  # request headers SKIP: Envoy may do this
        ("trailers_first", [RT], "request_trailers"),
    ],
)
def test_messages_a_skipping_mode_sends_first_are_answered(
    channel: grpc.Channel, name: str, messages: list[bytes], kind: str
) -> None:
    code, replies, _ = raw_call(channel, messages)
    assert code is grpc.StatusCode.OK
    assert [r.WhichOneof("response") for r in replies] == [kind]


def test_message_over_max_message_bytes_is_refused(
    channel: grpc.Channel, figures: dict[str, Any]
) -> None:
    big = headers_msg([*GET, ("x-big", b"v" * (LIMITS["max_message_bytes"] + 1))])
    code, replies, seconds = raw_call(channel, [big.SerializeToString()])
    figures["code"] = code.name
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not replies and seconds < 3.0
    assert serves(channel)


def test_thousands_of_headers_and_long_values_within_the_limit(channel: grpc.Channel) -> None:
    many = [*GET, *((f"x-h{i}", b"v") for i in range(3000))]
    long = [*GET, ("x-long", b"v" * 60_000)]
    for headers in (many, long):
        code, replies, seconds = raw_call(channel, [headers_msg(headers).SerializeToString()])
        assert code is grpc.StatusCode.OK and len(replies) == 1
        assert replies[0].HasField("request_headers")
        assert seconds < 3.0


def test_streamed_body_over_max_body_bytes_gets_413(channel: grpc.Channel) -> None:
    """STREAMED: the sidecar gathers chunks for a buffering plugin, up to max_body_bytes."""
    head = headers_msg(GET, eos=False, body_mode=1).SerializeToString()
    chunks = [body_msg(b"x" * 2048, eos=False).SerializeToString() for _ in range(3)]
    code, replies, _ = raw_call(channel, [head, *chunks])
    assert code is grpc.StatusCode.OK
    assert [client_status(r) for r in replies][-1] == 413


def test_buffered_body_over_max_body_bytes_gets_413(channel: grpc.Channel) -> None:
    head = headers_msg(GET, eos=False, body_mode=2).SerializeToString()
    code, replies, _ = raw_call(channel, [head, body_msg(b"x" * 10_000).SerializeToString()])
    assert code is grpc.StatusCode.OK
    assert [client_status(r) for r in replies] == [200, 413]


_NAMES = st.sampled_from(
    [":path", ":method", ":authority", ":scheme", ":status", "authorization", "x-user",
     "content-length", "host", "cookie", "x-request-id", "", "x-dup", "x-empty"]
)  # fmt: skip
_HEADER = st.tuples(_NAMES | st.text(max_size=20), st.binary(max_size=40))


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    request=st.lists(_HEADER, max_size=12),
    response=st.lists(_HEADER, max_size=6),
    trailers=st.lists(_HEADER, max_size=4),
)
def test_odd_headers_never_break_a_stream(
    channel: grpc.Channel,
    request: list[tuple[str, bytes]],
    response: list[tuple[str, bytes]],
    trailers: list[tuple[str, bytes]],
) -> None:
    """Non-UTF-8 bytes, duplicates, empty keys and values, pseudo-headers where they do not
    belong: each message gets its reply (or the client a 4xx), never a protocol error."""
    # the response headers come while the request body (body_size wants it) is still open:
    # once nothing a plugin wants can come, the sidecar ends the stream without reading on
    messages = [
        headers_msg([*GET, *request], eos=False).SerializeToString(),
        headers_msg([(":status", b"200"), *response], eos=False, phase="response_headers")
        .SerializeToString(),
        headers_msg(trailers, phase="request_trailers").SerializeToString(),
    ]  # fmt: skip
    code, replies, seconds = raw_call(channel, messages)
    assert code is grpc.StatusCode.OK, code
    assert seconds < 3.0
    statuses = [client_status(r) for r in replies]
    assert statuses and all(s in CLIENT_ANSWERS for s in statuses), statuses
    # one reply per message, until a plugin answers the client
    assert len(replies) == 3 or statuses[-1] != 200


@budget(40)
async def test_excess_and_idle_streams_are_bounded(
    sidecar: SidecarProcess, figures: dict[str, Any]
) -> None:
    """24 streams on one connection, each answered once and then left idle: at most
    max_concurrent_streams run at once, the rest wait their turn, and every idle stream is
    closed after stream_idle_timeout_s (DEADLINE_EXCEEDED)."""
    n = 24
    observed: list[int] = []
    details: list[str] = []
    async with (
        grpc.aio.insecure_channel(
            sidecar.grpc_target, options=[("grpc.enable_http_proxy", 0)]
        ) as ch,
        httpx.AsyncClient(trust_env=False) as admin,
    ):
        mc = ch.stream_stream(METHOD, request_serializer=None, response_deserializer=None)

        async def idle_stream() -> tuple[str, int]:
            call = mc(timeout=20)
            replies = 0
            try:
                await call.write(headers_msg(GET, eos=False).SerializeToString())
                await call.read()
                replies += 1
                await call.read()  # never sends more: the sidecar closes the idle stream
            except grpc.aio.AioRpcError:
                pass
            code = await call.code()
            if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                details.append(f"{code.name}: {await call.details()}")
            return code.name, replies

        async def watch() -> None:
            while True:
                status = (await admin.get(f"http://{sidecar.admin}/status")).json()
                observed.append(status["open_streams"])
                await asyncio.sleep(0.1)

        watcher = asyncio.ensure_future(watch())
        t0 = time.monotonic()
        try:
            results = await asyncio.gather(*(idle_stream() for _ in range(n)))
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        elapsed = time.monotonic() - t0
        await poll(
            lambda: serves_async_ok(sidecar), timeout=5, what="serving after the idle streams"
        )
        final = (await admin.get(f"http://{sidecar.admin}/status")).json()
    codes = Counter(code for code, _ in results)
    figures.update(
        {
            "streams": n,
            "codes": dict(codes),
            "max_open": max(observed),
            "seconds": round(elapsed, 1),
        }
    )
    # served streams are answered once and closed when idle; streams past the limit that
    # raced the server's SETTINGS frame are refused (REFUSED_STREAM: the client reports
    # UNAVAILABLE, or INTERNAL from its core), never served
    assert set(codes) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL"}, details
    assert codes["DEADLINE_EXCEEDED"] >= LIMITS["max_concurrent_streams"]
    assert all((code == "DEADLINE_EXCEEDED") == (replies == 1) for code, replies in results)
    assert max(observed) <= LIMITS["max_concurrent_streams"]
    # 1 s idle timeout per round of at most 8 streams: more than one round, never forever
    assert 1.0 < elapsed < 15
    assert final["open_streams"] == 0 and final["active_streams"] == 0


def serves_async_ok(sidecar: SidecarProcess) -> bool:
    with grpc.insecure_channel(sidecar.grpc_target, options=[("grpc.enable_http_proxy", 0)]) as ch:
        return serves(ch)


# ---------------------------------------------------------------------------- through Envoy


async def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest


@pytest.mark.e2e
@budget(40)
async def test_oversized_and_odd_requests_through_envoy(
    config_file: Path, figures: dict[str, Any]
) -> None:
    async with Stack([config_file]) as stack:
        assert stack.envoy is not None
        http, port = stack.http, stack.envoy.port
        got: dict[str, int] = {}
        many = {f"x-h{i}": "v" for i in range(2000)}
        got["2000_headers"] = (await http.get("/x", headers=many)).status_code
        got["100k_value"] = (await http.get("/x", headers={"x-long": "v" * 100_000})).status_code
        small = await http.post("/x", content=b"y" * 1000)
        got["body_1k"] = small.status_code
        body_seen = small.json()["headers"].get("x-body-bytes")
        got["body_2MiB"] = (await http.post("/x", content=b"y" * (2 << 20))).status_code
        nonutf8 = (
            b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-bin: \xff\xfe\x80ok\r\n"
            b"x-dup: 1\r\nx-dup: 2\r\nx-empty:\r\nauthorization: Bearer \xff\xff\r\n\r\n"
        )
        got["nonutf8_bad_token"] = (await raw_http(port, nonutf8))[0]
        ok = nonutf8.replace(b"authorization: Bearer \xff\xff\r\n", b"")
        status, rest = await raw_http(port, ok)
        got["nonutf8_dup_empty"] = status
        pseudo = b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n:path: /admin\r\n\r\n"
        got["pseudo_in_http1"] = (await raw_http(port, pseudo))[0]
        stats = stack.envoy.stats("ext_proc|extproc")
    figures["statuses"] = got
    # Envoy's own limits answer first: 60 KiB of headers / 100 headers -> 431
    assert got["2000_headers"] == 431 and got["100k_value"] == 431
    # a body Envoy can buffer reaches the buffering plugin; past Envoy's buffer, Envoy's 413
    assert got["body_1k"] == 200 and body_seen == "1000"
    assert got["body_2MiB"] == 413
    # odd bytes reach the sidecar and get a 4xx/200, never a 5xx
    assert got["nonutf8_bad_token"] == 401  # allow_missing, but a bad token is a 401
    assert got["nonutf8_dup_empty"] == 200
    assert b'"x-bin": "' in rest and b'"x-dup": "1, 2"' in rest
    assert got["pseudo_in_http1"] == 400
    broken = {k: v for k, v in stats.items() if k.endswith("streams_failed")}
    assert not any(broken.values()), broken
