"""``security_headers``: add the response headers every browser-facing service should send.

It needs the response headers only: Envoy does not even send the request headers to the
sidecar for it (one round trip less per request), and the header values are computed once,
when the configuration is loaded.
"""

from __future__ import annotations

from typing import ClassVar

from extproc.context import PluginContext
from extproc.plugin import (
    CONTINUE,
    Continue,
    Needs,
    Plugin,
    ResponseEvent,
    ResponseHeaders,
    Result,
)

from extproc_security_headers.config import SecurityHeadersConfig

__all__ = ["SecurityHeadersPlugin", "policy_headers"]


def policy_headers(config: SecurityHeadersConfig) -> dict[str, str]:
    """The headers a configuration asks for, by lower-case name."""
    out: dict[str, str] = {}
    if config.hsts is not None:
        value = f"max-age={config.hsts.max_age_s}"
        if config.hsts.include_subdomains:
            value += "; includeSubDomains"
        if config.hsts.preload:
            value += "; preload"
        out["strict-transport-security"] = value
    if config.content_security_policy is not None:
        name = "content-security-policy"
        out[f"{name}-report-only" if config.csp_report_only else name] = (
            config.content_security_policy
        )
    if config.content_type_options:
        out["x-content-type-options"] = "nosniff"
    if config.referrer_policy is not None:
        out["referrer-policy"] = config.referrer_policy
    if config.frame_options is not None:
        out["x-frame-options"] = config.frame_options
    return out


class SecurityHeadersPlugin(Plugin):
    name = "security_headers"
    version = "1.0.0"
    api_version = "1"
    priority = 50  # late: other plugins' response headers are already decided
    Config = SecurityHeadersConfig
    needs: ClassVar[Needs] = Needs(request_headers=False, response_headers=True)

    config: SecurityHeadersConfig

    async def initialize(self, context: PluginContext) -> None:
        self._headers = policy_headers(self.config)
        self._remove = self.config.remove
        self._all = Continue(set_headers=self._headers, remove_headers=self._remove)

    async def on_response(self, event: ResponseEvent) -> Result:
        if not isinstance(event, ResponseHeaders):
            return CONTINUE
        if self.config.override_upstream:
            return self._all
        present = event.headers
        if not any(name in present for name in self._headers):
            return self._all  # the common case: nothing to compare, no allocation
        missing = {k: v for k, v in self._headers.items() if k not in present}
        return Continue(set_headers=missing, remove_headers=self._remove)
