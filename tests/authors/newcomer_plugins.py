"""Plugins with the mistakes newcomers make, loaded as ``tests.authors.newcomer_plugins:X``."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from extproc.context import PluginContext
from extproc.plugin import (
    CONTINUE,
    Needs,
    Plugin,
    RequestEvent,
    ResponseEvent,
    Result,
)


class WrongReturnPlugin(Plugin):
    """Forgets to return a result (returns ``None``), or returns a dict."""

    name = "wrong_return"

    async def on_request(self, event: RequestEvent) -> Result:
        if event.request.route_path == "/dict":
            bad: Any = {"status": 200}
            return bad  # type: ignore[no-any-return]
        return None  # type: ignore[return-value]


class SleepyPlugin(Plugin):
    """Calls ``time.sleep`` on the event loop."""

    name = "sleepy"

    async def on_request(self, event: RequestEvent) -> Result:
        time.sleep(0.3)  # noqa: ASYNC251 - the mistake under test
        return CONTINUE


class ForgetfulPlugin(Plugin):
    """Adds a response header but declares request headers only: ``on_response`` never runs."""

    name = "forgetful"
    needs: ClassVar[Needs] = Needs(request_headers=True)

    async def on_response(self, event: ResponseEvent) -> Result:
        return CONTINUE


class BrokenInitPlugin(Plugin):
    """``initialize`` raises (a missing secret, a dependency it cannot reach)."""

    name = "broken_init"

    async def initialize(self, context: PluginContext) -> None:
        raise RuntimeError("cannot read the signing key")
