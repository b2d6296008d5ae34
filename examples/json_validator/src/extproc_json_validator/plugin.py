"""``json_validator``: refuse malformed JSON request bodies before they reach the upstream.

The plugin asks for the request body ``BUFFERED`` (one event with the whole body), so the
decision is made once, on complete input. It keeps what it learned from the headers (the
matching route) in the request context, where the body phase finds it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Final

from extproc.context import PluginContext
from extproc.plugin import (
    CONTINUE,
    BodyMode,
    Needs,
    Plugin,
    Reject,
    RequestBody,
    RequestEvent,
    RequestHeaders,
    Respond,
    Result,
)

from extproc_json_validator.config import JsonValidatorConfig, Route
from extproc_json_validator.schema import Problem, depth, validate

__all__ = ["JsonValidatorPlugin"]

#: request-context key: the route the headers matched (absent: the request is not checked)
ROUTE_KEY: Final = "json_validator.route"


def _invalid(problems: list[Problem]) -> Respond:
    """A 400 listing what is wrong. ``Reject`` carries only error and message, so the body is
    built here - with paths and problem names only, never values from the request."""
    body = {
        "error": "invalid_body",
        "message": "The request body does not match the expected JSON.",
        "errors": [p.as_dict() for p in problems],
    }
    return Respond(
        400,
        json.dumps(body).encode(),
        {"content-type": "application/json"},
        details="json_validator_invalid",
    )


class JsonValidatorPlugin(Plugin):
    name = "json_validator"
    version = "1.0.0"
    api_version = "1"
    priority = 800  # after authentication and rate limiting: never parse for a refused client
    Config = JsonValidatorConfig
    needs: ClassVar[Needs] = Needs(request_headers=True, request_body=BodyMode.BUFFERED)

    config: JsonValidatorConfig

    async def initialize(self, context: PluginContext) -> None:
        refused = context.metrics.counter("refused_total", "bodies refused", ("reason",))
        self._refused = {
            r: refused.labels(r) for r in ("invalid", "too_large", "content_type", "missing")
        }
        self._too_large = Reject(
            413, "body_too_large", f"The body is larger than {self.config.max_body_bytes} bytes."
        )

    def _route(self, method: str, path: str) -> Route | None:
        for route in self.config.routes:
            if path.startswith(route.path_prefix) and method in route.methods:
                return route
        return None

    async def on_request(self, event: RequestEvent) -> Result:
        if isinstance(event, RequestHeaders):
            return self._headers(event)
        if isinstance(event, RequestBody):
            return self._body(event)
        return CONTINUE

    def _headers(self, event: RequestHeaders) -> Result:
        route = self._route(event.request.method, event.request.route_path)
        if route is None:
            return CONTINUE
        length = event.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_body_bytes:
            self._refused["too_large"].inc()
            return self._too_large  # refused before a byte of the body is buffered
        content_type = event.headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = content_type == "application/json" or content_type.endswith("+json")
        if self.config.require_json_content_type and not is_json:
            self._refused["content_type"].inc()
            return Reject(415, "unsupported_media_type", "Send the body as application/json.")
        if event.end_of_stream:  # no body follows: there will be no RequestBody event
            self._refused["missing"].inc()
            return _invalid([Problem("$", "a JSON body is required")])
        event.context[ROUTE_KEY] = route
        return CONTINUE

    def _body(self, event: RequestBody) -> Result:
        route = event.context.get(ROUTE_KEY)
        if not isinstance(route, Route):
            return CONTINUE
        if len(event.body) > self.config.max_body_bytes:  # chunked: no content-length
            self._refused["too_large"].inc()
            return self._too_large
        try:
            document: Any = json.loads(event.body)
        except (ValueError, RecursionError):
            self._refused["invalid"].inc()
            return _invalid([Problem("$", "not valid JSON")])
        if depth(document) > self.config.max_depth:
            self._refused["invalid"].inc()
            return _invalid([Problem("$", f"nested deeper than {self.config.max_depth}")])
        problems = validate(document, route, self.config.max_errors)
        if problems:
            self._refused["invalid"].inc()
            return _invalid(problems)
        return CONTINUE
