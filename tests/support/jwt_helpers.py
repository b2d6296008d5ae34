"""Helpers shared by the jwt_auth unit tests (imported by name: this directory is on sys.path
under pytest's default import mode)."""

from __future__ import annotations

from typing import Any

from extproc.context import RequestContext
from extproc.plugin import Headers, HttpRequest, RequestHeaders
from extproc.testing.jwt import KeyPair

NOW = 1_800_000_000.0
ISSUER = "https://issuer.test/"
AUDIENCE = "api"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def provider(keys: list[KeyPair], **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks": {"inline": {"keys": [k.jwk() for k in keys]}},
        "algorithms": ["RS256", "ES256", "PS256", "EdDSA"],
    }
    base.update(overrides)
    return base


def request(
    path: str = "/api/x",
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    items: tuple[tuple[str, str], ...] | None = None,
) -> RequestHeaders:
    hdrs = Headers(items) if items is not None else Headers.of(headers or {})
    return RequestHeaders(HttpRequest(method, path, headers=hdrs), RequestContext())


def bearer(token: str, path: str = "/api/x", **kw: Any) -> RequestHeaders:
    return request(path, {"authorization": f"Bearer {token}"}, **kw)
