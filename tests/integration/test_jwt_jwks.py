"""jwt_auth against a REAL local JWKS HTTP server (127.0.0.1, port from the OS): rotation with
single-flight refetch, kid floods, outages, garbage, slow endpoints, starting without keys,
inheriting keys across a reload. Events are awaited; timings are generous ceilings only."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from extproc.context import RequestContext, _deadline
from extproc.observability.metrics import Registry
from extproc.observability.saturation import InFlight
from extproc.plugin import Continue, Headers, HealthState, HttpRequest, Reject, RequestHeaders
from extproc.testing.context import make_plugin_context
from extproc.testing.jwt import JwksServer, KeyPair, TokenFactory, make_ec_key, make_rsa_key
from plugins.jwt_auth import JwtAuthConfig, JwtAuthPlugin

ISSUER = "https://issuer.test/"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def k1() -> KeyPair:
    return make_rsa_key("k1")


@pytest.fixture(scope="module")
def k2() -> KeyPair:
    return make_ec_key("k2")


@pytest.fixture
async def server(k1: KeyPair) -> AsyncIterator[JwksServer]:
    async with JwksServer([k1]) as srv:
        yield srv


class Harness:
    def __init__(self) -> None:
        self.mono = Clock(10_000.0)
        self.registry = Registry()
        self.made: list[tuple[JwtAuthPlugin, Any]] = []

    async def plugin(
        self, url: str, previous: JwtAuthPlugin | None = None, **overrides: Any
    ) -> JwtAuthPlugin:
        provider: dict[str, Any] = {
            "issuer": ISSUER,
            "jwks": {"uri": url},
            "timeout_ms": 2000,
            "retries": 0,
            "refetch_min_interval_s": 30,
            "fetch_retry_min_s": 0.02,
            "fetch_retry_max_s": 0.1,
        }
        provider.update(overrides)
        cfg = JwtAuthConfig.model_validate({"providers": {"idp": provider}})
        plugin = JwtAuthPlugin(cfg)
        if previous is not None:
            plugin.take_over(previous)
        ctx = make_plugin_context("jwt_auth", cfg, clock=self.mono, registry=self.registry)
        await plugin.initialize(ctx)
        self.made.append((plugin, ctx))
        return plugin

    def fetch_count(self, kind: str, outcome: str) -> float:
        text = self.registry.render_prometheus()
        needle = (
            f'extproc_jwt_auth_jwks_fetches_total{{provider="idp",kind="{kind}",'
            f'outcome="{outcome}"}} '
        )
        for line in text.splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    for plugin, ctx in h.made:
        await plugin.shutdown()
        await ctx.http.aclose()


def event(token: str) -> RequestHeaders:
    headers = Headers.of({"authorization": f"Bearer {token}"})
    return RequestHeaders(HttpRequest("GET", "/api", headers=headers), RequestContext())


async def test_rotation_single_flight_refetch(
    server: JwksServer, harness: Harness, k1: KeyPair, k2: KeyPair
) -> None:
    plugin = await harness.plugin(server.url)
    assert server.fetches == 1
    assert isinstance(
        await plugin.on_request(event(TokenFactory(k1, issuer=ISSUER).mint())), Continue
    )

    server.rotate([k1, k2])
    server.hold()  # the refetch will wait at the server until every request has queued
    new = TokenFactory(k2, issuer=ISSUER)
    tasks = [
        asyncio.create_task(plugin.on_request(event(new.mint({"sub": f"u{i}"})))) for i in range(50)
    ]
    await server.wait_for_fetches(2)
    await asyncio.sleep(0)  # let every task reach the shared fetch
    server.release()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert all(isinstance(r, Continue) for r in results), results[:3]
    assert server.fetches == 2  # exactly one refetch for 50 concurrent requests
    assert harness.fetch_count("refetch", "ok") == 1


async def test_kid_flood_costs_no_extra_fetches(
    server: JwksServer, harness: Harness, k1: KeyPair
) -> None:
    plugin = await harness.plugin(server.url)
    factory = TokenFactory(k1, issuer=ISSUER)
    results = await asyncio.gather(
        *(plugin.on_request(event(factory.mint(kid=uuid.uuid4().hex))) for _ in range(300))
    )
    assert all(isinstance(r, Reject) and r.status == 401 for r in results)
    assert {r.details for r in results if isinstance(r, Reject)} == {"jwt_unknown_kid"}
    assert server.fetches == 2  # the initial fetch + one refetch for the whole flood
    # again, sequentially: still nothing fetched within the interval
    for _ in range(50):
        await plugin.on_request(event(factory.mint(kid=uuid.uuid4().hex)))
    assert server.fetches == 2
    # once the interval has passed (injected clock), one more refetch is allowed
    harness.mono.now += 31
    await plugin.on_request(event(factory.mint(kid="another")))
    assert server.fetches == 3


async def test_unknown_kid_refetch_finds_new_key_after_interval(
    server: JwksServer, harness: Harness, k1: KeyPair, k2: KeyPair
) -> None:
    plugin = await harness.plugin(server.url)
    token = TokenFactory(k2, issuer=ISSUER).mint()
    first = await plugin.on_request(event(token))
    assert isinstance(first, Reject) and first.details == "jwt_unknown_kid"
    server.rotate([k1, k2])  # the issuer publishes the key a little late
    again = await plugin.on_request(event(token))
    assert isinstance(again, Reject)  # negative cache + rate limit: no fetch yet
    assert server.fetches == 2
    harness.mono.now += 31
    assert isinstance(await plugin.on_request(event(token)), Continue)


@pytest.mark.parametrize("failure", ["refused", "503", "garbage", "empty", "too_large", "slow"])
async def test_outage_keeps_last_good_keys(
    server: JwksServer, harness: Harness, k1: KeyPair, failure: str
) -> None:
    plugin = await harness.plugin(server.url, timeout_ms=300, max_jwks_bytes=4096)
    client = plugin._providers["idp"].jwks
    assert (await plugin.health_check()).state is HealthState.HEALTHY
    if failure in ("refused", "503"):
        await server.down(failure)
    elif failure == "garbage":
        server.garbage()
    elif failure == "empty":
        server.serve({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})  # no usable key
    elif failure == "too_large":
        server.serve({"keys": [k1.jwk()], "pad": "x" * 10_000})
    else:
        server.slow(5)
    assert await asyncio.wait_for(client.refresh(), 10) is False
    harness.mono.now += 700  # past cache_duration_s: the key set is old
    health = await plugin.health_check()
    assert health.state is HealthState.DEGRADED
    assert "key set" in health.detail and "700s old" in health.detail
    result = await plugin.on_request(event(TokenFactory(k1, issuer=ISSUER).mint()))
    assert isinstance(result, Continue)
    assert harness.fetch_count("refresh", "error") >= 1
    # recovery
    await server.up()
    server.rotate([k1])
    assert await asyncio.wait_for(client.refresh(), 10) is True
    assert (await plugin.health_check()).state is HealthState.HEALTHY


async def test_initialize_with_jwks_down_starts_not_ready_then_ready(
    harness: Harness, k1: KeyPair
) -> None:
    async with JwksServer([k1]) as srv:
        await srv.down("refused")
        plugin = await harness.plugin(srv.url)  # does not raise
        health = await plugin.health_check()
        assert health.state is HealthState.UNHEALTHY and "not loaded" in health.detail
        token = TokenFactory(k1, issuer=ISSUER).mint()
        refused = await plugin.on_request(event(token))
        assert isinstance(refused, Reject) and refused.status == 401
        assert refused.details == "jwt_jwks_unavailable"
        await srv.up()  # the background retry (fetch_retry_min_s) picks it up
        await asyncio.wait_for(plugin._providers["idp"].jwks.ready.wait(), 10)
        assert (await plugin.health_check()).state is HealthState.HEALTHY
        assert isinstance(await plugin.on_request(event(token)), Continue)


async def test_reload_inherits_previous_key_set(
    server: JwksServer, harness: Harness, k1: KeyPair
) -> None:
    old = await harness.plugin(server.url)
    await server.down("503")
    new = await harness.plugin(server.url, previous=old)
    health = await new.health_check()
    assert health.state is HealthState.DEGRADED
    assert isinstance(await new.on_request(event(TokenFactory(k1, issuer=ISSUER).mint())), Continue)


async def test_refetch_wait_is_bounded_by_the_deadline(
    server: JwksServer, harness: Harness, k1: KeyPair, k2: KeyPair
) -> None:
    plugin = await harness.plugin(server.url)
    server.rotate([k1, k2])
    server.hold()
    loop = asyncio.get_running_loop()
    token = _deadline.set(loop.time() + 0.2)
    try:
        start = loop.time()
        result = await plugin.on_request(event(TokenFactory(k2, issuer=ISSUER).mint()))
        assert loop.time() - start < 3.0
    finally:
        _deadline.reset(token)
    assert isinstance(result, Reject) and result.status == 401
    server.release()  # the shared fetch was not cancelled with the request: it completes
    assert await asyncio.wait_for(plugin._providers["idp"].jwks.refresh(), 10)
    assert isinstance(
        await plugin.on_request(event(TokenFactory(k2, issuer=ISSUER).mint())), Continue
    )


def test_jwks_uri_must_be_https_except_loopback() -> None:
    for uri in ("http://idp.example.com/jwks", "http://10.0.0.1/jwks", "file:///etc/jwks"):
        with pytest.raises(ValidationError):
            JwtAuthConfig.model_validate(
                {"providers": {"p": {"issuer": "i", "jwks": {"uri": uri}}}}
            )
    for uri in ("https://idp.example.com/jwks", "http://127.0.0.1:1/jwks", "http://[::1]:1/j"):
        JwtAuthConfig.model_validate({"providers": {"p": {"issuer": "i", "jwks": {"uri": uri}}}})


async def test_key_set_age_gauge(server: JwksServer, harness: Harness) -> None:
    await harness.plugin(server.url)
    harness.mono.now += 42
    text = harness.registry.render_prometheus()
    assert 'extproc_jwt_auth_jwks_key_set_age_seconds{provider="idp"} 42' in text


@pytest.mark.redis
async def test_redis_second_tier_shares_validated_tokens(k1: KeyPair) -> None:
    """Two plugin instances (two workers) share validated tokens through Redis: only the
    SHA-256 key and the claims JSON are stored, with a TTL; a stalled Redis is a miss."""
    async with two_workers(k1, None) as workers:
        a, b, redis = workers.a, workers.b, workers.redis
        token = TokenFactory(k1, issuer=ISSUER).mint({"sub": "shared"})
        assert isinstance(await a.on_request(event(token)), Continue)
        assert a.token_cache is not None and b.token_cache is not None
        await a.token_cache.aclose()  # wait for the background L2 write
        keys = await redis.keys("extproc:jwt:*")
        assert len(keys) == 1 and token.encode() not in keys[0]
        stored = await redis.get(keys[0])
        assert stored is not None and token.encode() not in stored and b"shared" in stored
        assert 0 < await redis.ttl(keys[0]) <= 240  # 80% of 300 s
        hit = event(token)
        assert isinstance(await b.on_request(hit), Continue)
        assert b.token_cache.tiered.l2_hits == 1 and hit.context["auth.subject"] == "shared"
        # a malformed token is refused before any Redis read (garbage costs no round trip)
        reads = await _get_calls(redis)
        bad = await b.on_request(event(token[:-1] + "."))
        assert isinstance(bad, Reject) and bad.status == 401
        assert await _get_calls(redis) == reads
        # a saturated worker verifies here instead of reading Redis (the read would wait
        # behind every queued request), and reads it again once it has spare CPU
        fresh = TokenFactory(k1, issuer=ISSUER).mint({"sub": "fresh"})
        assert isinstance(await a.on_request(event(fresh)), Continue)
        await a.token_cache.aclose()  # stored in Redis
        reads = await _get_calls(redis)
        b._saturation = lambda: 1.0
        assert isinstance(await b.on_request(event(fresh)), Continue)
        assert await _get_calls(redis) == reads and b.token_cache.tiered.l2_hits == 1
        b.token_cache.l1.clear()
        b._saturation = lambda: 0.0
        assert isinstance(await b.on_request(event(fresh)), Continue)
        assert await _get_calls(redis) == reads + 1 and b.token_cache.tiered.l2_hits == 2
        # nor beside other streams (a burst the meter has not seen yet): this one and another
        b.token_cache.l1.clear()
        b._in_flight.count = 2
        assert isinstance(await b.on_request(event(fresh)), Continue)
        assert await _get_calls(redis) == reads + 1 and b.token_cache.tiered.l2_hits == 2
        b.token_cache.l1.clear()
        b._in_flight.count = 1  # this stream alone
        assert isinstance(await b.on_request(event(fresh)), Continue)
        assert await _get_calls(redis) == reads + 2 and b.token_cache.tiered.l2_hits == 3
        b._in_flight.count = 0
        # a stalled Redis costs at most its timeout, and the token is verified locally
        workers.redis_server.pause()
        try:
            other = TokenFactory(k1, issuer=ISSUER).mint({"sub": "other"})
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert isinstance(await b.on_request(event(other)), Continue)
            assert loop.time() - start < 2.0
        finally:
            workers.redis_server.resume()


class _TwoWorkers:
    """Two plugin instances (two workers) on one real Redis and one real JWKS server, each
    with its own monotonic clock; ``algorithms`` None: the provider's default; ``token_cache``
    the plugin's settings of that name."""

    def __init__(
        self,
        redis_server: Any,
        redis: Any,
        server: JwksServer,
        algorithms: list[str] | None,
        token_cache: dict[str, Any] | None = None,
    ) -> None:
        self.redis_server = redis_server
        self.redis = redis
        self.server = server
        self.algorithms = algorithms
        self.token_cache = token_cache or {}
        self.clocks = [Clock(10_000.0), Clock(10_000.0)]
        self.made: list[tuple[JwtAuthPlugin, Any]] = []

    async def start(self) -> None:
        provider: dict[str, Any] = {"issuer": ISSUER, "jwks": {"uri": self.server.url}}
        if self.algorithms is not None:
            provider["algorithms"] = self.algorithms
        cfg = JwtAuthConfig.model_validate(
            {"providers": {"idp": provider}, "token_cache": self.token_cache}
        )
        for clock in self.clocks:
            plugin = JwtAuthPlugin(cfg)
            ctx = make_plugin_context("jwt_auth", cfg, redis=self.redis, clock=clock)
            await plugin.initialize(ctx)
            # the meter would read this test process's own CPU (pytest's thread is the
            # loop's): the tests assume spare CPU unless they say otherwise
            plugin._saturation = lambda: 0.0
            plugin._in_flight = InFlight()  # its own: no other test's streams
            assert plugin.token_cache is not None
            self.made.append((plugin, ctx))

    @property
    def a(self) -> JwtAuthPlugin:
        return self.made[0][0]

    @property
    def b(self) -> JwtAuthPlugin:
        return self.made[1][0]

    async def verified_by_a(self, key: KeyPair) -> tuple[str, bytes]:
        """A token signed by ``key``, verified by worker A and stored in Redis: the token and
        its Redis key."""
        token = TokenFactory(key, issuer=ISSUER, lifetime=3600).mint({"sub": "s"})
        assert isinstance(await self.a.on_request(event(token)), Continue)
        assert self.a.token_cache is not None
        await self.a.token_cache.aclose()  # the background L2 write
        [stored] = await self.redis.keys("extproc:jwt:*")
        return token, stored

    async def new_keys(self, keys: list[Any]) -> None:
        self.server.rotate(keys)
        for plugin, _ in self.made:
            assert await plugin._providers["idp"].jwks.refresh()


@contextlib.asynccontextmanager
async def two_workers(
    key: KeyPair, algorithms: list[str] | None, token_cache: dict[str, Any] | None = None
) -> AsyncIterator[_TwoWorkers]:
    from redis.asyncio import Redis

    from extproc.testing.redis_server import RedisServer

    with RedisServer() as rs:
        redis = Redis.from_url(rs.url)
        async with JwksServer([key]) as server:
            workers = _TwoWorkers(rs, redis, server, algorithms, token_cache)
            try:
                await workers.start()
                yield workers
            finally:
                for plugin, ctx in workers.made:
                    await plugin.shutdown()
                    await ctx.http.aclose()
                await redis.aclose()


@pytest.mark.redis
async def test_new_tokens_reach_redis_together_after_the_write_window(k1: KeyPair) -> None:
    """``token_cache.redis_write_window_ms``: tokens verified within the window reach Redis
    when it ends, in one pipeline, and not before: meanwhile the other worker finds nothing
    there and verifies a token itself."""
    async with two_workers(k1, None, {"redis_write_window_ms": 1000}) as workers:
        a, b, redis = workers.a, workers.b, workers.redis
        assert a.token_cache is not None and b.token_cache is not None
        assert a.token_cache.tiered._write_window == 1.0
        tokens = [TokenFactory(k1, issuer=ISSUER).mint({"sub": f"s{n}"}) for n in range(3)]
        for token in tokens:
            assert isinstance(await a.on_request(event(token)), Continue)
            await asyncio.sleep(0.02)
        assert await redis.keys("extproc:jwt:*") == []  # still gathering
        reads = await _get_calls(redis)
        assert isinstance(await b.on_request(event(tokens[0])), Continue)
        assert await _get_calls(redis) == reads + 1  # b looked in Redis ...
        assert b.token_cache.tiered.l2_hits == 0  # ... found nothing, and verified it itself
        await a.token_cache.aclose()  # waits for the window's end and its pipeline
        assert len(await redis.keys("extproc:jwt:*")) == 3
        assert a.token_cache.tiered.l2_write_batches == 1


def test_the_write_window_is_bounded() -> None:
    provider = {"issuer": ISSUER, "jwks": {"uri": "http://127.0.0.1:1/jwks"}}
    for bad in (-1, 1001):
        with pytest.raises(ValidationError):
            JwtAuthConfig.model_validate(
                {"providers": {"p": provider}, "token_cache": {"redis_write_window_ms": bad}}
            )


@pytest.mark.redis
async def test_new_key_material_under_an_old_kid_is_not_read_back_from_redis(
    k1: KeyPair,
) -> None:
    """The identity provider replaces a key but keeps its kid. A token signed by the old key
    and shared through Redis must not pass on any worker: the entry carries the thumbprint
    of the key that verified it, and that key is gone from the set."""
    async with two_workers(k1, ["RS256"]) as workers:
        a, b = workers.a, workers.b
        assert a.token_cache is not None and b.token_cache is not None
        token, stored = await workers.verified_by_a(k1)
        assert b":v2:" in stored and b'"t":' in (await workers.redis.get(stored) or b"")

        await workers.new_keys([make_rsa_key(k1.kid)])  # same kid, new material
        assert len(a.token_cache.l1) == 0  # dropped when the key set changed
        for plugin in (a, b):
            reads = await _get_calls(workers.redis)
            refused = await plugin.on_request(event(token))
            assert isinstance(refused, Reject) and refused.status == 401
            assert await _get_calls(workers.redis) == reads + 1  # read, and not believed
        assert b.token_cache.tiered.l2_hits == 1 and b.token_cache.tiered.l2_errors == 0


@pytest.mark.redis
async def test_a_failed_refresh_forgets_the_token_in_redis_too(k1: KeyPair) -> None:
    """The key that verified a token is re-pinned to another algorithm (same material, so
    the cached entries still name a key in the set). Worker A's background re-verification
    of the token fails: the entry goes from A's memory AND from Redis, so worker B, with
    nothing in memory, verifies the token itself (401) instead of reading the entry back for
    the rest of its L2 TTL."""
    async with two_workers(k1, ["RS256", "PS256"]) as workers:
        a, b = workers.a, workers.b
        assert a.token_cache is not None and b.token_cache is not None
        token, stored = await workers.verified_by_a(k1)

        await workers.new_keys([{**k1.jwk(), "alg": "PS256"}])
        [key] = list(a.token_cache.l1)  # kept: its key is still in the set
        left = a.token_cache.l1.ttl(key)
        assert left is not None
        workers.clocks[0].now += left - 5  # A's entry is due for re-verification
        assert isinstance(await a.on_request(event(token)), Continue)  # old entry
        await asyncio.wait_for(a._refreshing[key], 5.0)
        assert key not in a.token_cache.l1
        assert await workers.redis.exists(stored) == 0
        assert a.token_cache.tiered.l2_errors == 0

        reads = await _get_calls(workers.redis)
        refused = await b.on_request(event(token))
        assert isinstance(refused, Reject) and refused.status == 401
        assert await _get_calls(workers.redis) == reads + 1  # B looked in Redis, found nothing
        assert b.token_cache.tiered.l2_hits == 0


async def _get_calls(redis: Any) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))
