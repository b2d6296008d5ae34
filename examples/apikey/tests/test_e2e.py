"""End to end through a real Envoy: keys in Redis, and the owner feeding rate_limit."""

from __future__ import annotations

import pytest
from extproc.testing.pytest_plugin import StackFactory
from extproc.testing.redis_server import RedisServer

from extproc_apikey import hash_key

pytestmark = pytest.mark.e2e


async def test_redis_keys_and_per_owner_rate_limit(
    extproc_stack: StackFactory, extproc_redis: RedisServer
) -> None:
    extproc_redis.command("SET", f"apikey:{hash_key('k-carol')}", "carol")
    config = {
        "redis": {"url": extproc_redis.url},
        "plugins": [
            {"plugin": "apikey", "timeout_ms": 100, "config": {"anonymous_prefixes": ["/pub"]}},
            {
                "plugin": "rate_limit",
                "timeout_ms": 100,
                "config": {
                    "rules": [
                        {
                            "name": "per_key",
                            "match": {"path_prefix": "/api"},
                            "key": ["subject"],
                            "limits": [{"requests": 2, "per": "minute"}],
                        }
                    ]
                },
            },
        ],
    }
    async with extproc_stack(config) as stack:
        anonymous = await stack.http.get("/pub/status")
        missing = await stack.http.get("/api/orders")
        wrong = await stack.http.get("/api/orders", headers={"x-api-key": "nope"})
        carol = [
            await stack.http.get("/api/orders", headers={"x-api-key": "k-carol"}) for _ in range(3)
        ]
    assert anonymous.status_code == 200
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert wrong.status_code == 401
    assert [r.status_code for r in carol] == [200, 200, 429]
    echoed = carol[0].json()["headers"]
    assert echoed["x-apikey-owner"] == "carol"
    assert "x-api-key" not in echoed
