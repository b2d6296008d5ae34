"""The sidecar process, configured for Redis over mutual TLS (``rediss://`` + ``redis.tls_*``),
rate limits requests through a real Envoy with exact counts; with the wrong CA it refuses the
Redis server and the rule's failure policy answers (no crash, no 500)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from extproc.testing.certs import CertFiles, make_certificates
from extproc.testing.redis_server import RedisServer
from tests.faults.harness import Stack, budget

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CONFIG = """
version: 1
server: {{message_timeout_ms: 500, drain_delay_s: 0}}
redis:
  url: "{url}"
  tls_ca_file: {ca}
  tls_cert_file: {cert}
  tls_key_file: {key}
  timeout_ms: 300
plugins:
  - plugin: rate_limit
    timeout_ms: 400
    config:
      rules:
        - {{name: by_key, key: [header:x-api-key], fail: closed, fail_status: 503,
           limits: [{{requests: 3, per: hour}}]}}
"""


def _config(path: Path, redis: RedisServer, certs: CertFiles, ca: Path) -> Path:
    path.write_text(
        CONFIG.format(url=redis.tls_url, ca=ca, cert=certs.client_cert, key=certs.client_key)
    )
    return path


@budget(60)
async def test_rate_limit_through_envoy_on_mutual_tls_redis(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    certs = make_certificates(tmp_path / "pki")
    redis = await asyncio.to_thread(RedisServer, tls=certs, tls_auth_clients="yes")
    statuses: dict[str, list[int]] = {}
    logs: dict[str, str] = {}
    try:
        for name, ca in (("our_ca", certs.ca), ("wrong_ca", certs.other_ca)):
            cfg = _config(tmp_path / f"{name}.yaml", redis, certs, ca)
            async with Stack([cfg]) as stack:
                statuses[name] = [
                    (await stack.http.get("/x", headers={"x-api-key": name})).status_code
                    for _ in range(5)
                ]
                alive = (await stack.http.get("/y")).status_code  # no key: no rule applies
                await asyncio.sleep(0.2)
                logs[name] = stack.sidecars[0].log_text()
            statuses[f"{name}_without_key"] = [alive]
        keys = redis.command("DBSIZE")
    finally:
        await asyncio.to_thread(redis.close)
    figures["statuses"] = statuses
    assert statuses["our_ca"] == [200, 200, 200, 429, 429]  # counted in Redis, over TLS
    assert keys.strip() == b":1"  # the one client key, written through the TLS port
    assert statuses["wrong_ca"] == [503] * 5  # Redis refused: the rule fails closed
    assert statuses["our_ca_without_key"] == statuses["wrong_ca_without_key"] == [200]
    # the operator learns why, once: the outage's first cause, not one line per request
    assert "Redis unavailable" not in logs["our_ca"]
    assert logs["wrong_ca"].count("Redis unavailable") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in logs["wrong_ca"]
