"""No token, key, password or configured sensitive header value shows up in the sidecar's logs
(at debug level), its metrics, or any error body, whatever the requests and faults."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.testing.jwt import JwksServer, TokenFactory, b64url, make_ec_key
from extproc.testing.redis_server import RedisServer
from tests.faults.harness import Stack, budget

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

ISSUER = "https://issuer.test"
PASSWORD = "redis-pw-5ecret-Zq81"
API_KEY = "apikey-5ecret-Lm02"
COOKIE = "session-5ecret-Pw93"
CUSTOM = "custom-5ecret-Hx44"

CONFIG = """
version: 1
server: {{message_timeout_ms: 300, drain_delay_s: 0}}
redis: {{url: "{redis}", password: "env:REDIS_PASSWORD", timeout_ms: 100}}
logging:
  level: debug
  sensitive_headers: [authorization, cookie, x-api-key, x-custom-secret]
plugins:
  - plugin: jwt_auth
    timeout_ms: 250
    config:
      providers:
        main:
          issuer: {issuer}
          algorithms: [ES256]
          jwks: {{uri: "{jwks}"}}
          claim_to_headers: [{{claim: sub, header: x-sub}}]
      rules:
        - {{match: {{prefix: /api}}, requires: {{provider: main}}}}
        - {{match: {{prefix: /}}, requires: {{allow_missing: true}}}}
  - plugin: rate_limit
    timeout_ms: 200
    config:
      rules:
        - {{name: by_key, key: [header:x-api-key], fail: closed, fail_status: 503,
           limits: [{{requests: 3, per: hour}}]}}
  - plugin: tests.support.plugins:RaisePlugin
    fail: closed
    config: {{path: /raise}}
"""


@budget(60)
async def test_no_secret_in_logs_metrics_or_error_bodies(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    key, other = make_ec_key("k1"), make_ec_key("k1")  # same kid, wrong key: bad signature
    tokens = TokenFactory(key, issuer=ISSUER)
    valid = tokens.mint({"sub": "alice"})
    bad = {
        "bad_signature": tokens.mint({"sub": "mallory"}, key=other),
        "expired": tokens.mint({"sub": "old", "exp": 1_000_000}),
        "unknown_kid": tokens.mint({"sub": "x"}, kid="nope"),
        "tampered": tokens.tampered_payload({"sub": "eve"}),
        "alg_none": tokens.alg_none({"sub": "root"}),
        "garbage": "not-a.jwt-5ecret-Gb55",
    }
    private_d = key.private_key.private_numbers().private_value.to_bytes(32, "big")
    secrets = [PASSWORD, API_KEY, COOKIE, CUSTOM, valid, *bad.values(), b64url(private_d)]
    secrets += [t.rpartition(".")[2] for t in (valid, *bad.values()) if t.count(".") == 2]
    secrets = [s for s in secrets if len(s) >= 8]

    redis = await asyncio.to_thread(RedisServer)
    bodies: list[str] = []
    statuses: dict[str, int] = {}
    try:
        redis.command("CONFIG", "SET", "requirepass", PASSWORD)
        async with JwksServer([key]) as jwks:
            cfg = tmp_path / "extproc.yaml"
            cfg.write_text(CONFIG.format(redis=redis.url, issuer=ISSUER, jwks=jwks.url))
            env = {**os.environ, "REDIS_PASSWORD": PASSWORD}
            async with (
                Stack([cfg], admin=True, env=env) as stack,
                httpx.AsyncClient(trust_env=False) as admin,
            ):
                http = stack.http
                sensitive = {
                    "x-api-key": API_KEY,
                    "cookie": f"s={COOKIE}",
                    "x-custom-secret": CUSTOM,
                }

                async def get(name: str, path: str, headers: dict[str, str]) -> None:
                    response = await http.get(path, headers={**sensitive, **headers})
                    statuses[name] = response.status_code
                    bodies.append(response.text if response.status_code != 200 else "")
                    bodies.append(
                        str({k: v for k, v in response.headers.items() if k != "set-cookie"})
                    )

                await get("valid", "/api/x", {"authorization": f"Bearer {valid}"})
                for name, token in bad.items():
                    await get(name, "/api/x", {"authorization": f"Bearer {token}"})
                    await get(f"{name}_query", f"/api/x?access_token={token}", {})
                await get("raise", "/raise", {})
                for i in range(3):
                    await get(f"limited_{i}", "/open", {})
                await asyncio.to_thread(redis.stop)  # Redis errors get logged too
                for i in range(3):
                    await get(f"redis_down_{i}", "/open", {"x-api-key": f"{API_KEY}-{i}"})
                metrics = (await admin.get(f"http://{stack.admins[0]}/metrics")).text
                status = (await admin.get(f"http://{stack.admins[0]}/status")).text
                await asyncio.sleep(0.3)
                log = stack.sidecars[0].log_text()
    finally:
        await asyncio.to_thread(redis.close)
    figures["statuses"] = statuses
    figures["log_lines"] = log.count("\n")

    # the requests did exercise auth, Redis (with its password) and the failure paths
    assert statuses["valid"] == 200
    assert all(statuses[name] == 401 for name in bad)
    assert statuses["raise"] == 500
    assert statuses["limited_2"] == 429  # 3 per hour on this key, counted in Redis
    assert all(statuses[f"redis_down_{i}"] == 503 for i in range(3))
    assert "debug" in log and "rate_limit" in log
    places = {"log": log, "metrics": metrics, "status": status, "bodies": "\n".join(bodies)}
    leaks = [(where, s[:12]) for where, text in places.items() for s in secrets if s in text]
    assert not leaks, leaks
