"""``grpc.health.v1.Health`` (``Check`` and ``Watch``) for both transports.

One implementation serves grpc.aio and :mod:`extproc.http2`: the methods take ``(requests,
context)`` as grpc.aio's streaming handlers do, read the request with ``context.read()`` and
work on bytes, so neither transport runs a (de)serializer of its own. The ``set`` /
``enter_graceful_shutdown`` methods match grpc's ``health.aio.HealthServicer``.

What it adds to grpc's servicer: :meth:`HealthService.end_watches`, which the server calls when
it stops. grpc's ``Watch`` runs until the client leaves, so an open ``Watch`` (client-side
health checking) held a stop for the whole ``shutdown_grace_s``; here it gets NOT_SERVING when
the drain starts and UNAVAILABLE when the listener closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2

__all__ = ["SERVICE", "HealthService"]

SERVICE: Final = "grpc.health.v1.Health"
_Status = health_pb2.HealthCheckResponse


class HealthService:
    """Statuses by service name (``""``: the whole server, SERVING from the start).

    ``Check`` answers NOT_FOUND for a service never set. ``Watch`` sends the service's status
    at once (SERVICE_UNKNOWN for one never set), then each change; a burst of changes may
    reach a slow watcher as its last status only, as with grpc's own servicer."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": _Status.SERVING}
        self._shutdown = False
        self._ended = False
        #: set (and replaced) on every change: what the watchers wait for
        self._changed = asyncio.Event()

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The handlers by method name (``Check``, ``Watch``)."""
        return {"Check": self.check, "Watch": self.watch}

    def status(self, service: str = "") -> int | None:
        return self._status.get(service)

    async def set(self, service: str, status: int) -> None:
        if not self._shutdown and self._status.get(service) != status:
            self._status[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good: later ``set`` calls are ignored."""
        for service in self._status:
            self._status[service] = _Status.NOT_SERVING
        self._shutdown = True
        self._notify()

    def end_watches(self) -> None:
        """End every open ``Watch`` (after its latest status) with UNAVAILABLE, and any
        started later at once."""
        self._ended = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @staticmethod
    async def _service(context: Any) -> str:
        raw = await context.read()
        if raw is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a HealthCheckRequest is needed")
        try:
            service: str = health_pb2.HealthCheckRequest.FromString(raw).service
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a HealthCheckRequest")
        return service

    async def check(self, _requests: object, context: Any) -> bytes:
        status = self._status.get(await self._service(context))
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        reply: bytes = _Status(status=status).SerializeToString()
        return reply

    async def watch(self, _requests: object, context: Any) -> None:
        service = await self._service(context)
        sent = None
        while True:
            changed = self._changed  # taken before the write: a change during it is seen
            status = self._status.get(service, _Status.SERVICE_UNKNOWN)
            if status != sent:
                await context.write(_Status(status=status).SerializeToString())
                sent = status
            if self._ended:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            await changed.wait()
