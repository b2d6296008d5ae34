"""The benchmark's Redis floor (``bench.servicers.h2_bare --style own-redis``): against a real
redis-server it answers the request headers only after one INCR, and passes the other phases
through like the bare http2 servicer."""

from __future__ import annotations

import grpc
import pytest

from bench.servicers import bare, h2_bare
from extproc.testing.redis_server import RedisServer

pytestmark = pytest.mark.redis


class _Call:
    """What :mod:`extproc.http2` hands a handler: ``read()`` of raw messages, ``write()``."""

    def __init__(self, messages: list[bytes]) -> None:
        self._messages = list(messages)
        self.written: list[bytes] = []

    async def read(self) -> object:
        return self._messages.pop(0) if self._messages else grpc.aio.EOF

    async def write(self, payload: bytes) -> None:
        self.written.append(payload)


def _message(field: str) -> bytes:
    request = bare.pb.ProcessingRequest()
    getattr(request, field).SetInParent()
    return request.SerializeToString()


async def test_each_request_costs_one_incr_before_its_reply() -> None:
    with RedisServer() as server:
        process = h2_bare._own_redis_process(f"127.0.0.1:{server.port}")
        for n in (1, 2, 3):
            call = _Call([_message("request_headers")])
            reply = await process(call)
            assert reply == bare._REPLIES[bare._REQUEST_HEADERS_TAG]
            assert server.command_stats()["incr"]["calls"] == n
        # a phase other than the request headers is answered in passing, without Redis
        call = _Call([_message("request_trailers"), _message("request_headers")])
        await process(call)
        assert len(call.written) == 1
        assert server.command_stats()["incr"]["calls"] == 4


async def test_the_floor_needs_a_redis_address() -> None:
    with pytest.raises(SystemExit, match="needs --redis"):
        await h2_bare.serve("own-redis", "127.0.0.1:0", None)


async def test_grpc_aio_floor_costs_one_incr_before_the_request_headers_reply() -> None:
    """``bench.servicers.bare --style fast-redis``: the same floor on grpc.aio's handler."""
    with RedisServer() as server:
        process = bare._fast_process(redis=f"127.0.0.1:{server.port}")
        call = _Call([_message("request_headers")])
        assert await process(None, call) == bare._REPLIES[bare._REQUEST_HEADERS_TAG]
        assert server.command_stats()["incr"]["calls"] == 1
        call = _Call([_message("request_trailers"), _message("request_headers")])
        await process(None, call)
        assert len(call.written) == 1  # the trailers' reply, with no INCR before it
        assert server.command_stats()["incr"]["calls"] == 2


async def test_burn_spins_python_before_the_request_headers_reply_only() -> None:
    """``--burn-us``: the stand-in for a plugin's work is spent per request, on both
    transports' handlers, and only for the request headers."""
    import time

    grpc_aio = bare._fast_process(burn_us=50_000)
    for process in (h2_bare._handler(burn_us=50_000), lambda call: grpc_aio(None, call)):
        t0 = time.perf_counter()
        await process(_Call([_message("request_trailers")]))
        assert time.perf_counter() - t0 < 0.025
        t0 = time.perf_counter()
        reply = await process(_Call([_message("request_headers")]))
        assert time.perf_counter() - t0 >= 0.050
        assert reply == bare._REPLIES[bare._REQUEST_HEADERS_TAG]


async def test_the_script_floor_runs_the_rate_limiters_script_once_per_request() -> None:
    """``--redis-script``: the round trip is the rate limiter's own script for one hit, on
    both transports' handlers; the hits are counted, a key per request in turn, never INCR."""
    with RedisServer() as server:
        address = f"127.0.0.1:{server.port}"
        grpc_aio = bare._fast_process(redis=address, script=True)
        h2 = h2_bare._own_redis_process(address, script=True)
        for process in (h2, lambda call: grpc_aio(None, call)):
            for _ in range(3):
                reply = await process(_Call([_message("request_headers")]))
                assert reply == bare._REPLIES[bare._REQUEST_HEADERS_TAG]
        stats = server.command_stats()
        assert stats["evalsha"]["calls"] == 6
        assert stats["hset"]["calls"] == 6  # inside the script: the hit was counted
        assert "incr" not in stats and "eval" not in stats
        # each handler's first round trip went to key 1, its second to key 2, ...
        assert server.command("HGET", f"{bare.FLOOR_KEY}:1", "b") == b"$1\r\n2\r\n"
        assert server.command("HGET", f"{bare.FLOOR_KEY}:3", "b") == b"$1\r\n2\r\n"
        assert server.command("EXISTS", f"{bare.FLOOR_KEY}:4") == b":0\r\n"
