"""Per-plugin rollout: run a plugin for a share of requests (sticky per key) or only for
requests that carry a header, so a new plugin or configuration can be tried on a slice of
traffic. Combine with ``shadow: true`` to watch what it would decide without enforcing it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extproc.context import AUTH_CLAIMS
from extproc.plugin import HttpRequest

__all__ = ["Gate", "RolloutSettings", "make_gate"]

#: (request, request context) -> should the plugin run for this request?
Gate = Callable[[HttpRequest, dict[str, Any]], bool]


class RolloutSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float = Field(
        100.0, ge=0.0, le=100.0, description="share of requests the plugin runs for"
    )
    sticky_key: str = Field(
        "request_id",
        description="what keeps a client in or out: request_id (no stickiness), "
        "header:<name>, claim:<name> or client_address",
    )
    when_header: dict[str, str] = Field(
        default_factory=dict,
        description="run only for requests carrying all these headers (value '*' = any value)",
    )

    @field_validator("sticky_key")
    @classmethod
    def _key(cls, v: str) -> str:
        kind, _, name = v.partition(":")
        if v in ("request_id", "client_address") or (kind in ("header", "claim") and name):
            return v
        raise ValueError("sticky_key is request_id, client_address, header:<name> or claim:<name>")


def _key_of(spec: str) -> Callable[[HttpRequest, dict[str, Any]], str]:
    kind, _, name = spec.partition(":")
    if spec == "request_id":
        return lambda req, ctx: req.request_id
    if spec == "client_address":
        return lambda req, ctx: str(req.attributes.get("source.address", ""))
    if kind == "header":
        lowered = name.lower()
        return lambda req, ctx: req.headers.get(lowered, "")
    return lambda req, ctx: str((ctx.get(AUTH_CLAIMS) or {}).get(name, ""))


def make_gate(settings: RolloutSettings, salt: str) -> Gate | None:
    """The gate for one plugin instance, or ``None`` when it runs for every request (then the
    chain does no work per request)."""
    if settings.percent >= 100.0 and not settings.when_header:
        return None
    threshold = int(settings.percent * 100)  # out of 10,000
    key_of = _key_of(settings.sticky_key)
    wanted = {k.lower(): v for k, v in settings.when_header.items()}
    seed = zlib.crc32(salt.encode())

    def gate(request: HttpRequest, context: dict[str, Any]) -> bool:
        headers = request.headers
        for name, value in wanted.items():
            got = headers.get(name)
            if got is None or value not in ("*", got):
                return False
        if threshold >= 10_000:
            return True
        key = key_of(request, context)
        return zlib.crc32(key.encode("utf-8", "surrogateescape"), seed) % 10_000 < threshold

    return gate
