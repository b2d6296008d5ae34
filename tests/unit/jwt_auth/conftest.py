"""Shared fixtures for the jwt_auth unit tests: keys are made once per session (RSA keygen is
slow), plugins use an inline JWKS (no network) and a fixed wall clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from extproc.testing.context import make_plugin_context
from extproc.testing.jwt import KeyPair, TokenFactory, make_ec_key, make_ed25519_key, make_rsa_key
from plugins.jwt_auth import JwtAuthConfig, JwtAuthPlugin
from tests.support.jwt_helpers import AUDIENCE, ISSUER, NOW, Clock, provider


@pytest.fixture(scope="session")
def rsa_key() -> KeyPair:
    return make_rsa_key("rsa-1")


@pytest.fixture(scope="session")
def ec_key() -> KeyPair:
    return make_ec_key("ec-1")


@pytest.fixture(scope="session")
def ed_key() -> KeyPair:
    return make_ed25519_key("ed-1")


@pytest.fixture(scope="session")
def other_rsa_key() -> KeyPair:
    return make_rsa_key("rsa-other")


@pytest.fixture
def wall() -> Clock:
    return Clock(NOW)


@pytest.fixture
def mono() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def tokens(rsa_key: KeyPair, wall: Clock) -> TokenFactory:
    return TokenFactory(rsa_key, issuer=ISSUER, audience=AUDIENCE, clock=wall)


MakePlugin = Callable[..., Awaitable[JwtAuthPlugin]]


@pytest.fixture
async def make_plugin(
    rsa_key: KeyPair, ec_key: KeyPair, ed_key: KeyPair, wall: Clock, mono: Clock
) -> AsyncIterator[MakePlugin]:
    made: list[tuple[JwtAuthPlugin, Any]] = []

    async def _make(config: dict[str, Any] | None = None, **kw: Any) -> JwtAuthPlugin:
        if config is None:
            config = {"providers": {"main": provider([rsa_key, ec_key, ed_key], **kw)}}
        cfg = JwtAuthConfig.model_validate(config)
        plugin = JwtAuthPlugin(cfg)
        ctx = make_plugin_context("jwt_auth", cfg, clock=mono, wall_clock=wall)
        await plugin.initialize(ctx)
        made.append((plugin, ctx))
        return plugin

    yield _make
    for plugin, ctx in made:
        await plugin.shutdown()
        await ctx.http.aclose()
