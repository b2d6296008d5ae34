"""A gRPC server speaking HTTP/2 directly on asyncio: the ``server.transport: http2`` option.

grpc.aio costs a Python ext_proc sidecar more per stream than everything extproc does itself
(the C core's completion queue, its poller and EventEngine threads, and the bridge back into
asyncio: ``bench/README.md``). This module implements the part of gRPC-over-HTTP/2 that an
ext_proc client needs, in one asyncio ``Protocol`` per connection:

* HTTP/2 (RFC 9113): the connection preface, SETTINGS (and their ACK), PING ACKs, GOAWAY both
  ways, RST_STREAM, WINDOW_UPDATE and flow control in both directions, HEADERS with
  CONTINUATION, padding and priority fields, stream-id rules; errors end the connection with
  a GOAWAY naming the error. Header blocks are decoded with ``hpack`` (every block, also of
  streams we no longer track, so the decoder's table stays in step with the peer's); the
  headers we send are pre-encoded literals that never touch the dynamic table.
* gRPC (the HTTP/2 protocol spec of grpc/grpc): ``POST`` to ``/service/method``,
  length-prefixed messages in DATA frames, ``:status 200`` + ``application/grpc`` response
  headers, ``grpc-status`` / ``grpc-message`` trailers (trailers-only for an error before any
  message), ``grpc-timeout``; uncompressed messages only (compressed ones are refused with
  UNIMPLEMENTED, and no ``grpc-accept-encoding`` is advertised).

A method handler gets a :class:`Call`, reads requests with ``await call.read()``
(``grpc.aio.EOF`` when the client half-closes), writes with ``await call.write(data)`` and
returns the last message (sent with the status in one write) or ``None``. The same handler
runs on grpc.aio as a stream-unary method: :class:`Call` has the ``ServicerContext`` methods
extproc uses (``read``, ``write``, ``abort``, ``invocation_metadata``).

TLS (1.2+, ALPN ``h2``, optional client certificates) comes from :class:`extproc.tls.ServerTls`.
Not implemented: server push (never used by gRPC), compression, HTTP/1.1 upgrade. Stream
priority is ignored, as RFC 9113 allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn

import grpc
from hpack import Decoder
from hpack.exceptions import HPACKError

if TYPE_CHECKING:
    from extproc.tls import ServerTls

__all__ = ["AbortCall", "Call", "Handler", "Http2Server"]

log = logging.getLogger("extproc.http2")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

DEFAULT_WINDOW: Final = 65_535
MAX_WINDOW: Final = 2**31 - 1
#: what we let each stream (at least: a whole message of ``max_message_bytes`` must fit, as
#: a message's bytes are given back only once the handler has read it), and the whole
#: connection, receive before the handler reads it
STREAM_WINDOW: Final = 1 << 20
CONNECTION_WINDOW: Final = 1 << 24
MAX_HEADER_LIST: Final = 64 * 1024
#: frames we accept (our SETTINGS_MAX_FRAME_SIZE is the protocol's default)
MAX_INBOUND_FRAME: Final = 16_384
#: keepalive PINGs closer together than this, with no stream activity in between, are strikes;
#: past MAX_PING_STRIKES the connection ends with ENHANCE_YOUR_CALM (a PING flood). Spaced
#: PINGs (Envoy's connection_keepalive, every 30 s by default in envoy.yaml) never count.
MIN_PING_INTERVAL_S: Final = 1.0
#: the PING sent with the first GOAWAY of a graceful shutdown, and how long its ACK may take
SHUTDOWN_PING: Final = b"shutdown"
SHUTDOWN_PING_TIMEOUT_S: Final = 1.0
MAX_PING_STRIKES: Final = 10
#: a TLS client that has not finished its handshake after this long is dropped (asyncio's
#: default is 60 s: a minute of a file descriptor for each silent client)
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: decoded header blocks kept per connection (see ``_Connection._decode``)
HEADER_CACHE_SIZE: Final = 64

_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}

Handler = Callable[["Call"], Awaitable[bytes | None]]
Headers = tuple[tuple[bytes, bytes], ...]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK "literal header field without indexing, new name" (RFC 7541 6.2.2), no Huffman:
    the dynamic table is never touched, so these blocks can be built once."""
    return b"\x00" + _hpack_int(0x00, 7, len(name)) + name + _hpack_int(0x00, 7, len(value)) + value


def _hpack_int(first: int, prefix: int, value: int) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: ``:status 200`` (static table entry 8, indexed) + ``content-type: application/grpc``
#: (name from static entry 31, value literal, not indexed)
_RESPONSE_HEADERS: Final = b"\x88" + b"\x0f\x10" + b"\x10application/grpc"


def _trailers(code: int, details: str = "") -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if details:
        block += _literal(b"grpc-message", _percent_encode(details))
    return block


def _percent_encode(text: str) -> bytes:
    out = bytearray()
    for b in text.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


_OK_TRAILERS: Final = _trailers(0)


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout``: up to 8 digits and a unit; anything else is ignored (no deadline)."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


class AbortCall(Exception):
    """Raised by :meth:`Call.abort`: end the call with this status."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class Call:
    """One gRPC call on one HTTP/2 stream, as its handler sees it."""

    __slots__ = (
        "_buffer",
        "_conn",
        "_deadline",
        "_drained",
        "_headers_sent",
        "_inbox",
        "_pending",
        "_pending_trailers",
        "_unacked",
        "_waiter",
        "headers",
        "local_closed",
        "recv_window",
        "remote_closed",
        "send_window",
        "stream_id",
        "task",
    )

    def __init__(self, conn: _Connection, stream_id: int, headers: Headers):
        self._conn = conn
        self.stream_id = stream_id
        self.headers = headers
        self._inbox: deque[bytes] = deque()
        self._waiter: asyncio.Future[Any] | None = None
        self._buffer = bytearray()  # an incomplete message (grows in place: no n² copies)
        self._headers_sent = False
        self._unacked = 0  # bytes read by the handler, not yet given back to the peer
        self._pending = bytearray()  # framed messages the peer's window does not take yet
        self._pending_trailers: bytes | None = None
        self._drained: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.remote_closed = False
        self.local_closed = False
        self.send_window = conn.peer_initial_window
        self.recv_window = conn.server.stream_window
        self.task: asyncio.Task[Any] | None = None

    # ---------------------------------------------------------------- the handler's side

    async def read(self) -> Any:
        """The next request message, or ``grpc.aio.EOF`` once the client has half-closed."""
        inbox = self._inbox
        if not inbox:
            if self.remote_closed:
                return grpc.aio.EOF
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not inbox:
                return grpc.aio.EOF
        message = inbox.popleft()
        self._consumed(len(message) + 5)
        return message

    async def write(self, message: bytes) -> None:
        conn = self._conn
        if self.local_closed:
            raise asyncio.InvalidStateError("write after the call ended")
        self._send(b"\x00" + len(message).to_bytes(4, "big") + message)
        if self._pending or conn.paused:
            await self._wait_drained()

    async def abort(self, code: grpc.StatusCode | int, details: str = "") -> NoReturn:
        raise AbortCall(code if isinstance(code, int) else code.value[0], details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in self.headers
            if not k.startswith(b":")
        )

    # ---------------------------------------------------------------- the connection's side

    def _deliver(self, data: bytes) -> str | None:
        """Split DATA into messages; returns a reason to end the call, or None."""
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < 5 or len(buffer) < 5 + int.from_bytes(buffer[1:5], "big"):
                return self._check_prefix(buffer)  # still incomplete: nothing copied
            data = bytes(buffer)
            buffer.clear()
        limit = self._conn.server.max_message_bytes
        while data:
            if len(data) < 5:
                buffer += data
                return None
            size = int.from_bytes(data[1:5], "big")
            if data[0] or size > limit:
                return self._check_prefix(data)
            end = 5 + size
            if len(data) < end:
                buffer += data
                return None
            self._inbox.append(data[5:end])
            data = data[end:]
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return None

    def _check_prefix(self, prefix: bytes | bytearray) -> str | None:
        """Why a message with this (at least partial) length prefix must end the call."""
        if len(prefix) < 5:
            return None
        if prefix[0]:
            return "compressed messages are not supported"
        limit = self._conn.server.max_message_bytes
        if int.from_bytes(prefix[1:5], "big") > limit:
            return f"message larger than {limit} bytes"
        return None

    def _remote_end(self) -> None:
        self.remote_closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _consumed(self, n: int) -> None:
        self._unacked += n
        if self._unacked >= self._conn.server.stream_window // 2 and not self.remote_closed:
            self._conn.out.append(
                frame(WINDOW_UPDATE, 0, self.stream_id, self._unacked.to_bytes(4, "big"))
            )
            self.recv_window += self._unacked
            self._unacked = 0
            self._conn.flush_soon()

    def _send(self, data: bytes) -> None:
        conn = self._conn
        if not self._headers_sent:
            self._headers_sent = True
            conn.out.append(frame(HEADERS, END_HEADERS, self.stream_id, _RESPONSE_HEADERS))
        if self._pending:
            self._pending += data
        else:
            n = len(data)
            if n <= self.send_window and n <= conn.send_window and n <= conn.peer_max_frame:
                self.send_window -= n
                conn.send_window -= n
                conn.out.append(frame(DATA, 0, self.stream_id, data))
            else:
                self._pending += data
                conn.blocked[self.stream_id] = self
                self._flush_pending()
        conn.flush_soon()

    def _flush_pending(self) -> None:
        """Send what the windows allow; the trailers once nothing is left."""
        conn = self._conn
        pending = self._pending
        while pending:
            n = min(len(pending), self.send_window, conn.send_window, conn.peer_max_frame)
            if n <= 0:
                return
            conn.out.append(frame(DATA, 0, self.stream_id, bytes(pending[:n])))
            del pending[:n]
            self.send_window -= n
            conn.send_window -= n
        conn.blocked.pop(self.stream_id, None)
        if self._pending_trailers is not None:
            block, self._pending_trailers = self._pending_trailers, None
            self._send_trailers(block)
        drained = self._drained
        if drained is not None and not drained.done() and not conn.paused:
            drained.set_result(None)
        conn.flush_soon()

    async def _wait_drained(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self._conn.loop.create_future()
        await self._drained

    def finish(self, code: int, details: str = "", last: bytes | None = None) -> None:
        """End the call: the last message (if any) and the status, in the same write."""
        if self.local_closed or self._pending_trailers is not None:
            return  # the first status wins (a deadline's, held behind flow control)
        if last is not None:
            self._send(b"\x00" + len(last).to_bytes(4, "big") + last)
        block = _OK_TRAILERS if code == 0 and not details else _trailers(code, details)
        if self._pending:
            self._pending_trailers = block
            return
        self._send_trailers(block)

    def _send_trailers(self, block: bytes) -> None:
        conn = self._conn
        sid = self.stream_id
        self.local_closed = True
        if self._headers_sent:
            conn.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
        else:  # trailers-only
            conn.out.append(
                frame(HEADERS, END_HEADERS | END_STREAM, sid, _RESPONSE_HEADERS + block)
            )
        if not self.remote_closed:
            # the response is complete; tell the client to stop sending (RFC 9113 8.1)
            conn.out.append(frame(RST_STREAM, 0, sid, NO_ERROR.to_bytes(4, "big")))
        conn.closed_stream(self)
        conn.flush_soon()

    def _reset(self) -> None:
        """The peer reset the stream or the connection is gone: the handler is cancelled."""
        self.local_closed = self.remote_closed = True
        self._conn.blocked.pop(self.stream_id, None)
        if self._deadline is not None:
            self._deadline.cancel()
        for fut in (self._waiter, self._drained):
            if fut is not None and not fut.done():
                fut.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Connection(asyncio.Protocol):
    def __init__(self, server: Http2Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.preface = False
        self.peer_settings = False
        self.peer_goaway = False
        self.decoder = Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_LIST
        self.header_cache: dict[bytes, tuple[int, Headers]] = {}
        self.table_generation = 0
        self.calls: dict[int, Call] = {}
        self.blocked: dict[int, Call] = {}
        self.out: list[bytes] = []
        self._flush_scheduled = False
        self.paused = False
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.last_stream = 0
        self.goaway_sent = False
        self.shutting_down = False
        self.closed = False
        self.recv_unacked = 0
        self.ping_strikes = 0
        self.last_ping = float("-inf")
        #: a header block in CONTINUATION frames: (stream id, flags of the HEADERS, fragments)
        self.continuing: tuple[int, int, list[bytes]] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.server.connections.add(self)
        settings = (
            (MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams),
            (INITIAL_WINDOW_SIZE, self.server.stream_window),
            (MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            (ENABLE_PUSH, 0),
        )
        payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in settings)
        self.out.append(frame(SETTINGS, 0, 0, payload))
        self.out.append(
            frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
        )
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.final_goaways()
        for call in list(self.calls.values()):
            call._reset()
        self.calls.clear()
        self.blocked.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for call in list(self.calls.values()):
            drained = call._drained
            if drained is not None and not drained.done() and not call._pending:
                drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except ProtocolViolation as exc:
            self._fail(exc.code, str(exc))
        except HPACKError as exc:
            self._fail(COMPRESSION_ERROR, f"header block: {exc}")
        except Exception:  # a bug of ours: this connection ends, the process serves on
            log.exception("HTTP/2 connection failed")
            self._fail(INTERNAL_ERROR, "internal error")
        self.flush()

    # ------------------------------------------------------------------ frames in

    def _receive(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self.buf = buf
                return
            if not buf.startswith(PREFACE):
                raise ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self.preface = True
            buf = buf[len(PREFACE) :]
        if not self.peer_settings and len(buf) >= 4 and buf[3] != SETTINGS:
            raise ProtocolViolation(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
        pos = 0
        end = len(buf)
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > MAX_INBOUND_FRAME:
                raise ProtocolViolation(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            stop = pos + 9 + length
            if stop > end:
                break
            kind = buf[pos + 3]
            flags = buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = buf[pos + 9 : stop]
            pos = stop
            if self.continuing is not None and kind != CONTINUATION:
                raise ProtocolViolation(PROTOCOL_ERROR, "header block interrupted")
            if kind == DATA:
                self._data(sid, flags, payload, length)
            elif kind == HEADERS:
                self._headers(sid, flags, payload)
            elif kind == CONTINUATION:
                self._continuation(sid, flags, payload)
            elif kind == SETTINGS:
                self._settings(sid, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif kind == PING:
                self._ping(sid, flags, payload)
            elif kind == RST_STREAM:
                self._rst(sid, payload)
            elif kind == GOAWAY:
                if sid:
                    raise ProtocolViolation(PROTOCOL_ERROR, "GOAWAY on a stream")
                self._goaway_received()
            elif kind == PRIORITY:
                if sid == 0 or length != 5:
                    raise ProtocolViolation(PROTOCOL_ERROR, "bad PRIORITY frame")
            elif kind == PUSH_PROMISE:
                raise ProtocolViolation(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # unknown frame types are ignored (RFC 9113 4.1)
        self.buf = buf[pos:] if pos < end else b""

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload:
                raise ProtocolViolation(PROTOCOL_ERROR, "padded frame without a pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - pad]
        return payload

    def _data(self, sid: int, flags: int, payload: bytes, length: int) -> None:
        if sid == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "DATA on stream 0")
        self.ping_strikes = 0
        if length:
            # the connection window is given back at once (one slow handler must not starve
            # the others); each stream's window only as its handler reads
            self.recv_unacked += length
            if self.recv_unacked >= CONNECTION_WINDOW // 2:
                self.out.append(frame(WINDOW_UPDATE, 0, 0, self.recv_unacked.to_bytes(4, "big")))
                self.recv_unacked = 0
        call = self.calls.get(sid)
        if call is None:
            if sid > self.last_stream:
                raise ProtocolViolation(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we already ended or reset: its late frames are dropped
        if call.remote_closed:
            self._reset_stream(call, STREAM_CLOSED)
            return
        call.recv_window -= length
        if call.recv_window < 0:
            self._reset_stream(call, FLOW_CONTROL_ERROR)
            return
        body = self._unpad(flags, payload)
        ended = bool(flags & END_STREAM)
        if ended:  # before any error below: a stream closed both ways gets no RST_STREAM
            call.remote_closed = True
        # padding is flow-controlled but never read: count it as consumed now
        if length - len(body):
            call._consumed(length - len(body))
        if body:
            problem = call._deliver(body)
            if problem is not None:
                code = 12 if problem.startswith("compressed") else 8  # UNIMPLEMENTED, EXHAUSTED
                self._end_call(call, code, problem)
                return
        if ended:
            if call._buffer:
                self._end_call(call, 13, "the request ended inside a message")  # INTERNAL
                return
            call._remote_end()

    def _headers(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "short priority fields")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(sid, flags, block)
        else:
            self.continuing = (sid, flags, [block])

    def _continuation(self, sid: int, flags: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != sid:
            raise ProtocolViolation(PROTOCOL_ERROR, "unexpected CONTINUATION")
        _, first_flags, fragments = self.continuing
        fragments.append(payload)
        if sum(map(len, fragments)) > MAX_HEADER_LIST * 2:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self.continuing = None
            self._header_block(sid, first_flags, b"".join(fragments))

    def _decode(self, block: bytes) -> Headers:
        """Decode a header block (always, also for streams we no longer track, to keep the
        table in step with the peer's encoder).

        A gRPC client sends nearly the same request headers on every stream; Envoy's are the
        same bytes each time (``:path`` as a literal never indexed, the rest indexed). A block
        that left the dynamic table as it was decodes to the same headers for as long as the
        table stays as it is: those are kept, keyed by the block's bytes and valid for the
        table's current generation (a new one starts whenever a block changes the table)."""
        hit = self.header_cache.get(block)
        if hit is not None and hit[0] == self.table_generation:
            return hit[1]
        table = getattr(self.decoder, "header_table", None)
        if not hasattr(table, "dynamic_entries"):  # an hpack whose table we cannot read
            return tuple((bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True))
        assert table is not None
        entries = table.dynamic_entries
        before = (len(entries), entries[0] if entries else None, table.maxsize)
        headers = tuple((bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True))
        if (len(entries), table.maxsize) != (before[0], before[2]) or (
            entries and entries[0] is not before[1]
        ):
            self.table_generation += 1  # an insertion, eviction or resize
        elif len(block) <= 1024:  # request headers, not whatever a client makes up
            if len(self.header_cache) >= HEADER_CACHE_SIZE:
                self.header_cache.clear()
            self.header_cache[block] = (self.table_generation, headers)
        return headers

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client: gRPC clients send none; end of input
            if not flags & END_STREAM:
                raise ProtocolViolation(PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            call._remote_end()
            return
        if sid % 2 == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "even stream id from a client")
        if sid <= self.last_stream:
            return  # trailers of a stream we already ended; dropped
        self.last_stream = sid
        self.ping_strikes = 0
        if self.goaway_sent:
            self.out.append(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        self._start_call(sid, flags, headers)

    def _start_call(self, sid: int, flags: int, headers: Headers) -> None:
        server = self.server
        call = Call(self, sid, headers)
        self.calls[sid] = call
        if flags & END_STREAM:
            call.remote_closed = True
        method = path = content_type = timeout = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
        if (
            method != b"POST"
            or not content_type
            or not content_type.startswith(b"application/grpc")
        ):
            # not a gRPC request; a gRPC status is still the clearest answer
            self._end_call(call, 12, "only gRPC (POST, application/grpc) is served")
            return
        handler = server.handlers.get(path or b"")
        if handler is None:
            self._end_call(call, 12, f"unknown method {(path or b'').decode('latin-1')}")
            return
        if server.active >= server.max_concurrent_streams:
            self._end_call(call, 8, "too many concurrent streams")
            return
        server.start(handler, call)
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                call._deadline = self.loop.call_later(seconds, self._expire, call)

    def _expire(self, call: Call) -> None:
        if call.local_closed:
            return
        call.finish(4, "deadline exceeded")
        if call.task is not None:
            call.task.cancel()

    def _settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise ProtocolViolation(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        self.peer_settings = True
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ProtocolViolation(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == ENABLE_PUSH and value > 1:
                raise ProtocolViolation(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            # HEADER_TABLE_SIZE: our encoder never indexes; the rest concern a client
        self.out.append(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ProtocolViolation(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ProtocolViolation(FLOW_CONTROL_ERROR, "connection window overflow")
            self._unblock()
            return
        call = self.calls.get(sid)
        if call is None:
            return
        if increment == 0:
            self._reset_stream(call, PROTOCOL_ERROR)
            return
        call.send_window += increment
        if call.send_window > MAX_WINDOW:
            self._reset_stream(call, FLOW_CONTROL_ERROR)
            return
        if call._pending:
            call._flush_pending()

    def _unblock(self) -> None:
        for call in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            call._flush_pending()

    def _ping(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise ProtocolViolation(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "PING of the wrong size")
        if flags & ACK:
            if payload == SHUTDOWN_PING and self.shutting_down:
                self.goaway()  # the client has seen the first GOAWAY: the final one
            return
        now = self.loop.time()
        if now - self.last_ping < MIN_PING_INTERVAL_S:
            self.ping_strikes += 1
            if self.ping_strikes > MAX_PING_STRIKES:
                raise ProtocolViolation(ENHANCE_YOUR_CALM, "too many PINGs")
        self.last_ping = now
        self.out.append(frame(PING, ACK, 0, payload))

    def _rst(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        call = self.calls.pop(sid, None)
        if call is not None:
            call._reset()
        elif sid > self.last_stream:
            raise ProtocolViolation(PROTOCOL_ERROR, "RST_STREAM on an idle stream")

    def _goaway_received(self) -> None:
        # the client opens no new streams; the ones it has run to their end
        self.peer_goaway = True

    # ------------------------------------------------------------------ helpers

    def _end_call(self, call: Call, code: int, details: str) -> None:
        call.finish(code, details)
        if call.task is not None:
            call.task.cancel()

    def _reset_stream(self, call: Call, code: int) -> None:
        self.calls.pop(call.stream_id, None)
        self.out.append(frame(RST_STREAM, 0, call.stream_id, code.to_bytes(4, "big")))
        call._reset()

    def closed_stream(self, call: Call) -> None:
        self.calls.pop(call.stream_id, None)
        self.blocked.pop(call.stream_id, None)
        if call._deadline is not None:
            call._deadline.cancel()
        # what the handler never read is given back with the stream gone: the connection
        # window was refilled on receipt; nothing else holds it

    def _fail(self, code: int, reason: str) -> None:
        log.warning("HTTP/2 connection error", extra={"error": reason, "code": code})
        self.goaway(code, reason)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def begin_shutdown(self) -> None:
        """The first of two GOAWAYs (RFC 9113 6.8): last stream id 2^31-1 tells the client to
        open no more streams, and a PING marks the moment; streams it opened before it saw
        the GOAWAY are still served. The final GOAWAY, with the last stream id really taken,
        goes out when the PING's ACK is back (or after ``SHUTDOWN_PING_TIMEOUT_S``)."""
        if self.closed or self.goaway_sent or self.shutting_down:
            return
        self.shutting_down = True
        payload = MAX_WINDOW.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big")
        self.out.append(frame(GOAWAY, 0, 0, payload))
        self.out.append(frame(PING, 0, 0, SHUTDOWN_PING))
        self.loop.call_later(SHUTDOWN_PING_TIMEOUT_S, self.goaway)
        self.flush_soon()

    def goaway(self, code: int = NO_ERROR, reason: str = "") -> None:
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self.server.final_goaways()
        debug = reason.encode()[:256]
        payload = self.last_stream.to_bytes(4, "big") + code.to_bytes(4, "big") + debug
        self.out.append(frame(GOAWAY, 0, 0, payload))
        self.flush_soon()

    def flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            out = self.out
            self.out = []
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        elif self.out:
            self.out.clear()


class Http2Server:
    """Listens on ``host:port`` or ``unix:/path``; routes calls to handlers by ``:path``."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        max_concurrent_streams: int = 10_000,
        max_message_bytes: int = 4 * 1024 * 1024,
        tls: ServerTls | None = None,
    ) -> None:
        self.handlers = {path.encode(): h for path, h in handlers.items()}
        self.max_concurrent_streams = max_concurrent_streams
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        self.connections: set[_Connection] = set()
        self.stream_window = min(MAX_WINDOW, max(STREAM_WINDOW, max_message_bytes + 5))
        self.active = 0
        self.stopping = False
        self._finals_sent = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.AbstractServer | None = None
        self.loop = asyncio.get_running_loop()

    async def listen(self, address: str) -> int:
        """Start listening; returns the bound TCP port (0 for a unix socket)."""
        if address.startswith("unix:"):
            path = address.removeprefix("unix:").removeprefix("//")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket of an earlier run
            self._server = await self.loop.create_unix_server(
                self._connection, path, **self._tls_options()
            )
            return 0
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        self._server = await self.loop.create_server(
            self._connection,
            host,
            int(port),
            reuse_address=True,
            **self._tls_options(),
        )
        return int(self._server.sockets[0].getsockname()[1])

    def _tls_options(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {"ssl": self.tls.context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S}

    def final_goaways(self) -> None:
        """While stopping: note when every connection has sent its final GOAWAY (or closed)."""
        if self.stopping and all(c.goaway_sent or c.closed for c in self.connections):
            self._finals_sent.set()

    def _connection(self) -> _Connection:
        """The protocol factory: runs when a connection is accepted (before a TLS handshake,
        whose certificates :class:`extproc.tls.ServerTls` picks)."""
        return _Connection(self)

    def start(self, handler: Handler, call: Call) -> None:
        self.active += 1
        self._idle.clear()
        call.task = task = self.loop.create_task(self.run(handler, call))
        # a done callback, not a finally in run(): a task cancelled before its first step
        # (the HEADERS and a RST_STREAM in one read) never runs its body
        task.add_done_callback(self._call_done)

    def _call_done(self, _: asyncio.Task[None]) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def run(self, handler: Handler, call: Call) -> None:
        code, details, last = 0, "", None
        try:
            last = await handler(call)
        except AbortCall as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            if call.local_closed:  # reset by the peer or ended by us: nothing more to send
                return
            code, details = 1, "cancelled"
        except Exception:
            log.exception("method handler failed", extra={"stream": call.stream_id})
            code, details = 2, "internal error"  # UNKNOWN, as grpc does; no details leak
        if not call.local_closed:
            call.finish(code, details, last if code == 0 else None)

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, let running calls finish for ``grace``
        seconds, then cancel what is left and close the connections."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.begin_shutdown()
        # the final GOAWAYs first (a PING's round trip, at most SHUTDOWN_PING_TIMEOUT_S):
        # after them no stream is taken, so "idle" below stays idle
        self.stopping = True
        self.final_goaways()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._finals_sent.wait(), min(grace, SHUTDOWN_PING_TIMEOUT_S + 0.05)
            )
        if self.active:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for conn in list(self.connections):
            for call in list(conn.calls.values()):
                if call.task is not None and not call.task.done():
                    call.task.cancel()
        await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.flush()
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
