"""The admin HTTP endpoints: ``/healthz`` (alive), ``/readyz`` (serving correctly),
``/metrics`` (Prometheus text) and ``/status`` (JSON).

A deliberately tiny HTTP/1.1 server on asyncio streams (TCP ``host:port`` or ``unix:/path``):
GET routes only, no body parsing, so it adds no dependency and no attack surface.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from extproc.plugin import HealthState

if TYPE_CHECKING:
    from extproc.server import Server

__all__ = ["AdminHttp", "AdminServer", "Handler", "fetch"]

log = logging.getLogger("extproc.admin")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}

#: (method, path) -> (status, content type, body)
Handler = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]


class AdminHttp:
    """Serves ``handler`` on ``address`` (``host:port``, port 0 = any; or ``unix:/path``)."""

    def __init__(self, address: str, handler: Handler) -> None:
        self.address = address
        self.handler = handler
        self.unix_path = address[5:] if address.startswith("unix:") else None
        host, _, port = address.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = 0 if self.unix_path else int(port)
        self._srv: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self.unix_path is not None:
            self._srv = await asyncio.start_unix_server(self._handle, self.unix_path)
        else:
            self._srv = await asyncio.start_server(self._handle, self.host, self.port)
            self.port = self._srv.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._srv is not None:
            self._srv.close()
            await self._srv.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = line.decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            status, ctype, body = await self.handler(method, path.split("?")[0])
        except Exception:
            log.exception("admin request failed")
            status, ctype, body = 503, "text/plain", b"error\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
            f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def fetch(address: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` from an admin endpoint (``host:port`` or ``unix:/path``); bound it with
    ``asyncio.timeout`` at the call site."""
    if address.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(address[5:])
    else:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: admin\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class AdminServer(AdminHttp):
    """The admin endpoints of one sidecar process."""

    def __init__(self, server: Server, address: str) -> None:
        super().__init__(address, self._route)
        self.server = server

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, detail = await self.ready()
            return (200 if ready else 503), "application/json", _json(detail)
        if path == "/metrics":
            from extproc.observability.otel import render_metrics

            source = self.server.meter_provider or self.server.services.registry
            body, ctype = await asyncio.to_thread(render_metrics, source)
            return 200, ctype, body
        if path == "/status":
            return 200, "application/json", _json(await self.status())
        return 404, "text/plain", b"not found\n"

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        if self.server.shutting_down:
            return False, {"ready": False, "reason": "shutting down"}
        state, plugins = await self.server.runtime.health()
        ready = state is not HealthState.UNHEALTHY
        return ready, {
            "ready": ready,
            "state": state.value,
            "plugins": {
                n: {"state": h.state.value, "detail": h.detail} for n, h in plugins.items()
            },
        }

    async def status(self) -> dict[str, Any]:
        status = self.server.runtime.status()
        _, plugins = await self.server.runtime.health()
        for entry in status["plugins"]:
            h = plugins.get(entry["name"])
            if h is not None:
                entry["health"] = {"state": h.state.value, "detail": h.detail, **dict(h.info)}
        servicer = self.server.servicer
        status["open_streams"] = servicer.open_streams if servicer else 0
        if servicer is not None:
            c = servicer.coalescer
            status["reply_coalescing"] = {
                "max_hold_ms": c.max_hold * 1000.0,
                "window_ms": round(c.window * 1000.0, 3),  # what a round opened now would get
                "replies_held": c.held,
                "rounds": c.rounds,
            }
        return status


def _json(data: Any) -> bytes:
    return (json.dumps(data, default=str, indent=1) + "\n").encode()
