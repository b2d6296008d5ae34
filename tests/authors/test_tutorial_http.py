"""The tutorial's HTTP-client plugin, against a mocked status service (no sockets)."""

from __future__ import annotations

import httpx

from extproc.services.http import HttpClient
from extproc.testing import ManualClock, make_plugin_context, request_headers
from tests.authors.tutorial_http import TenantStatusConfig, TenantStatusPlugin


async def test_answers_are_cached_and_an_outage_follows_the_policy() -> None:
    calls: list[str] = []
    up = True

    def service(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if not up:
            return httpx.Response(503)
        active = request.url.path.endswith("/acme")
        return httpx.Response(200, content=b'{"active": %s}' % (b"true" if active else b"false"))

    clock = ManualClock()
    http = HttpClient(transport=httpx.MockTransport(service), clock=clock, backoff_base=0)
    plugin = TenantStatusPlugin(TenantStatusConfig(status_url="http://status.test/t"))
    context = make_plugin_context("tenant_status", plugin.config, http=http, clock=clock)
    await plugin.initialize(context)
    try:
        ok = await plugin.on_request(request_headers(headers={"x-tenant": "acme"}))
        again = await plugin.on_request(request_headers(headers={"x-tenant": "acme"}))
        inactive = await plugin.on_request(request_headers(headers={"x-tenant": "zed"}))
        up = False
        down = await plugin.on_request(request_headers(headers={"x-tenant": "newco"}))
    finally:
        await http.aclose()
    assert ok is again  # CONTINUE, the second time from the cache
    assert calls[:2] == ["/t/acme", "/t/zed"]
    assert getattr(inactive, "status", None) == 403
    assert getattr(down, "status", None) == 503  # an outage is not a verdict on the tenant
    assert calls.count("/t/newco") == 3  # one call and two retries, within the deadline
