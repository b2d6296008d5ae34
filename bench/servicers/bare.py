"""Two bare grpc.aio ext_proc servicers that answer CONTINUE to every message, nothing else.

* ``idiomatic``: what most people write first: an async-generator ``Process`` with the
  generated message classes, on the default asyncio loop.
* ``fast``: the cheapest servicer we know how to write on grpc.aio: uvloop, a raw-bytes
  method handler (no protobuf (de)serialisation by grpc), the phase read from the first tag
  byte of the request, prebuilt response bytes, explicit ``context.read()`` /
  ``context.write()``, and the RPC ended (status OK) with the reply to the request headers:
  the harness's Envoy sends nothing else, and ending the stream is the protocol's way to say
  no more messages are needed. The method is registered stream-unary (the same on the wire)
  so that grpc.aio sends that last reply and the status in one batch. extproc does both.
* ``eof``: ``fast`` as a stream-stream handler reading until Envoy closes the stream (what
  ``fast`` was before extproc learnt to end streams early; kept for comparison).
* ``fast-redis``: ``fast`` plus one Redis round trip (``INCR`` of one key over extproc's
  pipelined connection, as ``bench.servicers.h2_bare --style own-redis`` does) before it
  answers the request headers: the floor of a Redis-backed decision on grpc.aio.
* ``coalesced``: ``fast``, plus the reply coalescing extproc does (:mod:`extproc.coalesce`):
  on a saturated worker replies wait up to 3 ms (scaled) so many streams' replies are written
  in one loop iteration. It is the fastest servicer we know how to write, so it is the floor
  the targets are measured against once it is faster than ``fast``.

    python -m bench.servicers.bare --style fast --listen 127.0.0.1:50051

``--burn-us N`` (``fast``, ``fast-redis``): the handler first spins N µs of Python on the
loop's thread (:func:`burn`; before the round trip, with
``fast-redis``), a stand-in for a plugin's work: how much a µs of
Python costs the process on grpc.aio, against the same on ``transport: http2``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

#: ProcessingRequest oneof field -> the ProcessingResponse field of the matching reply
_REPLY_FIELD = {
    "request_headers": "request_headers",
    "response_headers": "response_headers",
    "request_body": "request_body",
    "response_body": "response_body",
    "request_trailers": "request_trailers",
    "response_trailers": "response_trailers",
}
_REPLY_TYPE = {
    "request_headers": pb.HeadersResponse,
    "response_headers": pb.HeadersResponse,
    "request_body": pb.BodyResponse,
    "response_body": pb.BodyResponse,
    "request_trailers": pb.TrailersResponse,
    "response_trailers": pb.TrailersResponse,
}


class IdiomaticServicer(pb_grpc.ExternalProcessorServicer):
    """Async generator, one message object built per reply."""

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            if request.observability_mode:
                continue
            phase = request.WhichOneof("request")
            if phase is None:
                continue
            yield pb.ProcessingResponse(**{_REPLY_FIELD[phase]: _REPLY_TYPE[phase]()})


def _prebuilt_replies() -> dict[int, bytes]:
    """First byte of a serialized ProcessingRequest (the tag of its oneof field, which the
    C++ serializer writes first: Envoy sets no lower-numbered field) -> reply bytes."""
    out: dict[int, bytes] = {}
    fields = pb.ProcessingRequest.DESCRIPTOR.fields_by_name
    for phase, reply_field in _REPLY_FIELD.items():
        tag = (fields[phase].number << 3) | 2  # length-delimited
        reply = pb.ProcessingResponse(**{reply_field: _REPLY_TYPE[phase]()})
        out[tag] = reply.SerializeToString()
    return out


_REPLIES = _prebuilt_replies()
_REQUEST_HEADERS_TAG = (
    pb.ProcessingRequest.DESCRIPTOR.fields_by_name["request_headers"].number << 3
) | 2


def _slow_reply(raw: bytes) -> bytes | None:
    """Anything the tag byte does not settle: decode it properly."""
    request = pb.ProcessingRequest.FromString(raw)
    if request.observability_mode:
        return None
    phase = request.WhichOneof("request")
    if phase is None:
        return None
    return pb.ProcessingResponse(**{_REPLY_FIELD[phase]: _REPLY_TYPE[phase]()}).SerializeToString()


def burn(us: float) -> None:
    """Spin ``us`` microseconds of Python (bytecode, the GIL held as a plugin holds it)."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


#: the key the Redis floors (``fast-redis``, h2_bare's ``own-redis``) count in (one key: the
#: round trip is the point)
FLOOR_KEY = "bench:floor"


def floor_round_trip(redis: str, script: bool = False) -> Callable[[], Awaitable[object]]:
    """One ``INCR`` of :data:`FLOOR_KEY` over extproc's pipelined connection to ``redis``
    (host:port), to await: the round trip of the Redis floors on both transports. With
    ``script``, the rate limiter's own script instead, for one hit as its plugin sends it at
    1,000 req/s (a batch of one; fixed window, a limit never reached, a key per user), so
    that the floor differs from the plugin's round trip only in the Python around it."""
    from extproc.services.redis_pipe import PipeSettings, RedisPipe, pack_command

    host, _, port = redis.rpartition(":")
    pipe = RedisPipe(PipeSettings(host=host, port=int(port)))
    if not script:
        incr = pack_command("INCR", FLOOR_KEY)
        return lambda: pipe.execute_packed(incr)
    from bench.script_cost import script_calls
    from plugins.rate_limit.store import SCRIPT

    # a key per user (bench.script_cost.KEYS, as the 1,000 subjects of bench.traffic), each
    # request's limit the scenarios' own (OPEN_LIMIT a second)
    calls = [pack_command(*args) for args in script_calls(FLOOR_KEY, 1, limit=100_000)]
    turn = 0

    async def evaluate() -> object:
        nonlocal turn
        if turn == 0:
            await pipe.execute("SCRIPT", "LOAD", SCRIPT)
        turn += 1
        return await pipe.execute_packed(calls[turn % len(calls)])

    return evaluate


def _fast_process(
    max_hold: float | None = None,
    until_eof: bool = False,
    redis: str | None = None,
    burn_us: float = 0.0,
    script: bool = False,
) -> Any:
    """The read/write loop; with ``max_hold``, each reply first waits for its coalescing
    round (:class:`extproc.coalesce.ReplyCoalescer`). The reply to the request headers is
    returned: registered stream-unary, grpc.aio sends it with the status in one batch, which
    ends the RPC. With ``until_eof`` (a stream-stream handler) every reply is written and the
    RPC ends when Envoy closes the stream."""
    hold = None
    if max_hold is not None:
        from extproc.coalesce import ReplyCoalescer

        hold = ReplyCoalescer(max_hold).hold
    round_trip = floor_round_trip(redis, script) if redis is not None else None

    async def process(_: Any, context: grpc.aio.ServicerContext) -> bytes | None:
        read, write, eof, replies = context.read, context.write, grpc.aio.EOF, _REPLIES
        loop = asyncio.get_running_loop()
        while True:
            raw = await read()
            if raw is eof:
                return None if until_eof else b""
            reply = replies.get(raw[0]) if raw else None
            if reply is None:
                reply = _slow_reply(raw)
                if reply is None:
                    continue
            if raw[0] == _REQUEST_HEADERS_TAG:
                if burn_us:
                    burn(burn_us)
                if round_trip is not None:
                    await round_trip()
            if hold is not None:
                held = hold(loop)
                if held is not None:
                    await held
            if raw[0] == _REQUEST_HEADERS_TAG and not until_eof:
                return reply
            await write(reply)

    return process


def _fast_handler(
    coalesced: bool = False,
    until_eof: bool = False,
    redis: str | None = None,
    burn_us: float = 0.0,
    script: bool = False,
) -> grpc.GenericRpcHandler:
    # no request_deserializer / response_serializer: the handler sees and writes bytes
    process = _fast_process(0.003 if coalesced else None, until_eof, redis, burn_us, script)
    if until_eof:
        method = grpc.stream_stream_rpc_method_handler(process)
    else:
        method = grpc.stream_unary_rpc_method_handler(process)
    return grpc.method_handlers_generic_handler(SERVICE, {"Process": method})


async def serve(
    style: str, listen: str, redis: str | None = None, burn_us: float = 0.0, script: bool = False
) -> None:
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 10_000)]
    )
    if style == "idiomatic":
        pb_grpc.add_ExternalProcessorServicer_to_server(IdiomaticServicer(), server)  # type: ignore[no-untyped-call]
    else:
        server.add_generic_rpc_handlers(
            (_fast_handler(style == "coalesced", style == "eof", redis, burn_us, script),)
        )
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare {style} servicer on {listen}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def parse_floor_arguments(parser: argparse.ArgumentParser, plain: str) -> argparse.Namespace:
    """Add ``--redis`` (the Redis of style ``<plain>-redis``, needed there and only there),
    ``--redis-script`` (that style's round trip is the rate limiter's script, not ``INCR``)
    and ``--burn-us`` (styles ``plain`` and ``<plain>-redis`` only) to a bare servicer's
    ``parser``, and parse."""
    floors = (plain, f"{plain}-redis")
    parser.add_argument("--redis", help=f"host:port of the Redis of --style {floors[1]}")
    parser.add_argument(
        "--redis-script",
        action="store_true",
        help="each round trip runs the rate limiter's script (one hit), not INCR",
    )
    parser.add_argument("--burn-us", type=float, default=0.0, help="µs of Python spun per request")
    args = parser.parse_args()
    if args.burn_us and args.style not in floors:
        parser.error(f"--burn-us goes with --style {floors[0]} or {floors[1]}")
    if (args.style == floors[1]) != (args.redis is not None):
        parser.error(f"--redis goes with --style {floors[1]}, and only with it")
    if args.redis_script and args.redis is None:
        parser.error("--redis-script goes with --redis")
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--style", choices=("idiomatic", "fast", "fast-redis", "coalesced", "eof"), required=True
    )
    parser.add_argument("--listen", required=True, help="host:port or unix:/path")
    args = parse_floor_arguments(parser, "fast")
    if args.style != "idiomatic":
        import uvloop

        uvloop.run(serve(args.style, args.listen, args.redis, args.burn_us, args.redis_script))
    else:
        asyncio.run(serve(args.style, args.listen))


if __name__ == "__main__":
    main()
