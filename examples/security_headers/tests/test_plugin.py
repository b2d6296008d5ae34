"""Unit tests: the header values, and the plugin in the response phase behind FakeEnvoy."""

from __future__ import annotations

import pytest
from extproc.plugin import Continue, Phase
from extproc.testing import make_plugin_context, response_headers
from extproc.testing.pytest_plugin import FakeEnvoySession
from pydantic import ValidationError

from extproc_security_headers import SecurityHeadersConfig, SecurityHeadersPlugin, policy_headers

FakeEnvoyFixture = type[FakeEnvoySession]


def test_defaults_are_a_safe_policy() -> None:
    assert policy_headers(SecurityHeadersConfig()) == {
        "strict-transport-security": "max-age=31536000; includeSubDomains",
        "content-security-policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'self'",
        "x-content-type-options": "nosniff",
        "referrer-policy": "strict-origin-when-cross-origin",
        "x-frame-options": "DENY",
    }


def test_each_header_can_be_switched_off_or_tuned() -> None:
    config = SecurityHeadersConfig.model_validate(
        {
            "hsts": {"max_age_s": 63072000, "preload": True},
            "content_security_policy": "default-src 'none'",
            "csp_report_only": True,
            "content_type_options": False,
            "referrer_policy": None,
            "frame_options": None,
        }
    )
    assert policy_headers(config) == {
        "strict-transport-security": "max-age=63072000; includeSubDomains; preload",
        "content-security-policy-report-only": "default-src 'none'",
    }


def test_bad_values_are_refused_at_load_time() -> None:
    with pytest.raises(ValidationError, match="preload needs"):
        SecurityHeadersConfig.model_validate({"hsts": {"max_age_s": 60, "preload": True}})
    with pytest.raises(ValidationError, match="one line"):
        SecurityHeadersConfig(content_security_policy="default-src 'self'\r\nx-evil: 1")
    with pytest.raises(ValidationError):
        SecurityHeadersConfig.model_validate({"referrer_policy": "sometimes"})


async def test_headers_reach_the_client(fake_envoy: FakeEnvoyFixture) -> None:
    async with fake_envoy(SecurityHeadersPlugin, {}) as envoy:
        ex = await envoy.request(path="/", upstream_headers={"x-powered-by": "php/5"})
    assert ex.status == 200
    assert ex.header("x-content-type-options") == "nosniff"
    assert ex.header("strict-transport-security") == "max-age=31536000; includeSubDomains"
    assert ex.header("x-powered-by") is None
    # the plugin declared response headers only: it never ran for the request headers
    assert Phase.RESPONSE_HEADERS in ex.messages_sent


async def test_upstream_values_win_unless_overridden(fake_envoy: FakeEnvoyFixture) -> None:
    upstream = {"x-frame-options": "SAMEORIGIN"}
    async with fake_envoy(SecurityHeadersPlugin, {}) as envoy:
        kept = await envoy.request(upstream_headers=upstream)
    async with fake_envoy(SecurityHeadersPlugin, {"override_upstream": True}) as envoy:
        replaced = await envoy.request(upstream_headers=upstream)
    assert kept.header("x-frame-options") == "SAMEORIGIN"
    assert kept.header("referrer-policy") == "strict-origin-when-cross-origin"
    assert replaced.header("x-frame-options") == "DENY"


async def test_hook_directly() -> None:
    plugin = SecurityHeadersPlugin(SecurityHeadersConfig(hsts=None))
    context = make_plugin_context("security_headers", plugin.config)
    await plugin.initialize(context)
    await context.http.aclose()
    result = await plugin.on_response(response_headers(404, {"content-type": "text/html"}))
    assert isinstance(result, Continue)
    assert "strict-transport-security" not in result.set_headers
