"""Misbehaving plugins for the fault suite, loaded by path (``tests.faults.plugins:Name``)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from pydantic import Field

from extproc.plugin import (
    CONTINUE,
    BodyMode,
    Continue,
    Needs,
    Plugin,
    PluginConfig,
    RequestBody,
    RequestEvent,
    RequestHeaders,
    Result,
)

#: what LeakPlugin keeps forever (module level: survives generations, like a real leak)
LEAKED: list[bytes] = []


class PathConfig(PluginConfig):
    path: str = Field("/", description="act only on paths starting with this")
    seconds: float = Field(5.0, ge=0, description="how long to hang")
    leak_bytes: int = Field(10_000, ge=0, description="bytes kept per request")


class _OnPath(Plugin):
    Config = PathConfig
    config: PathConfig

    def hit(self, event: RequestEvent) -> bool:
        return isinstance(event, RequestHeaders) and event.request.route_path.startswith(
            self.config.path
        )


class LeakPlugin(_OnPath):
    """Leaks on every request of its path: a task that never ends and a buffer never freed.
    It answers correctly, so only resource figures show the leak."""

    name = "leak"
    priority = 450
    _tasks: ClassVar[set[asyncio.Task[None]]] = set()

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            LEAKED.append(b"x" * self.config.leak_bytes)
            task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
            self._tasks.add(task)
            return Continue(set_headers={"x-leak": str(len(LEAKED))})
        return CONTINUE


class StubbornHangPlugin(_OnPath):
    """Hangs and swallows the first cancellation (as code with a slow ``finally`` or an
    ``except BaseException`` does): cooperative cancellation alone cannot stop it in time."""

    name = "stubborn"
    priority = 450

    async def on_request(self, event: RequestEvent) -> Result:
        if self.hit(event):
            try:
                await asyncio.sleep(self.config.seconds)
            except asyncio.CancelledError:
                await asyncio.sleep(self.config.seconds)  # "cleanup" that takes its time
        return CONTINUE


class BodySizePlugin(Plugin):
    """Wants the whole request body (BUFFERED) and reports its size upstream."""

    name = "body_size"
    priority = 300
    needs: ClassVar[Needs] = Needs(request_headers=True, request_body=BodyMode.BUFFERED)
    Config = PathConfig

    async def on_request(self, event: RequestEvent) -> Result:
        if isinstance(event, RequestBody):
            return Continue(set_headers={"x-body-bytes": str(len(event.body))})
        return CONTINUE
