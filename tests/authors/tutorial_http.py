"""The HTTP-client step of the tutorial in docs/plugins.md (rendered from here, tested here)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from extproc.context import PluginContext
from extproc.plugin import (
    CONTINUE,
    Needs,
    Plugin,
    PluginConfig,
    Reject,
    RequestEvent,
    RequestHeaders,
    Result,
)
from extproc.services.http import BreakerOpenError, HttpError


class TenantStatusConfig(PluginConfig):
    status_url: str = Field(description="GET <status_url>/<tenant> answers {'active': bool}")
    cache_ttl_s: float = Field(60.0, ge=0, le=3600, description="how long an answer is kept")
    fail_open: bool = Field(False, description="let requests pass while the service is down")


class TenantStatusPlugin(Plugin):
    name = "tenant_status"
    priority = 950
    Config = TenantStatusConfig
    needs: ClassVar[Needs] = Needs(request_headers=True)

    config: TenantStatusConfig

    async def initialize(self, context: PluginContext) -> None:
        self._http = context.http  # timeouts, retries with backoff, one breaker per host
        self._cache = context.cache

    async def on_request(self, event: RequestEvent) -> Result:
        if not isinstance(event, RequestHeaders):
            return CONTINUE
        tenant = event.headers.get("x-tenant", "")
        if not tenant.isalnum():
            return Reject(400, "bad_request", "Send your tenant id in x-tenant.")
        active = await self._cache.get(f"tenant:{tenant}")
        if active is None:
            try:  # bounded by the plugin's deadline: no timeout to compute here
                response = await self._http.get(f"{self.config.status_url}/{tenant}")
            except (HttpError, BreakerOpenError):
                response = None  # refused, timed out, or its breaker is open
            if response is None or response.status >= 500:  # down: our policy, not a 403
                if self.config.fail_open:
                    return CONTINUE
                return Reject(503, "unavailable", "Tenant status is unavailable.")
            active = response.status == 200 and response.body == b'{"active": true}'
            await self._cache.set(f"tenant:{tenant}", active, self.config.cache_ttl_s)
        if not active:
            return Reject(403, "tenant_inactive", "This tenant is not active.")
        return CONTINUE
