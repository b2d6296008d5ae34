"""HealthService's rules, through a stand-in for the call context (both transports drive it
the same way; tests/unit/test_http2.py and tests/integration/test_server.py use real ones)."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2

from extproc.health import HealthService

pb = health_pb2.HealthCheckResponse


class Aborted(Exception):
    pass


class Context:
    def __init__(self, request: Any) -> None:
        self._request = request
        self.sent: asyncio.Queue[int] = asyncio.Queue()
        self.code: grpc.StatusCode | None = None

    async def read(self) -> Any:
        return self._request

    async def write(self, data: bytes) -> None:
        await asyncio.sleep(0)  # a write may suspend (flow control)
        self.sent.put_nowait(pb.FromString(data).status)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self.code = code
        raise Aborted(details)


def request(service: str = "") -> bytes:
    return health_pb2.HealthCheckRequest(service=service).SerializeToString()


async def check(health: HealthService, raw: Any) -> tuple[int | None, grpc.StatusCode | None]:
    context = Context(raw)
    try:
        return pb.FromString(await health.check(None, context)).status, None
    except Aborted:
        return None, context.code


async def test_check_answers_known_services_and_refuses_the_rest() -> None:
    health = HealthService()
    assert await check(health, request()) == (pb.SERVING, None)
    assert await check(health, request("x")) == (None, grpc.StatusCode.NOT_FOUND)
    await health.set("x", pb.NOT_SERVING)
    assert await check(health, request("x")) == (pb.NOT_SERVING, None)
    assert await check(health, b"\xff\xff") == (None, grpc.StatusCode.INVALID_ARGUMENT)
    assert await check(health, grpc.aio.EOF) == (None, grpc.StatusCode.INVALID_ARGUMENT)


async def test_graceful_shutdown_is_final() -> None:
    health = HealthService()
    await health.set("x", pb.SERVING)
    await health.enter_graceful_shutdown()
    await health.set("x", pb.SERVING)
    assert health.status("") == health.status("x") == pb.NOT_SERVING


async def next_status(context: Context) -> int:
    return await asyncio.wait_for(context.sent.get(), 2)


async def test_watch_sends_the_status_then_each_change_and_ends_when_told() -> None:
    health = HealthService()
    context = Context(request("svc"))
    watch = asyncio.ensure_future(health.watch(None, context))
    assert await next_status(context) == pb.SERVICE_UNKNOWN
    await health.set("svc", pb.SERVING)
    assert await next_status(context) == pb.SERVING
    await health.set("other", pb.NOT_SERVING)  # another service: nothing sent
    await health.set("svc", pb.SERVING)  # no change: nothing sent
    await health.enter_graceful_shutdown()
    assert await next_status(context) == pb.NOT_SERVING
    assert context.sent.empty()
    assert not watch.done()  # still open through the drain
    health.end_watches()
    with pytest.raises(Aborted):
        await asyncio.wait_for(watch, 2)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert context.sent.empty()


async def test_a_change_during_a_write_is_not_lost() -> None:
    health = HealthService()
    context = Context(request())
    watch = asyncio.ensure_future(health.watch(None, context))
    await asyncio.sleep(0)  # the watcher is inside its first write
    await health.set("", pb.NOT_SERVING)
    assert await next_status(context) == pb.SERVING
    assert await next_status(context) == pb.NOT_SERVING
    watch.cancel()


async def test_a_watch_started_after_the_end_gets_the_status_and_unavailable() -> None:
    health = HealthService()
    await health.enter_graceful_shutdown()
    health.end_watches()
    context = Context(request())
    with pytest.raises(Aborted):
        await asyncio.wait_for(health.watch(None, context), 2)
    assert await next_status(context) == pb.NOT_SERVING
    assert context.code == grpc.StatusCode.UNAVAILABLE
