"""The ``rate_limit`` plugin's configuration: reading this file tells you everything it can do.

A *rule* selects requests (route and method), builds a *descriptor* from parts of the request
(``claim:<name>``, ``header:<name>``, ``client_address``, ``path``, ``method``, ``subject``) and
applies one or more *limits* to every distinct descriptor. *Overrides* change the limits (or
lift them: ``unlimited``) when parts of the request have given values, e.g. a ``tier`` claim.

Example::

    rules:
      - name: per_user
        match: {path_prefix: /api/}
        key: [claim:sub]
        algorithm: gcra
        limits: [{requests: 10, per: second}, {requests: 500, per: hour}]
        overrides:
          - when: {claim:tier: gold}
            limits: [{requests: 100, per: second}]
          - when: {claim:tier: internal}
            unlimited: true
        fail: local
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from extproc.plugin import PluginConfig

__all__ = [
    "PERIODS_MS",
    "Algorithm",
    "BatchConfig",
    "BreakerConfig",
    "FailPolicy",
    "GrantAheadConfig",
    "HeadersConfig",
    "Limit",
    "MissingPart",
    "Override",
    "RateLimitConfig",
    "Route",
    "Rule",
    "parse_part",
]

#: the named periods a limit may use
PERIODS_MS: dict[str, int] = {
    "second": 1_000,
    "minute": 60_000,
    "hour": 3_600_000,
    "day": 86_400_000,
}

_NAME = re.compile(r"^[a-z0-9_\-]{1,64}$")
_PART_KINDS = ("claim", "header")
_PART_WORDS = ("client_address", "path", "method", "subject")
#: GCRA keeps its state in integer units of 1/limit ms; this bound keeps every value an exact
#: integer in Redis Lua's doubles (2**53) with room for costs.
_GCRA_MAX_UNITS = 2**46


class Algorithm(enum.StrEnum):
    FIXED_WINDOW = "fixed_window"
    GCRA = "gcra"


class FailPolicy(enum.StrEnum):
    """What a rule does when its store (Redis) is slow, down or its breaker is open."""

    OPEN = "open"  # allow the request (it is not counted anywhere)
    CLOSED = "closed"  # deny it with ``fail_status``
    LOCAL = "local"  # decide with the in-process limiter (limits then apply per process)


class MissingPart(enum.StrEnum):
    """What a rule does with a request that lacks a part of its key (no such claim/header)."""

    SKIP = "skip"  # the rule does not apply to this request (default)
    UNKNOWN = "unknown"  # the part is keyed as "unknown": all such requests share one counter


def parse_part(spec: str) -> tuple[str, str]:
    """``"claim:sub"`` -> ``("claim", "sub")``; ``"path"`` -> ``("path", "")``."""
    kind, sep, name = spec.partition(":")
    if sep:
        if kind not in _PART_KINDS or not name:
            raise ValueError(f"key part {spec!r}: expected claim:<name> or header:<name>")
        return kind, (name.lower() if kind == "header" else name)
    if spec not in _PART_WORDS:
        raise ValueError(
            f"key part {spec!r}: expected claim:<name>, header:<name> or one of {_PART_WORDS}"
        )
    return spec, ""


class Limit(PluginConfig):
    requests: Annotated[int, Field(ge=1, le=1_000_000_000)] = Field(
        description="permits per period (the cost of a request counts against it)"
    )
    per: Literal["second", "minute", "hour", "day"] | None = Field(
        default=None, description="a named period; give this or period_ms"
    )
    period_ms: Annotated[int, Field(ge=1, le=86_400_000)] | None = Field(
        default=None, description="the period in milliseconds; give this or per"
    )

    @model_validator(mode="after")
    def _one_period(self) -> Limit:
        if (self.per is None) == (self.period_ms is None):
            raise ValueError("a limit needs exactly one of per / period_ms")
        return self

    @property
    def period(self) -> int:
        """The period in milliseconds."""
        return self.period_ms if self.period_ms is not None else PERIODS_MS[self.per or "second"]


class Route(PluginConfig):
    path_prefix: str | None = Field(default=None, description="match paths starting with this")
    path_exact: str | None = Field(default=None, description="match exactly this path")
    methods: tuple[str, ...] = Field(
        default=(), description="match these methods only (upper case); empty = any"
    )

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in v)

    @model_validator(mode="after")
    def _one_path(self) -> Route:
        if self.path_prefix is not None and self.path_exact is not None:
            raise ValueError("give path_prefix or path_exact, not both")
        return self


class Override(PluginConfig):
    when: dict[str, str] = Field(
        min_length=1,
        description="key part -> value; all must equal (e.g. {'claim:tier': 'gold'})",
    )
    limits: tuple[Limit, ...] = Field(default=(), description="the limits that replace the rule's")
    unlimited: bool = Field(default=False, description="lift the rule's limits for these requests")

    @field_validator("when")
    @classmethod
    def _parts(cls, v: dict[str, str]) -> dict[str, str]:
        for spec in v:
            parse_part(spec)
        return v

    @model_validator(mode="after")
    def _limits_or_unlimited(self) -> Override:
        if self.unlimited == bool(self.limits):
            raise ValueError("an override needs limits or unlimited: true (one of them)")
        return self


class Rule(PluginConfig):
    name: str = Field(description="unique rule name ([a-z0-9_-], used in keys and metrics)")
    match: Route = Field(default_factory=Route, description="which requests the rule applies to")
    key: tuple[str, ...] = Field(
        default=(),
        description="descriptor parts; each distinct combination has its own counter "
        "(empty = one counter for all matching requests)",
    )
    limits: tuple[Limit, ...] = Field(min_length=1, description="every limit must allow a request")
    algorithm: Algorithm = Field(default=Algorithm.FIXED_WINDOW, description="counting algorithm")
    cost: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=1, description="permits one request takes (when cost_header is absent)"
    )
    cost_header: str | None = Field(
        default=None,
        description="take the cost from this request header (a positive integer; an invalid "
        "value is denied with 400)",
    )
    max_cost: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=1_000, description="upper bound of a header-given cost"
    )
    overrides: tuple[Override, ...] = Field(
        default=(), description="first matching override replaces the limits"
    )
    on_missing: MissingPart = Field(
        default=MissingPart.SKIP,
        description="a request lacking a key part: skip the rule, or key the part as unknown",
    )
    shadow: bool = Field(default=False, description="count and report, never deny")
    fail: FailPolicy = Field(default=FailPolicy.LOCAL, description="when the store is down")
    fail_status: Literal[429, 503] = Field(
        default=503, description="status of a fail: closed denial"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("rule names are 1-64 of [a-z0-9_-]")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for spec in v:
            parse_part(spec)
        if len(set(v)) != len(v):
            raise ValueError("key parts must be distinct")
        return v

    @field_validator("cost_header")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @model_validator(mode="after")
    def _checks(self) -> Rule:
        for lim in (*self.limits, *(x for o in self.overrides for x in o.limits)):
            if self.algorithm is Algorithm.GCRA and lim.requests * lim.period > _GCRA_MAX_UNITS:
                raise ValueError(
                    f"rule {self.name}: gcra needs requests * period_ms <= 2**46 "
                    f"(got {lim.requests} per {lim.period} ms)"
                )
        if self.cost > max(x.requests for x in self.limits):
            raise ValueError(f"rule {self.name}: cost {self.cost} exceeds every limit")
        return self


class BatchConfig(PluginConfig):
    """How requests share Redis round trips (one ``EVALSHA`` per batch; see ``batcher.py``).

    With spare CPU a request goes at once (with whatever arrived in the same loop tick), so
    light load adds no latency; behind a round trip in flight it waits (``in_flight_wait_ms``)
    only at a rate that brings it company meanwhile. When the worker's CPU is saturated,
    batches gather for up to ``max_wait_ms`` (scaled by how saturated it is): that wait is
    mostly spent queueing for the CPU anyway, and each round trip saved gives client and
    Redis CPU back to requests. It gathers only when the window would collect at least 4
    requests at the recent arrival rate: a worker that reads as saturated at a moderate rate
    (a slow or crowded machine) would make every request wait for a batch of one or two. And
    only where requests queue: in the worker (4 or more streams in flight in it) or for the
    CPU (Linux PSI of the sidecar's cgroup, else of the machine: some task waits for a core
    at least half of the time). That pressure opens a window (scaled by it) even when the
    worker itself keeps up: several workers on a full machine each read as unsaturated.
    The admin ``/status`` shows the window in force (``batch_window_ms``); the
    ``batch_size`` and ``batch_wait_seconds`` histograms the result. ``max_wait_ms: 0`` never
    waits for company.
    """

    max_batch: Annotated[int, Field(ge=1, le=1_000)] = Field(
        default=100, description="requests per Redis round trip at most (1 = no batching)"
    )
    max_wait_ms: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=10.0,
        description=(
            "longest a batch gathers when the worker's CPU is saturated (in proportion to how"
            " saturated) and there is a queue: 4 or more streams in flight in the worker, or"
            " the CPU under pressure (some task waiting for a core at least half of the time,"
            " Linux PSI of the sidecar's cgroup, else of the machine; under that pressure it"
            " gathers, in proportion to it, even when the worker is not saturated itself);"
            " with spare CPU a request"
            " waits at most in_flight_wait_ms for a round"
            " trip in flight and not at all when none is. A batch also waits for a free slot"
            " when max_in_flight round trips are out"
        ),
    )
    in_flight_wait_ms: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=1.0,
        description=(
            "with spare CPU, how long a request waits for a round trip in flight to come back"
            " (and share the next one) before it takes a free slot; never more than"
            " max_wait_ms. Only while the recent arrival rate would bring 4 requests within"
            " it (4,000 req/s at 1 ms): below that, a request takes a free slot at once"
        ),
    )
    max_in_flight: Annotated[int, Field(ge=1, le=16)] = Field(
        default=2, description="Redis round trips in flight at once"
    )
    max_queue: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10_000, description="queued requests at most; beyond, the fail policy applies"
    )


class GrantAheadConfig(PluginConfig):
    """Answer a request from what this worker last heard from Redis, without waiting for it.

    Off by default: the rules are then exact across any number of workers and sidecars. With
    ``enabled``, a request whose every key was far enough below its limit in Redis' last
    answer (this worker's own hits since then taken off) is allowed at once. Its hits still
    go to Redis within ``flush_ms``, gathered with the others allowed meanwhile (one round
    trip for many requests even at a light load), and that answer updates what the worker
    knows; other workers see those hits that much later. A key near its limit, one not
    heard of within ``max_age_ms``, or any key while Redis is failing goes through Redis as
    before. It takes the Redis round trip off the path of requests that are nowhere near a
    limit (most of them, in most deployments), and most of the round trips off the worker.

    What it costs in exactness: alone (one worker, one sidecar), nothing: this worker's
    grants in flight never exceed ``share`` of the remaining it last heard, and only its own
    hits lower that count. When several workers or sidecars count the same key, each can
    grant up to ``share`` of the remaining it last heard of before Redis' answer reaches it.
    A burst that reaches them all at once can so be granted up to ``workers x share`` times
    that remaining: past the limit when that is more than Redis still has (never, with
    ``workers x share <= 1`` and current knowledge). Knowledge is never quite current, so each
    worker also learns how fast the others spend a key (from how much more than its own hits
    the count fell between two answers) and keeps what they will have spent before its hit
    runs out of its grants. Redis refuses the hits past the limit (they are not counted) and
    the next requests see it.
    ``granted_ahead_over_limit_total`` counts every request allowed that way. Needs the
    pipelined Redis connection (``redis_pipeline``), whose answers come in send order.
    """

    enabled: bool = Field(default=False, description="allow requests before Redis answers")
    share: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.5,
        description=(
            "fraction of a key's last known remaining this worker may grant before Redis"
            " answers; workers x share <= 1 keeps shared keys within their limits"
        ),
    )
    max_age_ms: Annotated[float, Field(gt=0.0, le=3_600_000.0)] = Field(
        default=10_000.0, description="what Redis said about a key is used for this long"
    )
    flush_ms: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=5.0,
        description=(
            "how long the hits of requests allowed ahead gather before they go to Redis"
            " together (sooner with a request that waits for Redis, or batch.max_batch of"
            " them); no request waits for them. 0: with the next batch"
        ),
    )
    max_keys: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=100_000, description="keys remembered at most (beyond, the oldest are dropped)"
    )


class BreakerConfig(PluginConfig):
    failure_threshold: Annotated[int, Field(ge=1, le=1_000)] = Field(
        default=5, description="consecutive failed round trips that open the breaker"
    )
    reset_timeout_s: Annotated[float, Field(gt=0.0, le=300.0)] = Field(
        default=1.0, description="seconds the breaker stays open before one trial round trip"
    )


class HeadersConfig(PluginConfig):
    on_reject: bool = Field(default=True, description="RateLimit-* and Retry-After on 429s")
    on_allow: bool = Field(
        default=False,
        description="RateLimit-* values of allowed requests as dynamic metadata "
        "(namespace extproc.rate_limit) for Envoy to add to the response",
    )
    legacy_names: bool = Field(
        default=False, description="also send X-RateLimit-Limit/-Remaining/-Reset"
    )


class RateLimitConfig(PluginConfig):
    rules: tuple[Rule, ...] = Field(min_length=1, description="the rules, all applied")
    shadow: bool = Field(default=False, description="every rule in shadow mode (never deny)")
    key_prefix: str = Field(
        default="rl", min_length=1, max_length=32, description="prefix of the Redis keys"
    )
    redis_timeout_ms: Annotated[float, Field(gt=0.0, le=1_000.0)] = Field(
        default=50.0,
        description="longest wait for one Redis decision (also cut to the message budget)",
    )
    fallback_margin_ms: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        # a busy event loop runs timers late: 3 ms let the chain's deadline (and its failure
        # policy) win over the rule's own fallback under load
        default=10.0,
        description="budget kept back from the chain's deadline to apply the fail policy",
    )
    redis_pipeline: bool = Field(
        default=True,
        description=(
            "send the script over one pipelined connection of our own (same server, database,"
            " credentials and timeouts as the shared client; TLS and other setups keep the"
            " shared redis-py pool)"
        ),
    )
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Redis batching")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="Redis breaker")
    headers: HeadersConfig = Field(default_factory=HeadersConfig, description="response headers")
    grant_ahead: GrantAheadConfig = Field(
        default_factory=GrantAheadConfig,
        description="allow requests far below their limits before Redis answers",
    )
    over_limit_cache: bool = Field(
        default=True, description="deny keys known to be over their limit without Redis"
    )
    over_limit_cache_size: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=100_000, description="keys in the over-limit cache at most"
    )
    local_max_keys: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=1_000_000, description="keys the in-process store holds at most"
    )
    trusted_xff_hops: Annotated[int, Field(ge=0, le=10)] = Field(
        default=0,
        description="client_address from x-forwarded-for, this many trusted proxies from the "
        "right (0 = Envoy's source.address attribute)",
    )

    @model_validator(mode="after")
    def _unique(self) -> RateLimitConfig:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate rule names: {dupes}")
        if self.grant_ahead.enabled and not self.redis_pipeline:
            raise ValueError("grant_ahead needs redis_pipeline: true (answers in send order)")
        return self
