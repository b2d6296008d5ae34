"""Micro-benchmark (not a test): CPU microseconds per ``on_request`` of the jwt_auth plugin.

Cache hit vs full verification, for RS256 and ES256, side by side in one process so that the
ratios are meaningful on a noisy machine. Run: ``.venv/bin/python bench/jwt_cost.py [N]``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from extproc.context import RequestContext
from extproc.plugin import Continue, Headers, HttpRequest, RequestHeaders
from extproc.testing.context import make_plugin_context
from extproc.testing.jwt import KeyPair, TokenFactory, make_ec_key, make_rsa_key
from plugins.jwt_auth import JwtAuthConfig, JwtAuthPlugin

ISSUER = "https://issuer.bench/"


async def make(keys: list[KeyPair], cache: bool) -> JwtAuthPlugin:
    cfg = JwtAuthConfig.model_validate(
        {
            "providers": {
                "idp": {
                    "issuer": ISSUER,
                    "audiences": ["api"],
                    "jwks": {"inline": {"keys": [k.jwk() for k in keys]}},
                    "claim_to_headers": [{"claim": "sub", "header": "x-user"}],
                }
            },
            "rules": [{"match": {"prefix": "/public/"}, "requires": {"allow_missing": True}}],
            "token_cache": {"enabled": cache},
        }
    )
    plugin = JwtAuthPlugin(cfg)
    await plugin.initialize(make_plugin_context("jwt_auth", cfg))
    return plugin


async def cost(plugin: JwtAuthPlugin, token: str, n: int) -> float:
    headers = Headers.of({"authorization": f"Bearer {token}", "user-agent": "bench"})
    request = HttpRequest("GET", "/api/items/42?x=1", headers=headers)
    first = await plugin.on_request(RequestHeaders(request, RequestContext()))
    assert isinstance(first, Continue), first
    best = float("inf")
    for _ in range(5):  # best of 5 rounds: the least disturbed by the machine
        start = time.process_time()
        for _ in range(n):
            await plugin.on_request(RequestHeaders(request, RequestContext()))
        best = min(best, (time.process_time() - start) / n)
    return best * 1e6


async def main(n: int) -> None:
    rsa_key, ec_key = make_rsa_key("rsa"), make_ec_key("ec")
    rows: list[tuple[str, float]] = []
    hit = await make([rsa_key, ec_key], cache=True)
    miss = await make([rsa_key, ec_key], cache=False)
    for key in (rsa_key, ec_key):
        token = TokenFactory(key, issuer=ISSUER, audience="api").mint({"sub": "alice"})
        rows.append((f"{key.alg} cache hit", await cost(hit, token, n)))
        rows.append((f"{key.alg} full verification", await cost(miss, token, max(n // 10, 50))))
    anon = HttpRequest("GET", "/public/x", headers=Headers.of({"user-agent": "bench"}))
    start = time.process_time()
    for _ in range(n):
        await hit.on_request(RequestHeaders(anon, RequestContext()))
    rows.append(("no token, allow_missing route", (time.process_time() - start) / n * 1e6))
    base = rows[0][1]
    print(f"{'scenario':34} {'us/request':>11} {'x RS256 hit':>12}")
    for name, us in rows:
        print(f"{name:34} {us:11.1f} {us / base:12.1f}")
    extra: dict[str, Any] = {"RS256 miss/hit": rows[1][1] / rows[0][1]}
    extra["ES256 miss/hit"] = rows[3][1] / rows[2][1]
    print("  ".join(f"{k}: {v:.1f}x" for k, v in extra.items()))
    for p in (hit, miss):
        await p.shutdown()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
