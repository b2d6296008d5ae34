"""Schema of the ``security_headers`` plugin: reading this file tells you everything it can do.

Every header has a safe default; set one to ``null`` to leave it out. By default a header the
upstream already sent is kept (the application knows its pages best); ``override_upstream``
replaces it.
"""

from __future__ import annotations

from typing import Literal

from extproc.plugin import PluginConfig
from pydantic import Field, field_validator, model_validator

__all__ = ["HstsConfig", "ReferrerPolicy", "SecurityHeadersConfig"]

ReferrerPolicy = Literal[
    "no-referrer",
    "no-referrer-when-downgrade",
    "origin",
    "origin-when-cross-origin",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
]
_YEAR = 365 * 24 * 3600


class HstsConfig(PluginConfig):
    max_age_s: int = Field(_YEAR, ge=0, le=2 * _YEAR, description="how long browsers remember")
    include_subdomains: bool = Field(True, description="apply to every subdomain too")
    preload: bool = Field(False, description="ask to be put on the browsers' preload list")

    @model_validator(mode="after")
    def _preload_rules(self) -> HstsConfig:
        if self.preload and not (self.include_subdomains and self.max_age_s >= _YEAR):
            raise ValueError("preload needs include_subdomains and max_age_s >= 1 year")
        return self


class SecurityHeadersConfig(PluginConfig):
    hsts: HstsConfig | None = Field(
        default_factory=HstsConfig, description="Strict-Transport-Security (null: not sent)"
    )
    content_security_policy: str | None = Field(
        "default-src 'self'; frame-ancestors 'none'; base-uri 'self'",
        max_length=4096,
        description="Content-Security-Policy (null: not sent)",
    )
    csp_report_only: bool = Field(
        False, description="send it as Content-Security-Policy-Report-Only (to try a policy)"
    )
    content_type_options: bool = Field(True, description="X-Content-Type-Options: nosniff")
    referrer_policy: ReferrerPolicy | None = Field(
        "strict-origin-when-cross-origin", description="Referrer-Policy (null: not sent)"
    )
    frame_options: Literal["DENY", "SAMEORIGIN"] | None = Field(
        "DENY", description="X-Frame-Options, for browsers without CSP frame-ancestors"
    )
    remove: tuple[str, ...] = Field(
        ("x-powered-by",), description="response headers removed (they advertise the stack)"
    )
    override_upstream: bool = Field(
        False, description="replace a header the upstream set itself (default: keep it)"
    )

    @field_validator("content_security_policy")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (not value.isascii() or any(c in value for c in "\r\n\0")):
            raise ValueError("must be one line of ASCII")
        return value

    @field_validator("remove")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.lower() for v in value)
