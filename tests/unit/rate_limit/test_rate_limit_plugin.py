"""The plugin with the in-process store (no Redis) and with fake failing Redis clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import pytest
from pydantic import ValidationError

from extproc.context import AUTH_CLAIMS, AUTH_SUBJECT, PluginContext, RequestContext, _deadline
from extproc.observability.metrics import Registry
from extproc.plugin import (
    Continue,
    Headers,
    HealthState,
    HttpRequest,
    Reject,
    RequestHeaders,
    Result,
)
from extproc.testing.context import make_plugin_context
from plugins.rate_limit import RateLimitConfig, RateLimitPlugin

T0 = 1_700_000_000.0  # Unix seconds on a window boundary


class Clocks:
    def __init__(self) -> None:
        self.wall = T0
        self.mono = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def config(rules: list[dict[str, Any]], **extra: Any) -> RateLimitConfig:
    return RateLimitConfig.model_validate({"rules": rules, **extra})


def event(
    path: str = "/api/x",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    claims: Mapping[str, Any] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> RequestHeaders:
    ctx = RequestContext()
    if claims is not None:
        ctx[AUTH_CLAIMS] = dict(claims)
        if "sub" in claims:
            ctx[AUTH_SUBJECT] = claims["sub"]
    request = HttpRequest(
        method=method,
        path=path,
        headers=Headers.of(dict(headers or {})),
        attributes=dict(attributes or {}),
    )
    return RequestHeaders(request, ctx)


Factory = Callable[..., "asyncio.Future[tuple[RateLimitPlugin, PluginContext]]"]


@pytest.fixture
async def make() -> AsyncIterator[Any]:
    made: list[tuple[RateLimitPlugin, PluginContext]] = []

    async def factory(
        cfg: RateLimitConfig,
        *,
        clocks: Clocks | None = None,
        redis: Any = None,
        workers: int = 1,
        previous: RateLimitPlugin | None = None,
        registry: Registry | None = None,
    ) -> tuple[RateLimitPlugin, PluginContext]:
        c = clocks or Clocks()
        ctx = make_plugin_context(
            "rate_limit",
            cfg,
            redis=redis,
            clock=lambda: c.mono,
            wall_clock=lambda: c.wall,
            registry=registry,
        )
        ctx.workers = workers
        plugin = RateLimitPlugin(cfg)
        if previous is not None:
            plugin.take_over(previous)
        made.append((plugin, ctx))
        await plugin.initialize(ctx)
        return plugin, ctx

    yield factory
    for plugin, ctx in made:
        await plugin.shutdown()
        await ctx.http.aclose()


def allowed(results: list[Result]) -> int:
    return sum(isinstance(r, Continue) for r in results)


async def run(plugin: RateLimitPlugin, n: int, **kw: Any) -> list[Result]:
    return [await plugin.on_request(event(**kw)) for _ in range(n)]


PER_KEY = [
    {"name": "per_key", "key": ["header:x-api-key"], "limits": [{"requests": 3, "per": "second"}]}
]


async def test_counts_per_key_and_resets_with_the_window(make: Any) -> None:
    clocks = Clocks()
    plugin, _ = await make(config(PER_KEY), clocks=clocks)
    assert allowed(await run(plugin, 5, headers={"x-api-key": "a"})) == 3
    assert allowed(await run(plugin, 5, headers={"x-api-key": "b"})) == 3
    clocks.advance(1.0)
    assert allowed(await run(plugin, 5, headers={"x-api-key": "a"})) == 3


async def test_reject_carries_ratelimit_headers(make: Any) -> None:
    clocks = Clocks()
    clocks.advance(0.25)
    cfg = config(PER_KEY, headers={"legacy_names": True})
    plugin, _ = await make(cfg, clocks=clocks)
    results = await run(plugin, 4, headers={"x-api-key": "a"})
    reject = results[3]
    assert isinstance(reject, Reject)
    assert reject.status == 429 and reject.error == "rate_limited"
    assert reject.details == "rate_limited:per_key"
    assert reject.headers["retry-after"] == "1"
    assert reject.headers["ratelimit-limit"] == "3"
    assert reject.headers["ratelimit-remaining"] == "0"
    assert reject.headers["ratelimit-reset"] == "1"
    assert reject.headers["x-ratelimit-limit"] == "3"
    respond = reject.to_respond()
    assert b'"rate_limited"' in respond.body


async def test_allowed_headers_as_metadata_only_when_asked(make: Any) -> None:
    off, _ = await make(config(PER_KEY))
    result = await off.on_request(event(headers={"x-api-key": "a"}))
    assert isinstance(result, Continue) and result.is_noop
    on, _ = await make(config(PER_KEY, headers={"on_allow": True}))
    result = await on.on_request(event(headers={"x-api-key": "a"}))
    assert isinstance(result, Continue)
    assert result.metadata == {"limit": 3, "remaining": 2, "reset": 1}


async def test_route_and_method_matching(make: Any) -> None:
    rules = [
        {
            "name": "login",
            "match": {"path_exact": "/login", "methods": ["post"]},
            "limits": [{"requests": 1, "per": "minute"}],
        }
    ]
    plugin, _ = await make(config(rules))
    assert allowed(await run(plugin, 3, path="/login", method="GET")) == 3
    assert allowed(await run(plugin, 3, path="/login?next=/", method="POST")) == 1
    assert allowed(await run(plugin, 3, path="/other", method="POST")) == 3


async def test_claims_tiers_and_unlimited(make: Any) -> None:
    rules = [
        {
            "name": "user",
            "key": ["claim:sub"],
            "limits": [{"requests": 2, "per": "minute"}],
            "overrides": [
                {"when": {"claim:tier": "gold"}, "limits": [{"requests": 5, "per": "minute"}]},
                {"when": {"claim:tier": "internal"}, "unlimited": True},
            ],
        }
    ]
    plugin, _ = await make(config(rules))
    assert allowed(await run(plugin, 10, claims={"sub": "u1"})) == 2
    assert allowed(await run(plugin, 10, claims={"sub": "u2", "tier": "gold"})) == 5
    assert allowed(await run(plugin, 10, claims={"sub": "u3", "tier": "internal"})) == 10


@pytest.mark.parametrize(("on_missing", "expected"), [("skip", 10), ("unknown", 2)])
async def test_missing_key_part(make: Any, on_missing: str, expected: int) -> None:
    rules = [
        {
            "name": "user",
            "key": ["claim:sub"],
            "limits": [{"requests": 2, "per": "minute"}],
            "on_missing": on_missing,
        }
    ]
    plugin, _ = await make(config(rules))
    assert allowed(await run(plugin, 10)) == expected


async def test_client_address_and_several_limits(make: Any) -> None:
    rules = [
        {
            "name": "ip",
            "key": ["client_address"],
            "limits": [{"requests": 3, "per": "second"}, {"requests": 4, "per": "minute"}],
        }
    ]
    clocks = Clocks()
    plugin, _ = await make(config(rules), clocks=clocks)
    a = {"attributes": {"source.address": "10.0.0.1:5555"}}
    b = {"attributes": {"source.address": "10.0.0.2:5555"}}
    assert allowed(await run(plugin, 5, **a)) == 3
    assert allowed(await run(plugin, 5, **b)) == 3
    clocks.advance(1.0)
    # the per-second denials were not counted against the minute: one more fits
    assert allowed(await run(plugin, 5, **a)) == 1


async def test_cost_from_header_all_or_nothing(make: Any) -> None:
    rules = [
        {
            "name": "tokens",
            "limits": [{"requests": 10, "per": "minute"}],
            "cost_header": "X-Cost",
            "max_cost": 8,
        }
    ]
    plugin, _ = await make(config(rules))
    assert isinstance(await plugin.on_request(event(headers={"x-cost": "6"})), Continue)
    assert isinstance(await plugin.on_request(event(headers={"x-cost": "6"})), Reject)
    assert isinstance(await plugin.on_request(event(headers={"x-cost": "4"})), Continue)
    bad = await plugin.on_request(event(headers={"x-cost": "9"}))
    assert isinstance(bad, Reject) and bad.status == 400
    bad = await plugin.on_request(event(headers={"x-cost": "-1"}))
    assert isinstance(bad, Reject) and bad.status == 400


@pytest.mark.parametrize("where", ["rule", "global"])
async def test_shadow_counts_but_never_denies(make: Any, where: str) -> None:
    rule: dict[str, Any] = {"name": "s", "limits": [{"requests": 2, "per": "minute"}]}
    extra: dict[str, Any] = {}
    if where == "rule":
        rule["shadow"] = True
    else:
        extra["shadow"] = True
    registry = Registry()
    plugin, _ = await make(config([rule], **extra), registry=registry)
    assert allowed(await run(plugin, 5)) == 5
    text = registry.render_prometheus()
    assert 'extproc_rate_limit_shadow_denials_total{rule="s"} 3' in text
    assert 'extproc_rate_limit_decisions_total{rule="s",result="shadow_over_limit"} 3' in text


async def test_metrics_decisions_and_near_limit(make: Any) -> None:
    registry = Registry()
    plugin, _ = await make(config(PER_KEY), registry=registry)
    await run(plugin, 5, headers={"x-api-key": "a"})
    text = registry.render_prometheus()
    assert 'extproc_rate_limit_decisions_total{rule="per_key",result="ok"} 3' in text
    over = sum(
        int(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("extproc_rate_limit_decisions_total")
        and ("over_limit" in line)
        and "shadow" not in line
    )
    assert over == 2  # denied by the store, or by the over-limit cache
    assert 'extproc_rate_limit_near_limit_total{rule="per_key"} 1' in text  # remaining 0 of 3


async def test_workers_without_redis_are_refused(make: Any) -> None:
    with pytest.raises(ValueError, match="without Redis"):
        await make(config(PER_KEY), workers=4)


async def test_take_over_keeps_counters(make: Any) -> None:
    clocks = Clocks()
    cfg = config(PER_KEY)
    old, _ = await make(cfg, clocks=clocks)
    assert allowed(await run(old, 2, headers={"x-api-key": "a"})) == 2
    new, _ = await make(cfg, clocks=clocks, previous=old)
    assert allowed(await run(new, 5, headers={"x-api-key": "a"})) == 1


# ---------------------------------------------------------------- failure policies (fake Redis)


class DownRedis:
    """A client whose every command fails at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute_command(self, *args: Any, **kw: Any) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.calls += 1
        raise RedisConnectionError("down")


class HangingRedis:
    """A client whose commands never answer."""

    async def execute_command(self, *args: Any, **kw: Any) -> Any:
        await asyncio.Event().wait()


def rule_with(fail: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "r", "limits": [{"requests": 2, "per": "minute"}], "fail": fail, **extra}]


@pytest.mark.parametrize(
    ("fail", "extra", "expected"),
    [
        ("open", {}, (5, None)),
        ("closed", {}, (0, 503)),
        ("closed", {"fail_status": 429}, (0, 429)),
        ("local", {}, (2, 429)),
    ],
)
async def test_fail_policies(
    make: Any, fail: str, extra: dict[str, Any], expected: tuple[int, int | None]
) -> None:
    plugin, _ = await make(config(rule_with(fail, **extra)), redis=DownRedis())
    results = await run(plugin, 5)
    assert allowed(results) == expected[0]
    statuses = {r.status for r in results if isinstance(r, Reject)}
    assert statuses == ({expected[1]} if expected[1] else set())


async def test_breaker_opens_reports_degraded_and_skips_redis(make: Any) -> None:
    redis = DownRedis()
    clocks = Clocks()
    cfg = config(rule_with("open"), breaker={"failure_threshold": 3, "reset_timeout_s": 5})
    plugin, _ = await make(cfg, redis=redis, clocks=clocks)
    assert redis.calls == 1  # initialize tried to load the script (outside the breaker)
    assert (await plugin.health_check()).state is HealthState.HEALTHY
    await run(plugin, 10)
    assert redis.calls == 1 + 3  # then the breaker is open: no more calls
    assert (await plugin.health_check()).state is HealthState.DEGRADED
    clocks.advance(5.0)
    await run(plugin, 1)
    assert redis.calls == 1 + 4  # one half-open trial


async def test_redis_down_at_start_is_logged_once_with_its_cause(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="extproc.plugin.rate_limit")
    plugin, _ = await make(config(rule_with("open")), redis=DownRedis())
    await run(plugin, 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage()[:29] for r in warnings] == ["Redis unavailable at start: t"]
    assert warnings[0].error == "redis failed: ConnectionError: down"  # type: ignore[attr-defined]


async def test_hanging_redis_answers_within_the_budget(make: Any) -> None:
    cfg = config(rule_with("open"), redis_timeout_ms=1000, fallback_margin_ms=5)
    plugin, _ = await make(cfg, redis=HangingRedis())
    loop = asyncio.get_running_loop()
    token = _deadline.set(loop.time() + 0.05)  # the chain gives us 50 ms
    try:
        started = loop.time()
        result = await plugin.on_request(event())
        elapsed = loop.time() - started
    finally:
        _deadline.reset(token)
    assert isinstance(result, Continue)
    assert elapsed < 0.045 + 0.5  # our fallback answered before the chain's deadline


async def test_a_request_queued_behind_a_hanging_round_trip_answers_by_its_own_deadline(
    make: Any,
) -> None:
    """Its batch is never sent (the one round trip allowed is out, with a later deadline), so
    no store timeout can end its wait: the request's own deadline does."""
    cfg = config(
        rule_with("open"), redis_timeout_ms=1000, fallback_margin_ms=5, batch={"max_in_flight": 1}
    )
    plugin, _ = await make(cfg, redis=HangingRedis())
    loop = asyncio.get_running_loop()

    async def call(budget: float) -> Result:
        token = _deadline.set(loop.time() + budget)
        try:
            return await plugin.on_request(event())
        finally:
            _deadline.reset(token)

    first = asyncio.ensure_future(call(2.0))  # its round trip hangs for up to 1 s
    await asyncio.sleep(0.01)
    started = loop.time()
    result = await call(0.05)
    elapsed = loop.time() - started
    assert isinstance(result, Continue)  # fail open answered
    assert elapsed < 0.045 + 0.3, elapsed  # not when the first round trip gave up (1 s)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_no_budget_left_skips_redis(make: Any) -> None:
    redis = DownRedis()
    plugin, _ = await make(config(rule_with("local")), redis=redis)
    warmed = redis.calls  # initialize's script load
    token = _deadline.set(asyncio.get_running_loop().time())
    try:
        result = await plugin.on_request(event())
    finally:
        _deadline.reset(token)
    assert isinstance(result, Continue) and redis.calls == warmed


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"name": "a", "limits": []}], "at least 1"),
        ([{"name": "A!", "limits": [{"requests": 1, "per": "second"}]}], "rule names"),
        ([{"name": "a", "limits": [{"requests": 1}]}], "exactly one of per"),
        (
            [{"name": "a", "key": ["cookie:x"], "limits": [{"requests": 1, "per": "second"}]}],
            "key part",
        ),
        (
            [
                {"name": "a", "limits": [{"requests": 1, "per": "second"}]},
                {"name": "a", "limits": [{"requests": 1, "per": "second"}]},
            ],
            "duplicate",
        ),
        (
            [{"name": "a", "algorithm": "gcra", "limits": [{"requests": 10**9, "per": "day"}]}],
            "2\\*\\*46",
        ),
        ([{"name": "a", "cost": 5, "limits": [{"requests": 2, "per": "second"}]}], "exceeds"),
        (
            [
                {
                    "name": "a",
                    "limits": [{"requests": 2, "per": "second"}],
                    "overrides": [{"when": {"claim:t": "x"}}],
                }
            ],
            "limits or unlimited",
        ),
    ],
)
def test_config_errors(rules: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(rules)


def test_config_bounds() -> None:
    with pytest.raises(ValidationError):
        config(PER_KEY, batch={"max_wait_ms": 101})
    cfg = config(PER_KEY)
    assert cfg.batch.max_batch == 100 and cfg.batch.max_wait_ms == 10.0
    assert cast(Any, cfg.rules[0]).on_missing == "skip"
