"""Conformance and robustness of extproc.http2 (gRPC over HTTP/2 on asyncio).

The server is driven over real 127.0.0.1 sockets by independent clients: the ``h2`` library
(a full HTTP/2 state machine that also checks what the server sends), hand-built frames for
what h2 refuses to send, and grpc.aio itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.events as ev
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings
from hpack import Decoder, Encoder
from hpack.exceptions import InvalidTableIndexError

from extproc.health import HealthService
from extproc.http2 import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    MAX_INBOUND_FRAME,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Http2Server,
    frame,
)

TIMEOUT = 3.0
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
EOF = grpc.aio.EOF
#: every client connection of the running test, closed when it ends
_WRITERS: list[asyncio.StreamWriter] = []


# ---------------------------------------------------------------------------------- helpers


def msg(body: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message."""
    return bytes((int(compressed),)) + len(body).to_bytes(4, "big") + body


def parse_messages(data: bytes) -> list[bytes]:
    out = []
    while data:
        assert len(data) >= 5, f"truncated message prefix: {data!r}"
        assert data[0] == 0, "the server sent a compressed message"
        size = int.from_bytes(data[1:5], "big")
        assert len(data) >= 5 + size, "truncated message"
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


def setting(key: int, value: int) -> bytes:
    return key.to_bytes(2, "big") + value.to_bytes(4, "big")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def grpc_headers(
    path: str,
    *,
    method: bytes = b"POST",
    content_type: bytes = b"application/grpc",
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        (b"content-type", content_type),
        (b"te", b"trailers"),
        *extra,
    ]


@dataclass
class Resp:
    """One response stream as a client saw it."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None
    data_frames: int = 0

    @property
    def status(self) -> int | None:
        value = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return None if value is None else int(value)

    @property
    def details(self) -> bytes:
        return self.trailers.get(b"grpc-message", self.headers.get(b"grpc-message", b""))

    @property
    def messages(self) -> list[bytes]:
        return parse_messages(self.data)

    @property
    def trailers_only(self) -> bool:
        return b"grpc-status" in self.headers and not self.trailers and not self.data


@dataclass
class Frame:
    kind: int
    flags: int
    sid: int
    payload: bytes
    headers: dict[bytes, bytes] | None = None

    @property
    def error_code(self) -> int:
        if self.kind == GOAWAY:
            return int.from_bytes(self.payload[4:8], "big")
        assert self.kind == RST_STREAM
        return int.from_bytes(self.payload, "big")


class Raw:
    """A client of hand-built frames; decodes what the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.frames: list[Frame] = []
        self.eof = False

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        preface: bytes = PREFACE,
        settings: bytes | None = b"",
        extra: bytes = b"",
    ) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _WRITERS.append(writer)
        client = cls(reader, writer)
        first = preface
        if settings is not None:
            first += frame(SETTINGS, 0, 0, settings)
        writer.write(first + extra)
        return client

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    def headers(
        self, sid: int, headers: list[tuple[bytes, bytes]], flags: int = END_HEADERS
    ) -> bytes:
        return frame(HEADERS, flags, sid, self.encoder.encode(headers))

    async def read_frame(self) -> Frame | None:
        try:
            head = await self.reader.readexactly(9)
            payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof = True
            return None
        f = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
        if f.kind == HEADERS:
            assert f.flags & END_HEADERS, "the server split a header block"
            f.headers = dict(self.decoder.decode(payload, raw=True))
        self.frames.append(f)
        return f

    async def until(self, pred: Callable[[Frame], Any], timeout: float = TIMEOUT) -> Frame:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    f = await self.read_frame()
                    if f is None:
                        pytest.fail(f"connection closed; frames: {self.frames}")
                    if pred(f):
                        return f
        except TimeoutError:
            pytest.fail(f"no matching frame within {timeout}s; frames: {self.frames}")

    async def until_closed(self, timeout: float = TIMEOUT) -> list[Frame]:
        try:
            async with asyncio.timeout(timeout):
                while await self.read_frame() is not None:
                    pass
        except TimeoutError:
            pytest.fail(f"the server did not close within {timeout}s; frames: {self.frames}")
        return self.frames

    async def collect(self, sid: int, timeout: float = TIMEOUT) -> Resp:
        """The response on ``sid`` up to its END_STREAM or RST_STREAM."""
        resp = Resp()

        def done(f: Frame) -> bool:
            if f.sid != sid:
                return False
            if f.kind == HEADERS:
                assert f.headers is not None
                if resp.headers:
                    resp.trailers = f.headers
                else:
                    resp.headers = f.headers
            elif f.kind == DATA:
                resp.data += f.payload
                resp.data_frames += 1
            elif f.kind == RST_STREAM:
                resp.reset = f.error_code
                return True
            if f.flags & END_STREAM and f.kind in (HEADERS, DATA):
                resp.ended = True
                return True
            return False

        await self.until(done, timeout)
        return resp

    async def call(self, sid: int, path: str, messages: Iterable[bytes] = ()) -> Resp:
        body = b"".join(msg(m) for m in messages)
        self.send(self.headers(sid, grpc_headers(path)), frame(DATA, END_STREAM, sid, body))
        return await self.collect(sid)

    async def ping_roundtrip(self, payload: bytes = b"roundtrp") -> list[Frame]:
        """Everything the server sent before it answered a PING sent now."""
        start = len(self.frames)
        self.send(frame(PING, 0, 0, payload))
        await self.until(lambda f: f.kind == PING and f.flags & ACK and f.payload == payload)
        return self.frames[start:-1]

    def close(self) -> None:
        self.writer.close()


class H2:
    """A client on the h2 state machine (which also validates the server's frames)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: H2Connection
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.events: list[ev.Event] = []
        self.auto_ack = True

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> H2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _WRITERS.append(writer)
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if settings:
            conn.local_settings = Settings(
                client=True,
                initial_values={SettingCodes(k): v for k, v in settings.items()},
            )
        conn.initiate_connection()
        client = cls(reader, writer, conn)
        client.flush()
        await client.until(lambda: client.of(ev.RemoteSettingsChanged))
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)
        ]

    async def pump(self) -> None:
        data = await self.reader.read(1 << 16)
        if not data:
            pytest.fail(f"connection closed; events: {self.events}")
        events = self.conn.receive_data(data)
        for e in events:
            if isinstance(e, ev.DataReceived) and self.auto_ack:
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        self.events += events
        self.flush()

    async def until(
        self, pred: Callable[[], Any], timeout: float = TIMEOUT, *, fail: bool = True
    ) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not pred():
                    await self.pump()
        except TimeoutError:
            if fail:
                pytest.fail(f"condition not met within {timeout}s; events: {self.events}")
            return False
        return True

    def start(
        self,
        path: str,
        *,
        end: bool = False,
        method: bytes = b"POST",
        content_type: bytes = b"application/grpc",
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        headers = grpc_headers(path, method=method, content_type=content_type, extra=extra)
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False, pad: int | None = None) -> None:
        self.conn.send_data(sid, data, end_stream=end, pad_length=pad)
        self.flush()

    def finished(self, sid: int) -> bool:
        return bool(self.of(ev.StreamEnded, sid) or self.of(ev.StreamReset, sid))

    async def response(self, sid: int, timeout: float = TIMEOUT) -> Resp:
        await self.until(lambda: self.finished(sid), timeout)
        resp = Resp()
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, ev.ResponseReceived):
                resp.headers = dict(e.headers)
            elif isinstance(e, ev.DataReceived):
                resp.data += e.data
                resp.data_frames += 1
            elif isinstance(e, ev.TrailersReceived):
                resp.trailers = dict(e.headers)
            elif isinstance(e, ev.StreamEnded):
                resp.ended = True
            elif isinstance(e, ev.StreamReset):
                resp.reset = e.error_code
        return resp

    async def call(self, path: str, messages: Iterable[bytes] = (), **kw: Any) -> Resp:
        sid = self.start(path, **kw)
        self.send(sid, b"".join(msg(m) for m in messages), end=True)
        return await self.response(sid)

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------- handlers


async def _echo(call: Any) -> bytes | None:
    m = await call.read()
    return None if m is EOF else m


async def _stream(call: Any) -> None:
    while (m := await call.read()) is not EOF:
        await call.write(m)


async def _collect(call: Any) -> bytes:
    got = []
    while (m := await call.read()) is not EOF:
        got.append(m)
    for m in got:
        await call.write(m[::-1])
    return b"count=%d" % len(got)


async def _early(call: Any) -> bytes:
    await call.read()
    return b"bye"


async def _big_write(call: Any) -> None:
    await call.write(b"x" * int(await call.read()))


async def _big_last(call: Any) -> bytes:
    return b"x" * int(await call.read())


async def _size(call: Any) -> bytes:
    return str(len(await call.read())).encode()


ABORT_DETAILS = "denied: 100% sure\nnä"


async def _abort(call: Any) -> None:
    await call.abort(grpc.StatusCode.PERMISSION_DENIED, ABORT_DETAILS)


async def _abort_after_write(call: Any) -> None:
    await call.write(b"partial")
    await call.abort(9, "failed precondition")


SECRET = "secret-token-4711"


async def _boom(call: Any) -> None:
    raise RuntimeError(SECRET)


async def _meta(call: Any) -> bytes:
    value: str = dict(call.invocation_metadata())["x-check"]
    return value.encode("latin-1")


HANDLERS = {
    "/t.T/Echo": _echo,
    "/t.T/Stream": _stream,
    "/t.T/Collect": _collect,
    "/t.T/Early": _early,
    "/t.T/BigWrite": _big_write,
    "/t.T/BigLast": _big_last,
    "/t.T/Size": _size,
    "/t.T/Abort": _abort,
    "/t.T/AbortAfterWrite": _abort_after_write,
    "/t.T/Boom": _boom,
    "/t.T/Meta": _meta,
}


@contextlib.asynccontextmanager
async def serving(
    handlers: dict[str, Any] | None = None, **kw: Any
) -> AsyncIterator[tuple[Http2Server, int]]:
    server = Http2Server(handlers={**HANDLERS, **(handlers or {})}, **kw)
    port = await server.listen("127.0.0.1:0")
    try:
        yield server, port
    finally:
        await server.stop(0)


async def eventually(
    cond: Callable[[], Any], timeout: float = TIMEOUT, what: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s {what()}")
        await asyncio.sleep(0.005)


async def assert_serves(port: int) -> None:
    """A fresh connection gets a correct answer."""
    client = await H2.connect(port)
    try:
        resp = await client.call("/t.T/Echo", [b"still alive"])
        assert resp.status == 0
        assert resp.messages == [b"still alive"]
    finally:
        client.close()


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Nothing may reach the loop's exception handler (``Exception in callback`` etc.)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
        while _WRITERS:
            _WRITERS.pop().close()
        await asyncio.sleep(0.01)
        gc.collect()  # "Task exception was never retrieved" is reported when collected
    finally:
        loop.set_exception_handler(previous)
    assert not errors, f"loop exception handler was called: {errors}"


# ---------------------------------------------------------------------------------- 1. basics


async def test_unary_echo() -> None:
    async with serving() as (_, port):
        client = await H2.connect(port)
        resp = await client.call("/t.T/Echo", [b"hello"])
        assert resp.headers[b":status"] == b"200"
        assert resp.headers[b"content-type"] == b"application/grpc"
        assert resp.data == msg(b"hello")
        assert resp.trailers == {b"grpc-status": b"0"}
        assert resp.ended and resp.reset is None
        (trailers,) = client.of(ev.TrailersReceived)
        assert trailers.stream_ended is not None  # END_STREAM on the trailers
        client.close()


async def test_reads_until_eof_and_streams_writes() -> None:
    async with serving() as (_, port):
        client = await H2.connect(port)
        sid = client.start("/t.T/Collect")
        one, two, three = msg(b"first"), msg(b"second"), msg(b"third")
        client.send(sid, one[:3])  # a message split over DATA frames
        client.send(sid, one[3:] + two)  # two messages in one DATA frame
        await asyncio.sleep(0.02)
        assert not client.finished(sid)  # still reading: no EOF yet
        client.send(sid, three)
        client.send(sid, b"", end=True)
        resp = await client.response(sid)
        assert resp.status == 0
        assert resp.messages == [b"tsrif", b"dnoces", b"driht", b"count=3"]
        client.close()


# ---------------------------------------------------------------------------------- 2. early end


async def test_early_end_resets_the_half_open_stream_and_ignores_late_data() -> None:
    async with serving() as (server, port):
        client = await H2.connect(port)
        sid = client.start("/t.T/Early")
        client.send(sid, msg(b"hi"))  # no END_STREAM
        await client.until(lambda: client.of(ev.StreamReset, sid))
        resp = await client.response(sid)
        assert resp.status == 0 and resp.messages == [b"bye"]
        assert resp.ended
        assert resp.reset == NO_ERROR
        kinds = [type(e) for e in client.events if getattr(e, "stream_id", None) == sid]
        assert kinds.index(ev.StreamReset) > kinds.index(ev.StreamEnded)
        # the client had sent more before it saw the reset: dropped, no connection error
        client.writer.write(frame(DATA, 0, sid, msg(b"late")) + frame(DATA, END_STREAM, sid))
        resp2 = await client.call("/t.T/Echo", [b"next"])
        assert resp2.status == 0 and resp2.messages == [b"next"]
        assert not client.of(ev.ConnectionTerminated)
        assert server.active == 0
        client.close()


# ---------------------------------------------------------------------------------- 3. errors


@pytest.mark.parametrize(
    ("path", "kw", "code"),
    [
        ("/t.T/Nope", {}, 12),
        ("/t.T/Echo", {"method": b"GET"}, 12),
        ("/t.T/Echo", {"content_type": b"text/plain"}, 12),
        ("/t.T/Echo", {"content_type": b"application/grpc+proto"}, 0),
    ],
    ids=["unknown-path", "get", "not-grpc", "grpc+proto-ok"],
)
async def test_request_routing(path: str, kw: dict[str, Any], code: int) -> None:
    async with serving() as (_, port):
        client = await H2.connect(port)
        if kw.get("method") == b"GET":
            sid = client.start(path, end=True, **kw)
            resp = await client.response(sid)
        else:
            resp = await client.call(path, [b"x"], **kw)
        assert resp.status == code
        assert resp.headers[b":status"] == b"200"
        assert resp.headers[b"content-type"] == b"application/grpc"
        if code:
            assert resp.trailers_only  # one HEADERS with END_STREAM, nothing else
            assert resp.ended
            assert resp.details
        client.close()


async def test_abort_is_trailers_only_with_percent_encoded_message() -> None:
    async with serving() as (_, port):
        client = await H2.connect(port)
        resp = await client.call("/t.T/Abort", [b"x"])
        assert resp.trailers_only and resp.ended
        assert resp.status == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert resp.details == b"denied: 100%25 sure%0An%C3%A4"
        assert all(0x20 <= b <= 0x7E for b in resp.details)
        assert urllib.parse.unquote(resp.details.decode()) == ABORT_DETAILS

        resp = await client.call("/t.T/AbortAfterWrite", [b"x"])
        assert resp.messages == [b"partial"]
        assert resp.trailers[b"grpc-status"] == b"9"
        assert resp.trailers[b"grpc-message"] == b"failed precondition"
        client.close()


async def test_handler_exception_is_unknown_without_leaking() -> None:
    async with serving() as (_, port):
        client = await H2.connect(port)
        resp = await client.call("/t.T/Boom", [b"x"])
        assert resp.status == 2
        assert resp.details == b"internal error"
        everything = repr(resp.headers) + repr(resp.trailers) + repr(resp.data)
        assert SECRET not in everything and "RuntimeError" not in everything
        client.close()


# ---------------------------------------------------------------------------------- 4. flow control


@pytest.mark.parametrize("path", ["/t.T/BigWrite", "/t.T/BigLast"])
async def test_server_respects_a_tiny_stream_window(path: str) -> None:
    async with serving() as (_, port):
        client = await H2.connect(port, {INITIAL_WINDOW_SIZE: 100})
        client.auto_ack = False
        sid = client.start(path)
        client.send(sid, msg(b"10000"), end=True)

        def received() -> int:
            return sum(len(e.data) for e in client.of(ev.DataReceived, sid))

        await client.until(lambda: received() >= 100 or client.finished(sid))
        with contextlib.suppress(asyncio.TimeoutError):  # nothing more may come
            await asyncio.wait_for(client.pump(), 0.1)
        assert received() == 100
        assert not client.of(ev.TrailersReceived, sid) and not client.finished(sid)

        client.conn.increment_flow_control_window(20_000, stream_id=sid)
        client.conn.increment_flow_control_window(20_000)
        client.flush()
        resp = await client.response(sid)
        assert resp.status == 0
        assert resp.messages == [b"x" * 10_000]
        kinds = [type(e) for e in client.events if getattr(e, "stream_id", None) == sid]
        last_data = len(kinds) - 1 - kinds[::-1].index(ev.DataReceived)
        assert kinds.index(ev.TrailersReceived) > last_data
        client.close()


@pytest.mark.parametrize("max_frame", [None, 32_768])
async def test_data_frames_respect_peer_max_frame_size(max_frame: int | None) -> None:
    async with serving() as (_, port):
        settings = setting(INITIAL_WINDOW_SIZE, 1 << 20)
        if max_frame:
            settings += setting(MAX_FRAME_SIZE, max_frame)
        raw = await Raw.connect(port, settings=settings)
        raw.send(frame(WINDOW_UPDATE, 0, 0, u32(1 << 20)))
        resp = await raw.call(1, "/t.T/BigWrite", [b"100000"])
        assert resp.status == 0
        assert resp.messages == [b"x" * 100_000]
        sizes = [len(f.payload) for f in raw.frames if f.kind == DATA]
        assert max(sizes) <= (max_frame or 16_384)
        assert sum(sizes) == 100_005
        raw.close()


async def test_client_can_send_a_message_larger_than_the_stream_window() -> None:
    """A 3 MB message with max_message_bytes 4 MB: the server must open its windows."""
    size = 3_000_000
    async with serving(max_message_bytes=4 * 1024 * 1024) as (_, port):
        client = await H2.connect(port)
        sid = client.start("/t.T/Size")
        body = msg(b"m" * size)
        sent = 0
        while sent < len(body):
            window = client.conn.local_flow_control_window(sid)
            if window <= 0:
                if not await client.until(
                    lambda: client.conn.local_flow_control_window(sid) > 0, 1.5, fail=False
                ):
                    pytest.fail(
                        f"the server never reopened its window: stuck after {sent} of "
                        f"{len(body)} bytes (no WINDOW_UPDATE for stream {sid})"
                    )
                continue
            n = min(window, client.conn.max_outbound_frame_size, len(body) - sent)
            client.send(sid, body[sent : sent + n])
            sent += n
            await client.writer.drain()
        client.send(sid, b"", end=True)
        resp = await client.response(sid)
        assert resp.status == 0
        assert resp.messages == [str(size).encode()]
        client.close()


# ---------------------------------------------------------------------------------- 5. limits


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (msg(b"a" * 2000), 8),  # larger than max_message_bytes
        (msg(b"a" * 1000), 0),  # exactly the limit
        (msg(b"abc", compressed=True), 12),
    ],
    ids=["too-large", "at-limit", "compressed"],
)
async def test_message_limits(body: bytes, code: int) -> None:
    async with serving(max_message_bytes=1000) as (_, port):
        client = await H2.connect(port)
        sid = client.start("/t.T/Echo")
        client.send(sid, body)  # no END_STREAM: the server decides on the prefix
        if code == 0:
            client.send(sid, b"", end=True)
        resp = await client.response(sid)
        assert resp.status == code
        if code:
            assert resp.trailers_only and resp.details
        client.close()


async def test_end_stream_inside_a_message_is_an_error_not_a_hang() -> None:
    async with serving() as (_, port):
        raw = await Raw.connect(port)
        raw.send(
            raw.headers(1, grpc_headers("/t.T/Echo")),
            frame(DATA, END_STREAM, 1, msg(b"0123456789")[:8]),
        )
        started = time.monotonic()
        resp = await raw.collect(1, timeout=1.0)
        assert time.monotonic() - started < 0.5
        assert resp.ended
        assert resp.status not in (None, 0)
        raw.close()


@pytest.mark.parametrize(
    "body",
    [msg(b"0123456789")[:8], msg(b"a" * 2000), msg(b"abc", compressed=True)],
    ids=["end-inside-message", "too-large", "compressed"],
)
async def test_no_rst_stream_on_a_stream_closed_by_both_sides(body: bytes) -> None:
    """The client half-closed with the DATA; the server's trailers (END_STREAM) close the
    stream, and nothing but PRIORITY may be sent on a closed stream (RFC 9113 5.1)."""
    async with serving(max_message_bytes=1000) as (_, port):
        raw = await Raw.connect(port)
        raw.send(raw.headers(1, grpc_headers("/t.T/Echo")), frame(DATA, END_STREAM, 1, body))
        resp = await raw.collect(1)
        assert resp.ended and resp.status not in (None, 0)
        later = await raw.ping_roundtrip()
        assert [f for f in later if f.sid == 1] == []
        raw.close()


@pytest.mark.parametrize(
    "after",
    [
        frame(RST_STREAM, 0, 1, u32(CANCEL)),
        frame(DATA, 0, 1, msg(b"a" * 2000)),
        frame(DATA, 0, 1, msg(b"abc", compressed=True)),
        frame(DATA, END_STREAM, 1, msg(b"0123456789")[:8]),
    ],
    ids=["rst-stream", "too-large", "compressed", "end-inside-message"],
)
async def test_call_ended_before_its_handler_ran_frees_its_slot(after: bytes) -> None:
    """HEADERS and what ends the call arrive in one read, before the handler's task first
    runs: the call must still give back its concurrency slot."""
    async with serving(max_concurrent_streams=1, max_message_bytes=1000) as (server, port):
        raw = await Raw.connect(port)
        raw.send(raw.headers(1, grpc_headers("/t.T/Echo")) + after)
        await raw.ping_roundtrip()
        await asyncio.sleep(0.02)
        resp = await raw.call(3, "/t.T/Echo", [b"next"])
        assert (resp.status, resp.details) == (0, b""), f"server.active={server.active}"
        assert resp.messages == [b"next"]
        raw.close()


# ---------------------------------------------------------------------------------- 6. framing


@pytest.mark.parametrize("piece", [1, 7, MAX_INBOUND_FRAME])
async def test_headers_split_over_continuation(piece: int) -> None:
    async with serving() as (_, port):
        raw = await Raw.connect(port)
        check = b"v" * (20_000 if piece == MAX_INBOUND_FRAME else 50)
        block = raw.encoder.encode(grpc_headers("/t.T/Meta", extra=[(b"x-check", check)]))
        parts = [block[i : i + piece] for i in range(0, len(block), piece)]
        assert len(parts) >= 2
        frames = [frame(HEADERS, 0, 1, parts[0])]
        frames += [frame(CONTINUATION, 0, 1, p) for p in parts[1:-1]]
        frames.append(frame(CONTINUATION, END_HEADERS, 1, parts[-1]))
        raw.send(*frames, frame(DATA, END_STREAM, 1, msg(b"")))
        resp = await raw.collect(1)
        assert resp.status == 0
        assert resp.messages == [check]
        raw.close()


async def test_padded_headers_with_priority_and_padded_data() -> None:
    async with serving() as (_, port):
        raw = await Raw.connect(port)
        block = raw.encoder.encode(grpc_headers("/t.T/Collect"))
        priority = u32(0) + bytes((15,))
        headers = bytes((7,)) + priority + block + b"\0" * 7
        body = msg(b"padded") + msg(b"two")
        raw.send(
            frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, headers),
            frame(DATA, PADDED, 1, bytes((3,)) + body[:4] + b"\0" * 3),
            frame(DATA, PADDED, 1, bytes((0,)) + body[4:9]),
            frame(DATA, PADDED, 1, bytes((200,)) + body[9:] + b"\0" * 200),
            frame(DATA, PADDED | END_STREAM, 1, bytes((5,)) + b"\0" * 5),  # padding only
        )
        resp = await raw.collect(1)
        assert resp.status == 0
        assert resp.messages == [b"deddap", b"owt", b"count=2"]
        raw.close()


async def test_padded_data_through_h2() -> None:
    async with serving() as (_, port):
        client = await H2.connect(port)
        sid = client.start("/t.T/Echo")
        client.send(sid, msg(b"with padding"), end=True, pad=32)
        resp = await client.response(sid)
        assert resp.status == 0 and resp.messages == [b"with padding"]
        client.close()


# ------------------------------------------------------------------------ 7. PING, SETTINGS


async def test_ping_and_settings_are_acknowledged() -> None:
    async with serving(max_concurrent_streams=77) as (_, port):
        raw = await Raw.connect(port)
        theirs = await raw.until(lambda f: f.kind == SETTINGS and not f.flags & ACK)
        values = {
            int.from_bytes(theirs.payload[i : i + 2], "big"): int.from_bytes(
                theirs.payload[i + 2 : i + 6], "big"
            )
            for i in range(0, len(theirs.payload), 6)
        }
        assert values[3] == 77  # SETTINGS_MAX_CONCURRENT_STREAMS
        ack = await raw.until(lambda f: f.kind == SETTINGS and f.flags & ACK)
        assert ack.payload == b"" and ack.sid == 0

        raw.send(frame(PING, 0, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
        pong = await raw.until(lambda f: f.kind == PING)
        assert pong.flags & ACK and pong.sid == 0
        assert pong.payload == b"\x01\x02\x03\x04\x05\x06\x07\x08"

        raw.send(frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, 70_000)))
        ack = await raw.until(lambda f: f.kind == SETTINGS)
        assert ack.flags & ACK and ack.payload == b""

        # a PING ACK from the client is not answered; the next PING is
        raw.send(frame(PING, ACK, 0, b"zzzzzzzz"), frame(PING, 0, 0, b"yyyyyyyy"))
        pong = await raw.until(lambda f: f.kind == PING)
        assert pong.payload == b"yyyyyyyy"
        raw.close()


# ------------------------------------------------------------------------ 8. connection errors

_E = Encoder()
_GOOD_BLOCK = _E.encode(grpc_headers("/t.T/Echo"))

CONNECTION_ERRORS: dict[str, tuple[dict[str, Any], bytes, int]] = {
    "bad-preface": (
        {"preface": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "settings": None},
        b"",
        PROTOCOL_ERROR,
    ),
    "first-frame-not-settings": (
        {"settings": None},
        frame(PING, 0, 0, b"12345678"),
        PROTOCOL_ERROR,
    ),
    "even-stream-id": ({}, frame(HEADERS, END_HEADERS, 2, _GOOD_BLOCK), PROTOCOL_ERROR),
    "data-on-stream-0": ({}, frame(DATA, 0, 0, b"abc"), PROTOCOL_ERROR),
    "frame-too-large": (
        {},
        (MAX_INBOUND_FRAME + 1).to_bytes(3, "big") + b"\0\0" + u32(1),
        FRAME_SIZE_ERROR,
    ),
    "continuation-without-headers": (
        {},
        frame(CONTINUATION, END_HEADERS, 1, _GOOD_BLOCK),
        PROTOCOL_ERROR,
    ),
    "headers-interrupted": (
        {},
        frame(HEADERS, 0, 1, _GOOD_BLOCK[:3]) + frame(PING, 0, 0, b"12345678"),
        PROTOCOL_ERROR,
    ),
    "garbage-hpack": ({}, frame(HEADERS, END_HEADERS, 1, b"\xbf\xff\xff\x7f"), COMPRESSION_ERROR),
    "push-promise": ({}, frame(PUSH_PROMISE, END_HEADERS, 1, u32(2)), PROTOCOL_ERROR),
    "window-overflow": ({}, frame(WINDOW_UPDATE, 0, 0, u32(0x7FFFFFFF)), FLOW_CONTROL_ERROR),
    "ping-wrong-size": ({}, frame(PING, 0, 0, b"1234"), FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
async def test_connection_error_goaway_and_close(case: str) -> None:
    connect_kw, payload, code = CONNECTION_ERRORS[case]
    async with serving() as (server, port):
        raw = await Raw.connect(port, extra=payload, **connect_kw)
        frames = await raw.until_closed()
        goaways = [f for f in frames if f.kind == GOAWAY]
        assert goaways, f"no GOAWAY before the close: {frames}"
        assert goaways[-1] is frames[-1]
        assert goaways[-1].error_code == code
        assert goaways[-1].sid == 0
        await eventually(lambda: not server.connections)
        await assert_serves(port)


# ---------------------------------------------------------------------------------- 9-11. lifecycle


async def test_rst_stream_cancels_the_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait(call: Any) -> None:
        started.set()
        try:
            await call.read()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving({"/t.T/Wait": wait}) as (server, port):
        raw = await Raw.connect(port)
        raw.send(raw.headers(1, grpc_headers("/t.T/Wait")))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        start = len(raw.frames)
        raw.send(frame(RST_STREAM, 0, 1, u32(CANCEL)))
        await asyncio.wait_for(cancelled.wait(), 2)
        await eventually(lambda: server.active == 0)
        await raw.ping_roundtrip()
        assert [f for f in raw.frames[start:] if f.sid == 1] == []  # nothing after a reset
        resp = await raw.call(3, "/t.T/Echo", [b"after"])
        assert resp.status == 0 and resp.messages == [b"after"]
        raw.close()


async def test_grpc_timeout_is_deadline_exceeded() -> None:
    cancelled = asyncio.Event()

    async def sleepy(call: Any) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving({"/t.T/Sleepy": sleepy}) as (server, port):
        client = await H2.connect(port)
        started = time.monotonic()
        resp = await client.call("/t.T/Sleepy", [b"x"], extra=[(b"grpc-timeout", b"50m")])
        elapsed = time.monotonic() - started
        assert resp.status == 4
        assert 0.03 <= elapsed < 0.5
        await asyncio.wait_for(cancelled.wait(), 1)
        await eventually(lambda: server.active == 0)
        client.close()


async def test_max_concurrent_streams() -> None:
    release = asyncio.Event()
    running = 0

    async def block(call: Any) -> bytes:
        nonlocal running
        running += 1
        await release.wait()
        return b"ok"

    async with serving({"/t.T/Block": block}, max_concurrent_streams=2) as (server, port):
        raw = await Raw.connect(port)
        for sid in (1, 3):
            raw.send(raw.headers(sid, grpc_headers("/t.T/Block"), END_HEADERS | END_STREAM))
        await eventually(lambda: running == 2)
        raw.send(raw.headers(5, grpc_headers("/t.T/Block"), END_HEADERS | END_STREAM))
        third = await raw.collect(5)
        assert third.status == 8 and third.trailers_only
        assert running == 2
        release.set()
        for sid in (1, 3):
            resp = await raw.collect(sid)
            assert resp.status == 0 and resp.messages == [b"ok"]
        await eventually(lambda: server.active == 0)
        resp = await raw.call(7, "/t.T/Echo", [b"again"])
        assert resp.status == 0 and resp.messages == [b"again"]
        raw.close()


# ---------------------------------------------------------------------------------- 12. stop


async def test_graceful_stop() -> None:
    started = asyncio.Event()

    async def slow(call: Any) -> bytes:
        started.set()
        m: bytes = await call.read()
        return b"done:" + m

    server = Http2Server(handlers={**HANDLERS, "/t.T/Slow": slow})
    port = await server.listen("127.0.0.1:0")
    raw = await Raw.connect(port)
    raw.send(raw.headers(1, grpc_headers("/t.T/Slow")))
    await asyncio.wait_for(started.wait(), TIMEOUT)

    began = time.monotonic()
    stopping = asyncio.create_task(server.stop(2))
    # RFC 9113 6.8: first a GOAWAY with the largest stream id and a PING ...
    first = await raw.until(lambda f: f.kind == GOAWAY)
    assert first.error_code == NO_ERROR
    assert int.from_bytes(first.payload[:4], "big") == 2**31 - 1
    ping = await raw.until(lambda f: f.kind == PING)
    assert not ping.flags & ACK
    # ... so a stream the client opened before it saw the GOAWAY is still served
    raw.send(raw.headers(3, grpc_headers("/t.T/Echo")), frame(DATA, END_STREAM, 3, msg(b"x")))
    early = await raw.collect(3)
    assert early.status == 0 and early.messages == [b"x"]
    # the PING's ACK: now the final GOAWAY names the last stream taken, and a later one is
    # refused
    raw.send(frame(PING, ACK, 0, ping.payload))
    final = await raw.until(lambda f: f.kind == GOAWAY)
    assert final.error_code == NO_ERROR and int.from_bytes(final.payload[:4], "big") == 3
    raw.send(raw.headers(5, grpc_headers("/t.T/Echo")), frame(DATA, END_STREAM, 5, msg(b"x")))
    refused = await raw.until(lambda f: f.sid == 5)
    assert refused.kind == RST_STREAM and refused.error_code == REFUSED_STREAM

    raw.send(frame(DATA, END_STREAM, 1, msg(b"in flight")))
    resp = await raw.collect(1)
    assert resp.status == 0 and resp.messages == [b"done:in flight"]
    await asyncio.wait_for(stopping, 2)
    assert time.monotonic() - began < 1.5  # did not wait the whole grace
    await raw.until_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# ---------------------------------------------------------------------------------- 13. health


async def test_health_service() -> None:
    health = HealthService()
    pb = health_pb2.HealthCheckResponse
    async with serving({CHECK: functools.partial(health.check, None)}) as (_, port):
        client = await H2.connect(port)

        async def check(service: str) -> Resp:
            req = health_pb2.HealthCheckRequest(service=service).SerializeToString()
            return await client.call(CHECK, [req])

        resp = await check("")
        assert resp.status == 0
        assert pb.FromString(resp.messages[0]).status == pb.SERVING

        await health.set("x", pb.NOT_SERVING)
        resp = await check("x")
        assert resp.status == 0
        assert pb.FromString(resp.messages[0]).status == pb.NOT_SERVING

        resp = await check("unknown")
        assert resp.status == 5 and resp.trailers_only
        client.close()


# ---------------------------------------------------------------------------------- 14. grpc.aio


async def test_grpc_aio_client_interop() -> None:
    health = HealthService()
    async with (
        serving({CHECK: functools.partial(health.check, None)}) as (_, port),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stream = channel.stream_stream(
            "/t.T/Stream", request_serializer=None, response_deserializer=None
        )
        requests = [b"one", b"two", b"", b"z" * 200_000]
        call = stream(iter(requests), timeout=5)
        assert [m async for m in call] == requests
        assert await call.code() == grpc.StatusCode.OK

        unary = channel.unary_unary("/t.T/Echo", request_serializer=None)
        assert await unary(b"ping", timeout=5) == b"ping"

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/t.T/Abort")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == ABORT_DETAILS

        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_streams_changes_to_a_grpc_aio_client() -> None:
    health = HealthService()
    pb = health_pb2.HealthCheckResponse
    handlers = {f"/grpc.health.v1.Health/{n}": functools.partial(m, None)
                for n, m in health.methods().items()}  # fmt: skip
    async with (
        serving(handlers) as (_, port),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
        assert (await watch.read()).status == pb.SERVICE_UNKNOWN
        await health.set("svc", pb.SERVING)
        assert (await watch.read()).status == pb.SERVING
        await health.set("svc", pb.SERVING)  # no change, nothing sent
        await health.set("svc", pb.NOT_SERVING)
        assert (await watch.read()).status == pb.NOT_SERVING
        health.end_watches()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------- 15. fuzz


def _valid_frames(enc: Encoder) -> list[bytes]:
    return [
        frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, 1000)),
        frame(HEADERS, END_HEADERS, 1, enc.encode(grpc_headers("/t.T/Stream"))),
        frame(DATA, 0, 1, msg(b"abc") + msg(b"d" * 40)[:10]),
        frame(DATA, 0, 1, msg(b"d" * 40)[10:]),
        frame(PING, 0, 0, b"pingpong"),
        frame(WINDOW_UPDATE, 0, 1, u32(100)),
        frame(HEADERS, 0, 3, enc.encode(grpc_headers("/t.T/Collect", extra=[(b"k", b"v")]))),
        frame(CONTINUATION, END_HEADERS, 3, b""),
        frame(DATA, PADDED, 3, bytes((2,)) + msg(b"xy") + b"\0\0"),
        frame(RST_STREAM, 0, 3, u32(CANCEL)),
        frame(DATA, END_STREAM, 1, msg(b"end")),
        frame(SETTINGS, ACK, 0),
        frame(GOAWAY, 0, 0, u32(0) + u32(0)),
    ]


def _mutate(rng: random.Random, frames: list[bytes]) -> bytes:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(frames))
        f = bytearray(frames[i])
        how = rng.randrange(7)
        if how == 0:  # flip bytes anywhere
            for _ in range(rng.randint(1, 4)):
                f[rng.randrange(len(f))] = rng.randrange(256)
        elif how == 1:  # another type
            f[3] = rng.randrange(12)
        elif how == 2:  # other flags
            f[4] = rng.randrange(256)
        elif how == 3:  # another stream
            f[5:9] = u32(rng.choice([0, 1, 2, 3, 5, 0x7FFFFFFF, rng.randrange(1 << 32)]))
        elif how == 4:  # a lying length
            f[0:3] = rng.randrange(1 << 15).to_bytes(3, "big")
        elif how == 5:
            frames.insert(rng.randrange(len(frames) + 1), bytes(f))  # duplicated
        else:
            del frames[i]
            continue
        frames[i] = bytes(f)
    return b"".join(frames)


async def _fuzz_case(port: int, payload: bytes) -> None:
    raw = await Raw.connect(port)
    # then zeros: they complete any partial frame and end in DATA on stream 0, a connection
    # error, so every case must end with the server closing the connection
    raw.send(payload + b"\0" * (MAX_INBOUND_FRAME + 18))
    frames = await raw.until_closed()
    goaways = [f for f in frames if f.kind == GOAWAY]
    if goaways:  # (the kernel may turn the close into a reset that loses the GOAWAY)
        assert goaways[-1] is frames[-1]
        assert goaways[-1].error_code != NO_ERROR
    raw.close()


async def test_fuzz_never_crashes_the_server(
    loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(1)
    cases = []
    for n in range(200):
        if n % 2:
            cases.append(rng.randbytes(rng.randint(1, 300)))
        else:
            cases.append(_mutate(rng, _valid_frames(Encoder())))
    async with serving() as (server, port):
        for i in range(0, len(cases), 25):
            await asyncio.gather(*(_fuzz_case(port, c) for c in cases[i : i + 25]))
        await eventually(lambda: not server.connections)
        assert loop_errors == []
        # a bug in frame handling is caught per connection (GOAWAY INTERNAL_ERROR) and logged:
        # the fuzz must not find one either
        assert not [r for r in caplog.records if r.getMessage() == "HTTP/2 connection failed"]
        await assert_serves(port)
        # no call may stay counted once its connection is gone
        await eventually(lambda: server.active == 0, what=lambda: f"active={server.active}")


def _decoder_only() -> Any:
    """A connection object with just its HPACK state (no socket, no server)."""
    from extproc.http2 import _Connection

    conn = _Connection.__new__(_Connection)
    conn.decoder = Decoder()
    conn.header_cache = {}
    conn.table_generation = 0
    return conn


def test_a_repeated_header_block_is_decoded_once_while_the_table_stands_still() -> None:
    conn = _decoder_only()
    # literal with incremental indexing: the table now holds x-first: one (index 62)
    conn._decode(bytes([0x40, 7]) + b"x-first" + bytes([3]) + b"one")
    # an all-indexed block, as Envoy sends for every stream after its first
    block = bytes([0x80 | 62, 0x80 | 2])  # dynamic entry 62, then static ':method: GET'
    assert conn._decode(block) == ((b"x-first", b"one"), (b":method", b"GET"))
    assert block in conn.header_cache
    cached = conn._decode(block)
    assert cached is conn._decode(block)  # the same object: not decoded again
    # a block that inserts an entry moves index 62 to the new entry: the same bytes now mean
    # something else, and the cache must not answer with the old meaning
    conn._decode(bytes([0x40, 8]) + b"x-second" + bytes([3]) + b"two")
    assert conn._decode(block) == ((b"x-second", b"two"), (b":method", b"GET"))


def test_an_eviction_or_a_table_resize_also_invalidates_cached_blocks() -> None:
    conn = _decoder_only()
    conn._decode(bytes([0x40, 6]) + b"x-keep" + bytes([1]) + b"k")  # index 62
    block = bytes([0x80 | 62])
    assert conn._decode(block) == ((b"x-keep", b"k"),)
    conn._decode(bytes([0x20]))  # dynamic table size update to 0: everything evicted
    with pytest.raises(InvalidTableIndexError):
        conn._decode(block)  # index 62 no longer exists: not a stale cached answer


async def test_a_ping_flood_ends_the_connection_but_spaced_keepalives_never_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from extproc import http2

    async with serving() as (_, port):
        raw = await Raw.connect(port)
        raw.send(*(frame(PING, 0, 0, b"%08d" % i) for i in range(50)))
        goaway = await raw.until(lambda f: f.kind == GOAWAY)
        assert int.from_bytes(goaway.payload[4:8], "big") == 0xB  # ENHANCE_YOUR_CALM
        raw.close()
        # keepalives far apart (here: an interval of 0 s stands for "far apart") are answered
        # for as long as the connection lives, with no stream on it
        monkeypatch.setattr(http2, "MIN_PING_INTERVAL_S", 0.0)
        raw = await Raw.connect(port)
        raw.send(*(frame(PING, 0, 0, b"%08d" % i) for i in range(200)))
        for i in range(200):
            pong = await raw.until(lambda f: f.kind in (PING, GOAWAY))
            assert pong.kind == PING and pong.payload == b"%08d" % i
        raw.close()


async def test_graceful_stop_sends_the_final_goaway_without_the_pings_ack() -> None:
    started = asyncio.Event()

    async def slow(call: Any) -> bytes:
        started.set()
        await call.read()
        return b""

    server = Http2Server(handlers={"/t.T/Slow": slow})
    port = await server.listen("127.0.0.1:0")
    raw = await Raw.connect(port)
    raw.send(raw.headers(1, grpc_headers("/t.T/Slow")))
    await asyncio.wait_for(started.wait(), TIMEOUT)
    stopping = asyncio.create_task(server.stop(3))
    first = await raw.until(lambda f: f.kind == GOAWAY)
    assert int.from_bytes(first.payload[:4], "big") == 2**31 - 1
    began = time.monotonic()
    final = await raw.until(lambda f: f.kind == GOAWAY)  # the PING is never answered
    assert int.from_bytes(final.payload[:4], "big") == 1
    assert 0.5 < time.monotonic() - began < 2.0  # SHUTDOWN_PING_TIMEOUT_S
    raw.send(frame(DATA, END_STREAM, 1, msg(b"x")))
    assert (await raw.collect(1)).status == 0
    await asyncio.wait_for(stopping, 3)


async def test_a_bug_in_frame_handling_ends_that_connection_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from extproc import http2

    def broken(self: Any, sid: int, flags: int, payload: bytes) -> None:
        raise RuntimeError("secret internal detail")

    async with serving() as (_, port):
        monkeypatch.setattr(http2._Connection, "_ping", broken)
        raw = await Raw.connect(port)
        raw.send(frame(PING, 0, 0, b"12345678"))
        goaway = await raw.until(lambda f: f.kind == GOAWAY)
        assert goaway.error_code == 0x2  # INTERNAL_ERROR
        assert b"secret" not in goaway.payload  # nothing of the exception reaches the peer
        await raw.until_closed()
        monkeypatch.undo()
        client = await H2.connect(port)  # the server serves on
        assert (await client.call("/t.T/Echo", [b"ok"])).trailers == {b"grpc-status": b"0"}
        client.close()
    assert "secret internal detail" in caplog.text  # but the log has it


async def test_graceful_stop_of_an_idle_server_still_serves_a_stream_opened_in_the_meantime() -> (
    None
):
    """No call is running when the stop begins; the client opens one before it has seen the
    first GOAWAY. The server waits for the final GOAWAY (the PING's ACK) before it calls
    itself idle, so that stream is served, not cut by the close."""
    server = Http2Server(handlers=HANDLERS)
    port = await server.listen("127.0.0.1:0")
    raw = await Raw.connect(port)
    await raw.until(lambda f: f.kind == SETTINGS and f.flags & ACK)
    stopping = asyncio.create_task(server.stop(2))
    await raw.until(lambda f: f.kind == GOAWAY)
    ping = await raw.until(lambda f: f.kind == PING)
    raw.send(raw.headers(1, grpc_headers("/t.T/Echo")), frame(DATA, END_STREAM, 1, msg(b"late")))
    await asyncio.sleep(0.05)
    raw.send(frame(PING, ACK, 0, ping.payload))
    resp = await raw.collect(1)
    assert resp.status == 0 and resp.messages == [b"late"]
    await asyncio.wait_for(stopping, 3)
