"""Small plugins that misbehave on purpose, loaded by path (``tests.support.plugins:Name``)."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from pydantic import Field

from extproc.plugin import (
    CONTINUE,
    Continue,
    Needs,
    Plugin,
    PluginConfig,
    Reject,
    RequestEvent,
    RequestHeaders,
    Respond,
    Result,
)


class TriggerConfig(PluginConfig):
    path: str = Field("/", description="act only on paths starting with this")
    seconds: float = Field(5.0, ge=0, description="how long to hang or block")


class _Triggered(Plugin):
    Config = TriggerConfig
    config: TriggerConfig

    def hit(self, event: RequestEvent) -> bool:
        return isinstance(event, RequestHeaders) and event.request.route_path.startswith(
            self.config.path
        )


class HangPlugin(_Triggered):
    """Never answers in time (awaits far past any deadline)."""

    name = "hang"
    priority = 500

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            await asyncio.sleep(self.config.seconds)
        return CONTINUE


class RaisePlugin(_Triggered):
    """Raises an exception carrying a secret-looking message (must never reach a client)."""

    name = "raise"
    priority = 500

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            raise RuntimeError("database password is hunter2")
        return CONTINUE


class BlockPlugin(_Triggered):
    """Blocks the event loop synchronously (what the watchdog must name)."""

    name = "block"
    priority = 500

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            time.sleep(self.config.seconds)  # noqa: ASYNC251 - on purpose
        return CONTINUE


class TeapotPlugin(_Triggered):
    """Answers 418 itself on its path; adds a header elsewhere."""

    name = "teapot"
    priority = 400
    needs: ClassVar[Needs] = Needs(request_headers=True)

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            return Respond(418, b"short and stout\n", {"x-teapot": "yes"}, "teapot")
        return Continue(set_headers={"x-teapot-seen": "no"})


class DenyPlugin(_Triggered):
    name = "deny"
    priority = 400

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            return Reject(403, "forbidden", "Not on this path.")
        return CONTINUE


class FailingInitPlugin(Plugin):
    name = "failing_init"

    async def initialize(self, context: object) -> None:
        raise ConnectionError("cannot reach the license server")
