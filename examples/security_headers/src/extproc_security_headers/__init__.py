"""Security response headers for extproc: HSTS, CSP, X-Content-Type-Options, Referrer-Policy."""

from extproc_security_headers.config import HstsConfig, SecurityHeadersConfig
from extproc_security_headers.plugin import SecurityHeadersPlugin, policy_headers

__all__ = ["HstsConfig", "SecurityHeadersConfig", "SecurityHeadersPlugin", "policy_headers"]
