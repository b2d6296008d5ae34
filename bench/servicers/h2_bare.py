"""Bare ext_proc servicers on HTTP/2 directly, not on grpc.aio, on uvloop.

Both answer CONTINUE like ``bare.py --style fast`` (prebuilt replies, the phase read from the
first tag byte, the stream ended with the reply to the request headers):

* ``own``: on :mod:`extproc.http2` (extproc's ``transport: http2``), a handler that reads and
  returns bytes. The floor of that transport: what extproc with ``transport: http2`` and no
  plugins is measured against.
* ``own-redis``: ``own`` plus one Redis round trip per request (``INCR`` of one key, over
  extproc's pipelined connection :class:`~extproc.services.redis_pipe.RedisPipe`) before it
  answers the request headers. The floor of any sidecar that asks Redis on every request
  (rate_limit with batching off is one): what ``transport: http2``, Python and one round trip
  cost together, with no framework and no plugin around them.
* ``h2lib``: on the ``h2`` library (python-hyper), speaking just enough gRPC itself. It shows
  what a general pure-Python HTTP/2 stack costs per stream: about what grpc.aio costs, which
  is why :mod:`extproc.http2` is written for the frames gRPC uses instead.

    python -m bench.servicers.h2_bare --style own --listen 127.0.0.1:50051
    python -m bench.servicers.h2_bare --style own-redis --redis 127.0.0.1:6379 --listen ...

``--burn-us N`` (``own``, ``own-redis``): the handler first spins N µs of Python on the
loop's thread (before the round trip, with ``own-redis``), a stand-in for a plugin's work:
how much a µs of Python costs the process on this transport (``bench.servicers.bare
--burn-us`` is the same on grpc.aio; the floors' helpers live there).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from bench.servicers.bare import (
    _REPLIES,
    _REQUEST_HEADERS_TAG,
    SERVICE,
    _slow_reply,
    burn,
    floor_round_trip,
    parse_floor_arguments,
)

_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK = ((b"grpc-status", b"0"),)
_WINDOW = 1 << 24


def _framed(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


_FRAMED = {tag: _framed(reply) for tag, reply in _REPLIES.items()}


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.h2 = H2Connection(
            H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
        )
        self.transport: Any = None
        #: stream id -> bytes of an incomplete gRPC message
        self.pending: dict[int, bytes] = {}
        self.answered: set[int] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        h2 = self.h2
        h2.local_settings.update(
            {SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW, SettingCodes.MAX_CONCURRENT_STREAMS: 10_000}
        )
        h2.initiate_connection()
        h2.increment_flow_control_window(_WINDOW)
        transport.write(h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        try:
            events = h2.receive_data(data)
        except ProtocolError:
            self.transport.write(h2.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, DataReceived):
                sid = event.stream_id
                if event.flow_controlled_length:
                    h2.acknowledge_received_data(event.flow_controlled_length, sid)
                if sid in self.answered:
                    continue
                buf = self.pending.pop(sid, b"") + event.data
                while len(buf) >= 5:
                    size = int.from_bytes(buf[1:5], "big")
                    if len(buf) < 5 + size:
                        break
                    raw, buf = buf[5 : 5 + size], buf[5 + size :]
                    self._reply(sid, raw)
                    if sid in self.answered:
                        buf = b""
                        break
                if buf:
                    self.pending[sid] = buf
            elif isinstance(event, RequestReceived):
                h2.send_headers(event.stream_id, _RESPONSE_HEADERS)
            elif isinstance(event, StreamEnded):
                sid = event.stream_id
                self.pending.pop(sid, None)
                if sid in self.answered:
                    self.answered.discard(sid)
                else:
                    h2.send_headers(sid, _OK, end_stream=True)
            elif isinstance(event, StreamReset):
                self.pending.pop(event.stream_id, None)
                self.answered.discard(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.transport.write(h2.data_to_send())
                self.transport.close()
                return
        out = h2.data_to_send()
        if out:
            self.transport.write(out)

    def _reply(self, sid: int, raw: bytes) -> None:
        h2 = self.h2
        framed = _FRAMED.get(raw[0]) if raw else None
        if framed is None:
            reply = _slow_reply(raw)
            if reply is None:
                return
            framed = _framed(reply)
        h2.send_data(sid, framed)
        if raw and raw[0] == _REQUEST_HEADERS_TAG:
            h2.send_headers(sid, _OK, end_stream=True)
            self.answered.add(sid)


def _handler(ask: Callable[[], Awaitable[object]] | None = None, burn_us: float = 0.0) -> Any:
    """The ``own`` handler; with ``ask``, awaited before the reply to the request headers;
    with ``burn_us``, that much Python spun first (:func:`~bench.servicers.bare.burn`)."""

    async def process(call: Any) -> bytes | None:
        read, eof, replies = call.read, grpc.aio.EOF, _REPLIES
        while True:
            raw = await read()
            if raw is eof:
                return b""
            reply = replies.get(raw[0]) if raw else None
            if reply is None:
                reply = _slow_reply(raw)
                if reply is None:
                    continue
            if raw[0] == _REQUEST_HEADERS_TAG:
                if burn_us:
                    burn(burn_us)
                if ask is not None:
                    await ask()
                return reply
            await call.write(reply)

    return process


def _own_redis_process(redis: str, burn_us: float = 0.0, script: bool = False) -> Any:
    return _handler(floor_round_trip(redis, script), burn_us)


async def serve(
    style: str, listen: str, redis: str | None = None, burn_us: float = 0.0, script: bool = False
) -> None:
    loop = asyncio.get_running_loop()
    host, _, port = listen.rpartition(":")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if style in ("own", "own-redis"):
        from extproc.http2 import Http2Server

        if style == "own-redis":
            if not redis:
                raise SystemExit("--style own-redis needs --redis host:port")
            handler = _own_redis_process(redis, burn_us, script)
        else:
            handler = _handler(burn_us=burn_us)
        own = Http2Server({f"/{SERVICE}/Process": handler})
        await own.listen(listen)
        print(f"bare http2 servicer ({style}) on {listen}", flush=True)
        await stop.wait()
        await own.stop(1.0)
        return
    server = await loop.create_server(_Connection, host, int(port))
    print(f"bare h2lib servicer on {listen}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=("own", "own-redis", "h2lib"), required=True)
    parser.add_argument("--listen", required=True, help="host:port")
    args = parse_floor_arguments(parser, "own")
    import uvloop

    uvloop.run(serve(args.style, args.listen, args.redis, args.burn_us, args.redis_script))


if __name__ == "__main__":
    main()
