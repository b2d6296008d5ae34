"""The admin HTTP endpoints: ``/healthz`` (alive), ``/readyz`` (serving correctly),
``/metrics`` (Prometheus text) and ``/status`` (JSON).

A deliberately tiny HTTP/1.1 server on asyncio streams: four GET routes, no body parsing, so it
adds no dependency and no attack surface to the sidecar.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from extproc.plugin import HealthState

if TYPE_CHECKING:
    from extproc.server import Server

__all__ = ["AdminServer"]

log = logging.getLogger("extproc.admin")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AdminServer:
    def __init__(self, server: Server, address: str) -> None:
        self.server = server
        host, _, port = address.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)
        self._srv: asyncio.base_events.Server | None = None

    async def start(self) -> None:
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
            status, ctype, body = await self._route(method, path.split("?")[0])
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
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, detail = await self.ready()
            return (200 if ready else 503), "application/json", _json(detail)
        if path == "/metrics":
            text = self.server.services.registry.render_prometheus()
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
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
        status["open_streams"] = self.server.servicer.open_streams if self.server.servicer else 0
        return status


def _json(data: Any) -> bytes:
    return (json.dumps(data, default=str, indent=1) + "\n").encode()
