"""End to end: Envoy buffers the body (processing mode from `needs`) and the plugin judges it."""

from __future__ import annotations

import pytest
from extproc.testing.pytest_plugin import StackFactory

pytestmark = pytest.mark.e2e

CONFIG = {
    "plugins": [
        {
            "plugin": "json_validator",
            "timeout_ms": 50,
            "config": {
                "max_body_bytes": 1024,
                "routes": [
                    {
                        "path_prefix": "/orders",
                        "required": ["item"],
                        "properties": {"item": "string", "quantity": "integer"},
                    }
                ],
            },
        }
    ]
}


async def test_bodies_judged_behind_a_real_envoy(extproc_stack: StackFactory) -> None:
    async with extproc_stack(CONFIG) as stack:
        ok = await stack.http.post("/orders", json={"item": "pen", "quantity": 2})
        bad = await stack.http.post("/orders", json={"quantity": "two"})
        big = await stack.http.post("/orders", json={"item": "x" * 2000})
        other = await stack.http.post("/elsewhere", content=b"not json")
    assert ok.status_code == 200
    assert ok.json()["body"] == '{"item":"pen","quantity":2}'  # the upstream got it intact
    assert bad.status_code == 400
    assert [e["path"] for e in bad.json()["errors"]] == ["$.item", "$.quantity"]
    assert big.status_code == 413
    assert other.status_code == 200
