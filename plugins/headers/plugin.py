"""``headers``: add, set and remove request and response headers by route.

The smallest useful plugin, and the one that proves the path end to end before the
authentication and rate-limit plugins are configured.
"""

from __future__ import annotations

from typing import ClassVar

from extproc.plugin import (
    CONTINUE,
    Continue,
    Needs,
    Plugin,
    RequestEvent,
    RequestHeaders,
    ResponseEvent,
    ResponseHeaders,
    Result,
)
from plugins.headers.config import HeaderRule, HeadersConfig

__all__ = ["HeadersPlugin"]


class HeadersPlugin(Plugin):
    name = "headers"
    version = "1.0.0"
    priority = 100
    cancellation_safe = True  # our hooks end promptly when cancelled (tested)
    Config = HeadersConfig
    needs: ClassVar[Needs] = Needs(request_headers=True, response_headers=True)

    config: HeadersConfig

    @classmethod
    def needs_for(cls, config: HeadersConfig) -> Needs:
        """Response headers only when a rule changes them (each phase is a round trip)."""
        response = bool(config.request_id_header) or any(
            r.response_set or r.response_remove for r in config.rules
        )
        return Needs(request_headers=True, response_headers=response)

    def _rules(self, method: str, path: str) -> list[HeaderRule]:
        return [
            r
            for r in self.config.rules
            if path.startswith(r.path_prefix) and (not r.methods or method in r.methods)
        ]

    async def on_request(self, event: RequestEvent) -> Result:
        if not isinstance(event, RequestHeaders):
            return CONTINUE
        rules = self._rules(event.request.method, event.request.route_path)
        if not rules:
            return CONTINUE
        set_h: dict[str, str] = {}
        append: dict[str, str] = {}
        remove: list[str] = []
        for rule in rules:
            set_h.update(rule.request_set)
            append.update(rule.request_append)
            remove.extend(rule.request_remove)
        return Continue(set_headers=set_h, append_headers=append, remove_headers=tuple(remove))

    async def on_response(self, event: ResponseEvent) -> Result:
        if not isinstance(event, ResponseHeaders):
            return CONTINUE
        rules = self._rules(event.request.method, event.request.route_path)
        set_h: dict[str, str] = {}
        remove: list[str] = []
        for rule in rules:
            set_h.update(rule.response_set)
            remove.extend(rule.response_remove)
        if self.config.request_id_header and event.request.request_id:
            set_h[self.config.request_id_header] = event.request.request_id
        if not set_h and not remove:
            return CONTINUE
        return Continue(set_headers=set_h, remove_headers=tuple(remove))
