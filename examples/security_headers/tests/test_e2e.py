"""End to end: Envoy asks the sidecar about response headers only, and the client sees them."""

from __future__ import annotations

import pytest
from extproc.testing.pytest_plugin import StackFactory

pytestmark = pytest.mark.e2e

CONFIG = {
    "plugins": [
        {
            "plugin": "security_headers",
            "timeout_ms": 20,
            "config": {"content_security_policy": "default-src 'none'", "referrer_policy": None},
        }
    ]
}


async def test_security_headers_through_a_real_envoy(extproc_stack: StackFactory) -> None:
    async with extproc_stack(CONFIG) as stack:
        response = await stack.http.get("/page")
    assert response.status_code == 200
    assert response.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
    assert response.headers["content-security-policy"] == "default-src 'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "referrer-policy" not in response.headers
    # processing mode from `needs`: request headers are not sent to the sidecar at all
    assert "x-request-id" in response.json()["headers"]  # (Envoy's own header reached upstream)
