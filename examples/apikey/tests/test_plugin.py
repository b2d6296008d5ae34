"""Unit tests: the plugin behind FakeEnvoy, with static keys and with a real Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from extproc.context import AUTH_SUBJECT
from extproc.plugin import Continue, Reject
from extproc.services.redis import make_redis
from extproc.testing import ManualClock, make_plugin_context, request_headers
from extproc.testing.pytest_plugin import FakeEnvoySession
from extproc.testing.redis_server import RedisServer
from pydantic import ValidationError
from redis.asyncio import Redis

from extproc_apikey import OWNER_KEY, ApiKeyConfig, ApiKeyPlugin, hash_key

FakeEnvoyFixture = type[FakeEnvoySession]
STATIC = {"keys": [{"sha256": hash_key("k-alice"), "owner": "alice"}]}


@pytest.fixture
async def redis(extproc_redis: RedisServer) -> AsyncIterator[Redis]:
    client = make_redis(extproc_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_missing_key_is_a_json_401_and_never_reaches_the_upstream(
    fake_envoy: FakeEnvoyFixture,
) -> None:
    async with fake_envoy(ApiKeyPlugin, STATIC) as envoy:
        ex = await envoy.request(path="/orders")
    assert ex.status == 401 and ex.upstream_headers is None
    assert ex.header("content-type") == "application/json"
    assert ex.header("www-authenticate") == 'ApiKey header="x-api-key"'
    assert json.loads(ex.response_body) == {
        "error": "unauthorized",
        "message": "An API key is required.",
    }


async def test_static_key_passes_names_the_owner_and_is_stripped(
    fake_envoy: FakeEnvoyFixture,
) -> None:
    async with fake_envoy(ApiKeyPlugin, STATIC) as envoy:
        ok = await envoy.request(path="/orders", headers={"x-api-key": "k-alice"})
        bad = await envoy.request(path="/orders", headers={"x-api-key": "k-mallory"})
    assert ok.status == 200
    assert ok.upstream_header("x-apikey-owner") == "alice"
    assert ok.upstream_header("x-api-key") is None  # the key itself never goes upstream
    assert bad.status == 401
    assert json.loads(bad.response_body)["message"] == "The API key is not valid."


async def test_owner_lands_in_the_request_context() -> None:
    plugin = ApiKeyPlugin(ApiKeyConfig.model_validate(STATIC))
    context = make_plugin_context("apikey", plugin.config)
    await plugin.initialize(context)
    try:
        event = request_headers("/x", headers={"x-api-key": "k-alice"})
        result = await plugin.on_request(event)
    finally:
        await context.http.aclose()
    assert isinstance(result, Continue)
    assert event.context[OWNER_KEY] == "alice"
    assert event.context[AUTH_SUBJECT] == "apikey:alice"


async def test_anonymous_prefix_needs_no_key(fake_envoy: FakeEnvoyFixture) -> None:
    async with fake_envoy(ApiKeyPlugin, {**STATIC, "anonymous_prefixes": ["/health"]}) as envoy:
        ex = await envoy.request(path="/health?full=1")
    assert ex.status == 200


async def test_keys_from_redis_are_cached_for_their_ttl(
    fake_envoy: FakeEnvoyFixture, extproc_redis: RedisServer, redis: Redis
) -> None:
    extproc_redis.command("SET", f"apikey:{hash_key('k-bob')}", "bob")
    clock = ManualClock()
    session = fake_envoy(ApiKeyPlugin, {"cache_ttl_s": 10}, redis=redis, clock=clock)
    async with session as envoy:
        first = await envoy.request(headers={"x-api-key": "k-bob"})
        extproc_redis.command("DEL", f"apikey:{hash_key('k-bob')}")  # revoked
        cached = await envoy.request(headers={"x-api-key": "k-bob"})
        clock.advance(10.5)
        revoked = await envoy.request(headers={"x-api-key": "k-bob"})
    assert first.status == 200 and first.upstream_header("x-apikey-owner") == "bob"
    assert cached.status == 200  # still in the cache: revocation takes up to cache_ttl_s
    assert revoked.status == 401
    assert extproc_redis.calls("get") == 2


async def test_redis_down_refuses_with_503_or_falls_back_to_static_keys(
    fake_envoy: FakeEnvoyFixture, extproc_redis: RedisServer, redis: Redis
) -> None:
    extproc_redis.stop()
    async with fake_envoy(ApiKeyPlugin, STATIC, redis=redis) as envoy:
        refused = await envoy.request(headers={"x-api-key": "k-alice"})
    fallback = {**STATIC, "redis_down": "static"}
    async with fake_envoy(ApiKeyPlugin, fallback, redis=redis) as envoy:
        allowed = await envoy.request(headers={"x-api-key": "k-alice"})
    assert refused.status == 503
    assert json.loads(refused.response_body)["error"] == "unavailable"
    assert allowed.status == 200


def test_config_holds_hashes_only() -> None:
    with pytest.raises(ValidationError, match="sha256"):
        ApiKeyConfig.model_validate({"keys": [{"sha256": "k-alice", "owner": "alice"}]})
    with pytest.raises(ValidationError, match="listed twice"):
        ApiKeyConfig.model_validate({"keys": STATIC["keys"] * 2})
    with pytest.raises(ValidationError, match="header name"):
        ApiKeyConfig(header="X-Api-Key")


def test_a_reject_is_what_the_client_sees() -> None:
    reject = Reject(401, "unauthorized", "An API key is required.")
    assert reject.to_respond().status == 401
