"""The ``rate_limit`` plugin: descriptors from the request, exact counters in Redis (batched), an
in-process store when there is no Redis or as a fallback, and 429s with RateLimit headers.
Opt-in, ``grant_ahead``: keys far below their limits allowed from Redis' last answer without
waiting for the next (:mod:`plugins.rate_limit.ahead`).

Envoy side of ``headers.on_allow``: allowed requests carry their RateLimit values as dynamic
metadata in the namespace ``extproc.rate_limit`` (keys ``limit``, ``remaining``, ``reset``).
Turn them into response headers with the route's or listener's ``response_headers_to_add``::

    response_headers_to_add:
      - header: {key: RateLimit-Remaining,
                 value: "%DYNAMIC_METADATA(extproc.rate_limit:remaining)%"}
        keep_empty_value: false

(likewise ``RateLimit-Limit`` / ``RateLimit-Reset``). That costs no response-headers phase.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final

from extproc.context import (
    AUTH_CLAIMS,
    AUTH_SUBJECT,
    Clock,
    PluginContext,
    RequestContext,
    time_left,
)
from extproc.deadlines import loop_deadlines
from extproc.observability.saturation import cpu_pressure, streams_in_flight
from extproc.plugin import (
    CONTINUE,
    Continue,
    HealthStatus,
    Needs,
    Plugin,
    Reject,
    RequestEvent,
    RequestHeaders,
    Result,
)
from extproc.services.breaker import BreakerState, CircuitBreaker
from extproc.services.redis_pipe import PipeSettings, RedisPipe
from plugins.rate_limit.ahead import Ledger
from plugins.rate_limit.batcher import Batcher, BatcherClosedError, QueueFullError
from plugins.rate_limit.config import FailPolicy, MissingPart, RateLimitConfig, Rule, parse_part
from plugins.rate_limit.keys import (
    GRANTED,
    OVER_LIMIT,
    Hit,
    Outcome,
    client_address,
    encode_value,
    redis_key,
    route_matches,
)
from plugins.rate_limit.store import LocalStore, RedisStore, StoreUnavailableError

__all__ = ["RateLimitPlugin"]

_UNKNOWN: Final = "unknown"
#: how long initialize waits to open the Redis connection and load the script
_WARM_TIMEOUT_S: Final = 1.0
#: grant_ahead: about one round trip to a nearby Redis, beyond the gathering (``flush_ms``),
#: before a granted hit runs there; others' spending meanwhile is kept out of its grant
_ROUND_TRIP_S: Final = 0.002
_BATCH_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
#: seconds; the first bucket is "sent on the next loop tick" (no gathering, nothing in flight)
_WAIT_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
_BREAKER_VALUE: Final = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0,
                         BreakerState.OPEN: 2.0}  # fmt: skip

Part = tuple[str, str]
Limits = tuple[tuple[int, int], ...]  # (requests, period_ms)


@dataclass(frozen=True, slots=True)
class _Rule:
    """A rule compiled once per generation."""

    index: int
    rule: Rule
    parts: tuple[Part, ...]
    limits: Limits
    overrides: tuple[tuple[tuple[tuple[Part, str], ...], Limits | None], ...]  # None: unlimited
    gcra: bool
    shadow: bool


def _limits(items: Iterable[Any]) -> Limits:
    return tuple((lim.requests, lim.period) for lim in items)


def _compile(config: RateLimitConfig) -> tuple[_Rule, ...]:
    out = []
    for i, rule in enumerate(config.rules):
        overrides = tuple(
            (
                tuple((parse_part(spec), value) for spec, value in o.when.items()),
                None if o.unlimited else _limits(o.limits),
            )
            for o in rule.overrides
        )
        out.append(
            _Rule(
                index=i,
                rule=rule,
                parts=tuple(parse_part(p) for p in rule.key),
                limits=_limits(rule.limits),
                overrides=overrides,
                gcra=rule.algorithm.value == "gcra",
                shadow=rule.shadow or config.shadow,
            )
        )
    return tuple(out)


class _Parts:
    """Values of key parts for one request, each computed at most once."""

    __slots__ = ("_cache", "_event", "_hops")

    def __init__(self, event: RequestHeaders, hops: int) -> None:
        self._event = event
        self._hops = hops
        self._cache: dict[Part, str | None] = {}

    def get(self, part: Part) -> str | None:
        try:
            return self._cache[part]
        except KeyError:
            value = self._cache[part] = self._compute(part)
            return value

    def _compute(self, part: Part) -> str | None:
        kind, name = part
        request = self._event.request
        if kind == "header":
            return request.headers.get(name)
        if kind == "claim":
            claims = self._event.context.get(AUTH_CLAIMS)
            # exact types first: an ABC check costs several times more, on every request
            if not isinstance(claims, MappingProxyType | dict | Mapping):
                return None
            value = claims.get(name)
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value) if isinstance(value, str | int | float) else None
        if kind == "subject":
            subject = self._event.context.get(AUTH_SUBJECT)
            return subject if isinstance(subject, str) and subject else None
        if kind == "client_address":
            return client_address(
                request.attributes, request.headers.get_all("x-forwarded-for"), self._hops
            )
        if kind == "path":
            return request.route_path
        if kind == "method":
            return request.method
        return None


def _cause(exc: StoreUnavailableError) -> str:
    """What went wrong, for the log: the store's summary and the client's own message (host,
    port and the TLS or network error; redis-py's messages carry no credentials)."""
    cause = exc.__cause__
    text = f"{exc}: {cause}" if cause is not None and str(cause) else str(exc)
    return text[:300]


class _BadCostError(Exception):
    pass


class RateLimitPlugin(Plugin):
    """Rate limiting by descriptors; see :mod:`plugins.rate_limit.config`."""

    name: ClassVar[str] = "rate_limit"
    version: ClassVar[str] = "0.1.0"
    priority: ClassVar[int] = 900
    cancellation_safe: ClassVar[bool] = True  # awaits end promptly when cancelled (tested)
    needs: ClassVar[Needs] = Needs(request_headers=True)
    attributes: ClassVar[tuple[str, ...]] = ("source.address",)
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig) -> None:
        super().__init__(config)
        self.config: RateLimitConfig = config
        self._rules = _compile(config)
        self._local: LocalStore | None = None
        self._over: dict[str, tuple[float, int]] = {}  # key -> (until monotonic, limit)
        self._redis: RedisStore | None = None
        self._batcher: Batcher[Sequence[Hit], list[Outcome]] | None = None
        #: what this worker knows of its keys' counts in Redis (``grant_ahead`` only)
        self._ledger: Ledger | None = None
        #: requests allowed ahead whose hits have not been submitted yet (``flush_ms``)
        self._behind: list[tuple[list[Hit], list[_Rule]]] = []
        self._behind_timer: asyncio.TimerHandle | None = None
        self._flush_after = config.grant_ahead.flush_ms / 1000.0
        self._breaker: CircuitBreaker | None = None
        self._clock: Clock = time.monotonic  # replaced by the context's in initialize
        self._margin = config.fallback_margin_ms / 1000.0
        self._redis_timeout = config.redis_timeout_ms / 1000.0
        #: the last Redis call failed (an outage is logged when it starts and when it ends)
        self._store_down = False

    # ------------------------------------------------------------ lifecycle

    def take_over(self, previous: Plugin) -> None:
        if isinstance(previous, RateLimitPlugin):
            self._local = previous._local
            self._over = previous._over

    async def initialize(self, context: PluginContext) -> None:
        if context.redis is None and context.workers > 1:
            raise ValueError(
                f"rate_limit: {context.workers} workers without Redis would each count alone "
                "and allow every limit that many times; configure Redis or run one worker"
            )
        cfg = self.config
        self._clock = context.clock
        wall = context.wall_clock
        if self._local is None:
            self._local = LocalStore(lambda: int(wall() * 1000), cfg.local_max_keys)
        self._bind_metrics(context)
        if context.redis is not None:
            self._breaker = CircuitBreaker(
                "redis:rate_limit",
                failure_threshold=cfg.breaker.failure_threshold,
                reset_timeout=cfg.breaker.reset_timeout_s,
                clock=context.clock,
            )
            settings = PipeSettings.from_client(context.redis) if cfg.redis_pipeline else None
            self._redis = RedisStore(
                context.redis,
                self._breaker,
                on_round_trip=self._round_trip,
                pipe=RedisPipe(settings) if settings is not None else None,
            )
            store = self._redis
            logger = context.logger
            if cfg.grant_ahead.enabled:
                if not store.pipelined:
                    raise ValueError(
                        "rate_limit: grant_ahead needs the pipelined Redis connection, which "
                        "this Redis client's setup does not allow (a credential provider, a "
                        "Sentinel or blocking pool, or an option it does not know)"
                    )
                self._ledger = Ledger(
                    share=cfg.grant_ahead.share,
                    max_age=cfg.grant_ahead.max_age_ms / 1000.0,
                    max_keys=cfg.grant_ahead.max_keys,
                    clock=context.clock,
                    # the others' hits granted up to one gathering and round trip before an
                    # answer are not in it yet, and a hit granted now runs one later
                    lag=2 * (self._flush_after + _ROUND_TRIP_S),
                )
            ledger = self._ledger

            def noted(decided: list[list[Outcome]] | StoreUnavailableError) -> None:
                """An outage is logged once, when it starts (with its first cause) and ends."""
                if isinstance(decided, StoreUnavailableError):
                    if not self._store_down:
                        self._store_down = True
                        logger.warning(
                            "Redis unavailable: the rules apply their fail policy until it "
                            "answers again",
                            extra={"error": _cause(decided)},
                        )
                elif self._store_down:
                    self._store_down = False
                    logger.info("Redis answers again: the rules count in Redis")

            def budget(deadline: float) -> float:
                return min(deadline - asyncio.get_running_loop().time(), self._redis_timeout)

            async def send(batch: Sequence[Sequence[Hit]], deadline: float) -> list[list[Outcome]]:
                try:
                    decided = await store.acquire(batch, budget(deadline))
                except StoreUnavailableError as exc:
                    noted(exc)
                    raise
                finally:
                    # an awaiting task learns nothing: it may run after a later answer's
                    # callback (see ahead.py)
                    if ledger is not None:
                        ledger.forget(batch)
                noted(decided)
                return decided

            def start(
                batch: Sequence[Sequence[Hit]],
                deadline: float,
                done: Callable[[Sequence[list[Outcome]] | BaseException], None],
            ) -> bool:
                settled = False

                def decided(result: list[list[Outcome]] | StoreUnavailableError) -> None:
                    nonlocal settled
                    settled = True
                    if ledger is not None:
                        if isinstance(result, StoreUnavailableError):
                            ledger.forget(batch)
                        else:
                            ledger.learn(batch, result)
                    noted(result)
                    done(result)

                try:
                    return store.start(batch, budget(deadline), decided)
                except BaseException:
                    if ledger is not None and not settled:
                        ledger.forget(batch)
                    raise

            in_flight = streams_in_flight()
            self._batcher = Batcher(
                send,
                start=start if store.pipelined else None,
                max_batch=cfg.batch.max_batch,
                max_wait=cfg.batch.max_wait_ms / 1000.0,
                max_in_flight=cfg.batch.max_in_flight,
                in_flight_wait=cfg.batch.in_flight_wait_ms / 1000.0,
                max_queue=cfg.batch.max_queue,
                backlog=lambda: in_flight.count,
                pressure=cpu_pressure(),
                on_batch=self._batch_size.observe,
                on_wait=self._batch_wait.observe,
                on_drop=ledger.dropped if ledger is not None else None,
            )
            try:
                await store.warm(_WARM_TIMEOUT_S)
            except StoreUnavailableError as exc:
                self._store_down = True
                logger.warning(
                    "Redis unavailable at start: the rules apply their fail policy until it "
                    "answers",
                    extra={"error": _cause(exc)},
                )
        context.logger.info(
            "rate_limit ready: %d rules, store=%s%s",
            len(self._rules),
            ("redis (pipelined)" if self._redis.pipelined else "redis (pool)")
            if self._redis
            else "local",
            ", grant_ahead" if self._ledger is not None else "",
            # the batcher's CPU pressure: the sidecar's cgroup's own, else the machine's
            extra={"cpu_pressure_file": cpu_pressure().path} if self._batcher else {},
        )

    def _bind_metrics(self, context: PluginContext) -> None:
        m = context.metrics
        decisions = m.counter("decisions_total", "rate-limit decisions", ("rule", "result"))
        results = ("ok", "over_limit", "shadow_over_limit", "cached_over_limit")
        self._m_decisions = [
            {r: decisions.labels(rule.rule.name, r) for r in results} for rule in self._rules
        ]
        near = m.counter("near_limit_total", "granted with >= 80% of a limit used", ("rule",))
        self._m_near = [near.labels(r.rule.name) for r in self._rules]
        shadow = m.counter(
            "shadow_denials_total", "denials a shadow rule did not enforce", ("rule",)
        )
        self._m_shadow = [shadow.labels(r.rule.name) for r in self._rules]
        fallback = m.counter("fallback_total", "decisions by fail policy", ("rule", "policy"))
        self._m_fallback = [
            {p: fallback.labels(r.rule.name, p.value) for p in FailPolicy} for r in self._rules
        ]
        trips = m.counter("redis_round_trips_total", "Redis round trips", ("outcome",))
        self._m_trips = {o: trips.labels(o) for o in ("ok", "timeout", "error", "cancelled")}
        self._batch_size = m.histogram(
            "batch_size", "requests per Redis round trip", buckets=_BATCH_BUCKETS
        ).labels()
        self._batch_wait = m.histogram(
            "batch_wait_seconds",
            "time a request waited in the batcher before its Redis round trip was sent",
            buckets=_WAIT_BUCKETS,
        ).labels()
        self._m_dropped = m.counter("queue_full_total", "requests refused by a full queue").labels()
        ahead = m.counter(
            "granted_ahead_total", "allowed before Redis answered (grant_ahead)", ("rule",)
        )
        self._m_ahead = [ahead.labels(r.rule.name) for r in self._rules]
        ahead_over = m.counter(
            "granted_ahead_over_limit_total",
            "allowed before Redis answered, which then found the key over its limit",
            ("rule",),
        )
        self._m_ahead_over = [ahead_over.labels(r.rule.name) for r in self._rules]
        m.gauge("breaker_state", "Redis breaker: 0 closed, 1 half-open, 2 open", self._gauge)

    def _gauge(self) -> list[tuple[tuple[str, ...], float]]:
        if self._breaker is None:
            return []
        return [((), _BREAKER_VALUE[self._breaker.state])]

    def _round_trip(self, outcome: str, size: int) -> None:
        self._m_trips[outcome].inc()

    async def health_check(self) -> HealthStatus:
        if self._breaker is not None and self._breaker.state is not BreakerState.CLOSED:
            return HealthStatus.degraded("redis breaker open: rules apply their fail policy")
        return HealthStatus.healthy()

    def metrics(self) -> Mapping[str, float]:
        out = {"over_limit_cache_keys": float(len(self._over))}
        if self._ledger is not None:
            out["grant_ahead_keys"] = float(len(self._ledger))
        if self._local is not None:
            out["local_keys"] = float(len(self._local))
        if self._batcher is not None:
            out["queued"] = float(self._batcher.queued)
            out["in_flight"] = float(self._batcher.in_flight)
            out["queue_full"] = float(self._batcher.dropped)
            # how long batches gather with nothing in flight: 0 with spare CPU, up to
            # batch.max_wait_ms when the worker is saturated
            out["batch_window_ms"] = self._batcher.window * 1000.0
            # ... sized by the worker's saturation as last read, and kept only at an arrival
            # rate that fills it with company
            out["batch_saturation"] = self._batcher.saturation
            # ... and, when few streams are in flight in this worker, opened only while the
            # CPU is under pressure; with the loop not saturated at all, that pressure opens
            # and sizes the window itself (PSI share as last read, of the sidecar's cgroup,
            # else of the machine, at most every 50 ms, on requests: it is not read while a
            # saturated worker has a backlog, nor at an arrival rate that no window could
            # fill; 0 without PSI)
            out["cpu_pressure"] = cpu_pressure().share
            out["arrival_rate"] = self._batcher.arrival_rate
        return out

    async def shutdown(self) -> None:
        if self._behind:
            self._send_behind()
        if self._batcher is not None:
            await self._batcher.close(within=2 * self._redis_timeout + 0.1)
        if self._redis is not None:
            await self._redis.aclose()

    # ------------------------------------------------------------ hot path

    async def on_request(self, event: RequestEvent) -> Result:
        if not isinstance(event, RequestHeaders):
            return CONTINUE
        try:
            hits, owners = self._hits(event)
        except _BadCostError:
            return Reject(400, "bad_request", "invalid request cost", details="rate_limit:cost")
        if not hits:
            return CONTINUE
        started = self._clock()
        if self._over:
            cached = self._cached_denial(hits, owners, started)
            if cached is not None:
                return cached
        if self._ledger is not None:
            ahead = self._grant_ahead(hits, owners, started)
            if ahead is not None:
                return ahead
        outcomes = await self._decide(hits, owners)
        if isinstance(outcomes, Reject):
            return outcomes
        return self._result(hits, owners, outcomes, started, event.context)

    def _hits(self, event: RequestHeaders) -> tuple[list[Hit], list[_Rule]]:
        request = event.request
        path, method = request.route_path, request.method
        parts = _Parts(event, self.config.trusted_xff_hops)
        hits: list[Hit] = []
        owners: list[_Rule] = []
        prefix = self.config.key_prefix
        for r in self._rules:
            m = r.rule.match
            if not route_matches(
                path, method, prefix=m.path_prefix, exact=m.path_exact, methods=m.methods
            ):
                continue
            descriptor = []
            for part in r.parts:
                value = parts.get(part)
                if value is None:
                    if r.rule.on_missing is MissingPart.SKIP:
                        break
                    value = _UNKNOWN
                descriptor.append(encode_value(value))
            else:
                limits: Limits | None = r.limits
                for when, override in r.overrides:
                    if all(parts.get(p) == v for p, v in when):
                        limits = override
                        break
                if limits is None:
                    continue
                cost = self._cost(r.rule, event)
                for requests, period in limits:
                    key = redis_key(
                        prefix,
                        r.rule.name,
                        descriptor,
                        gcra=r.gcra,
                        limit=requests,
                        period_ms=period,
                    )
                    hits.append(Hit(key, r.gcra, requests, period, cost, r.shadow))
                    owners.append(r)
        return hits, owners

    @staticmethod
    def _cost(rule: Rule, event: RequestHeaders) -> int:
        if rule.cost_header is None:
            return rule.cost
        raw = event.request.headers.get(rule.cost_header)
        if raw is None:
            return rule.cost
        raw = raw.strip()
        if not raw.isdigit() or not 1 <= int(raw) <= rule.max_cost:
            raise _BadCostError
        return int(raw)

    def _cached_denial(self, hits: list[Hit], owners: list[_Rule], now: float) -> Reject | None:
        for h, owner in zip(hits, owners, strict=True):
            if h.shadow:
                continue
            entry = self._over.get(h.key)
            if entry is None:
                continue
            until, limit = entry
            if until <= now:
                del self._over[h.key]
                continue
            self._m_decisions[owner.index]["cached_over_limit"].inc()
            wait_ms = math.ceil((until - now) * 1000)
            return self._reject(owner, limit, 0, wait_ms, wait_ms)
        return None

    async def _decide(self, hits: list[Hit], owners: list[_Rule]) -> list[Outcome] | Reject:
        batcher = self._batcher
        assert self._local is not None
        if batcher is None:
            return self._local.decide((hits,))[0]
        budget = min(self._redis_timeout, time_left() - self._margin)
        assert self._breaker is not None
        if budget <= 0 or self._breaker.state is BreakerState.OPEN:
            return self._fallback(hits, owners)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        ledger = self._ledger
        if ledger is not None:
            if self._behind:  # the hits allowed ahead go first, in the same round trip
                self._send_behind()
            ledger.owe(hits)  # before submit: its round trip may settle within it
        try:
            future = batcher.submit(hits, deadline)
        except (QueueFullError, BatcherClosedError):
            if ledger is not None:
                ledger.dropped(hits)
            self._m_dropped.inc()
            return self._fallback(hits, owners)
        # our own deadline, before the chain's: the rules' fail policies answer, not the
        # plugin's (on the loop's one deadline timer, as the chain's; a future cancelled by it
        # is left out of its batch)
        try:
            with loop_deadlines(loop).timeout(deadline):
                return await future
        except (TimeoutError, StoreUnavailableError, BatcherClosedError):
            return self._fallback(hits, owners)

    def _grant_ahead(self, hits: list[Hit], owners: list[_Rule], now: float) -> Result | None:
        """Allow the request from what Redis last said (``grant_ahead``), its hits sent to be
        counted all the same (within ``flush_ms``, with the others allowed meanwhile);
        ``None``: it goes through Redis (a key unknown, too old or too near its limit, or the
        breaker not closed)."""
        ledger, batcher = self._ledger, self._batcher
        assert ledger is not None and batcher is not None and self._breaker is not None
        if self._breaker.state is not BreakerState.CLOSED:
            return None
        entries = ledger.grant(hits, now)
        if entries is None:
            return None
        self._behind.append((hits, owners))
        if len(self._behind) >= batcher.max_batch or not self._flush_after:
            self._send_behind()
        elif self._behind_timer is None:
            loop = asyncio.get_running_loop()
            self._behind_timer = loop.call_later(self._flush_after, self._send_behind)
        counted: set[int] = set()
        tightest: tuple[Hit, int, float] | None = None  # hit, remaining, reset_at
        for h, owner, k in zip(hits, owners, entries, strict=True):
            if owner.index not in counted:
                counted.add(owner.index)
                self._m_decisions[owner.index]["ok"].inc()
                self._m_ahead[owner.index].inc()
            if h.shadow:
                continue
            assert k.remaining is not None
            left = max(0, k.remaining - k.owed)
            if tightest is None or left < tightest[1]:
                tightest = (h, left, k.reset_at)
        if self.config.headers.on_allow and tightest is not None:
            h, left, reset_at = tightest
            return Continue(
                metadata={
                    "limit": h.limit,
                    "remaining": left,
                    "reset": math.ceil(max(0.0, reset_at - now)),
                }
            )
        return CONTINUE

    def _send_behind(self) -> None:
        """Submit the hits of the requests allowed ahead so far, together (an idle batcher
        sends what is submitted in one loop turn as one round trip). A hit the batcher
        refuses (full queue, closed) is never counted in Redis: an undercount, counted in
        ``queue_full_total``."""
        if self._behind_timer is not None:
            self._behind_timer.cancel()
            self._behind_timer = None
        behind, self._behind = self._behind, []
        batcher, ledger = self._batcher, self._ledger
        assert batcher is not None and ledger is not None
        deadline = asyncio.get_running_loop().time() + self._redis_timeout
        for hits, owners in behind:
            try:
                future = batcher.submit(hits, deadline)
            except (QueueFullError, BatcherClosedError):
                ledger.dropped(hits)
                self._m_dropped.inc()
                continue
            future.add_done_callback(functools.partial(self._answered_ahead, hits, owners))

    def _answered_ahead(
        self, hits: list[Hit], owners: list[_Rule], future: asyncio.Future[list[Outcome]]
    ) -> None:
        """Redis' answer for a request already allowed: count what it found over a limit,
        and let the over-limit cache deny the next ones. (A failed round trip was logged
        where it failed; the ledger forgot its keys.)"""
        if future.cancelled() or future.exception() is not None:
            return
        now = self._clock()
        for h, owner, o in zip(hits, owners, future.result(), strict=True):
            if o.status != OVER_LIMIT:
                continue
            if h.shadow:
                self._m_shadow[owner.index].inc()
                continue
            self._m_ahead_over[owner.index].inc()
            if o.block_ms and self.config.over_limit_cache:
                self._remember(h, now + o.block_ms / 1000.0)

    def _fallback(self, hits: list[Hit], owners: list[_Rule]) -> list[Outcome] | Reject:
        """The store could not decide in time: each rule's fail policy answers."""
        assert self._local is not None
        local: list[int] = []
        out: list[Outcome | None] = [None] * len(hits)
        counted: set[int] = set()
        for i, (h, owner) in enumerate(zip(hits, owners, strict=True)):
            policy = owner.rule.fail
            if owner.index not in counted:
                counted.add(owner.index)
                self._m_fallback[owner.index][policy].inc()
            if policy is FailPolicy.CLOSED and not h.shadow:
                return Reject(
                    owner.rule.fail_status,
                    "rate_limit_unavailable",
                    "rate limiting is unavailable",
                    details=f"rate_limit_unavailable:{owner.rule.name}",
                )
            if policy is FailPolicy.LOCAL:
                local.append(i)
            else:
                out[i] = Outcome(GRANTED, h.limit, 0, 0, 0)
        if local:
            decided = self._local.decide(([hits[i] for i in local],))[0]
            for i, o in zip(local, decided, strict=True):
                out[i] = o
        return [o for o in out if o is not None]

    def _result(
        self,
        hits: list[Hit],
        owners: list[_Rule],
        outcomes: list[Outcome],
        started: float,
        context: RequestContext,
    ) -> Result:
        worst: tuple[Hit, Outcome, _Rule] | None = None  # the denial with the longest wait
        tightest: tuple[Hit, Outcome] | None = None  # the enforced hit with the least left
        seen: dict[int, str] = {}
        for h, owner, o in zip(hits, owners, outcomes, strict=True):
            idx = owner.index
            if o.status == OVER_LIMIT:
                if h.shadow:
                    self._m_shadow[idx].inc()
                    seen[idx] = "shadow_over_limit"
                    continue
                seen[idx] = "over_limit"
                if worst is None or o.retry_ms > worst[1].retry_ms:
                    worst = (h, o, owner)
                if o.block_ms and self.config.over_limit_cache:
                    self._remember(h, started + o.block_ms / 1000.0)
                continue
            seen.setdefault(idx, "ok")
            if o.status == GRANTED and o.remaining * 5 <= h.limit:
                self._m_near[idx].inc()
            if not h.shadow and (tightest is None or o.remaining < tightest[1].remaining):
                tightest = (h, o)
        for idx, result in seen.items():
            self._m_decisions[idx][result].inc()
        if worst is not None:
            h, o, owner = worst
            return self._reject(owner, h.limit, o.remaining, o.reset_ms, o.retry_ms or o.reset_ms)
        if self.config.headers.on_allow and tightest is not None:
            h, o = tightest
            return Continue(
                metadata={
                    "limit": h.limit,
                    "remaining": o.remaining,
                    "reset": math.ceil(o.reset_ms / 1000),
                }
            )
        return CONTINUE

    def _remember(self, hit: Hit, until: float) -> None:
        over = self._over
        if hit.key not in over and len(over) >= self.config.over_limit_cache_size:
            now = self._clock()
            for k in [k for k, (u, _) in over.items() if u <= now]:
                del over[k]
            if len(over) >= self.config.over_limit_cache_size:
                return
        over[hit.key] = (until, hit.limit)

    def _reject(
        self, owner: _Rule, limit: int, remaining: int, reset_ms: int, retry_ms: int
    ) -> Reject:
        headers: dict[str, str] = {}
        hc = self.config.headers
        if hc.on_reject:
            reset = str(max(1, math.ceil(reset_ms / 1000)))
            headers["retry-after"] = str(max(1, math.ceil(retry_ms / 1000)))
            headers["ratelimit-limit"] = str(limit)
            headers["ratelimit-remaining"] = str(remaining)
            headers["ratelimit-reset"] = reset
            if hc.legacy_names:
                headers["x-ratelimit-limit"] = str(limit)
                headers["x-ratelimit-remaining"] = str(remaining)
                headers["x-ratelimit-reset"] = reset
        return Reject(
            429,
            "rate_limited",
            "Too many requests",
            headers=headers,
            details=f"rate_limited:{owner.rule.name}",
        )
