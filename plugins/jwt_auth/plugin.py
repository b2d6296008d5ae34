"""``jwt_auth``: verify JWTs in front of every route (runs first, priority 1000).

Per request (request headers only): match the route rule on every reading of the path (the
strictest wins), strip claim headers the client may have forged, find exactly one token,
check its shape, look it up in the cache of validated tokens, otherwise verify it (claims
first, then the signature with a key pinned to its algorithm), check authorisation claims, and
pass the verified claims on in the request context and, if configured, in headers.

Outcomes: 401 (missing/invalid token, with an RFC 6750 challenge), 403 (authenticated but not
allowed), 400 (malformed path), or continue. Bad input never raises and never gives a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from extproc.context import AUTH_CLAIMS, AUTH_SUBJECT, PluginContext
from extproc.observability.metrics import BoundCounter, BoundHistogram
from extproc.observability.saturation import InFlight, loop_saturation, streams_in_flight
from extproc.plugin import (
    CONTINUE,
    Continue,
    HealthState,
    HealthStatus,
    Needs,
    Plugin,
    Reject,
    RequestEvent,
    RequestHeaders,
    Result,
)

from .cache import ENTRY_FORMAT, TokenCache, VerifiedToken, freeze, token_digest
from .claims import ClaimsPolicy, check_claims, check_times, missing_values
from .config import JwtAuthConfig, ProviderConfig
from .extract import (
    Extractor,
    FoundToken,
    ParsedToken,
    TokenError,
    check_token_shape,
    parse_token,
)
from .jwks import JwksClient, KeySet
from .rules import BadPathError, CompiledRule, RuleSet

__all__ = ["JwtAuthPlugin"]

MAX_KID_LENGTH = 256
#: signature lengths in bytes, checked before any crypto
_SIG_LEN = {"ES256": 64, "ES384": 96, "ES512": 132, "EdDSA": 64}
#: header parameters we understand; anything listed in ``crit`` is refused (RFC 7515 4.1.11)
_REFUSED_HEADERS = ("crit", "b64", "enc", "zip")
#: the token cache's Redis tier is read only while at most this many streams (this one
#: included) are in flight in the worker: with others, the read's answer waits behind their
#: work and whatever arrives meanwhile (each up to ~0.5 ms of CPU on a slow machine), while
#: verifying the token here takes tens of µs
_L2_MAX_IN_FLIGHT = 1


class _Provider:
    """A provider's compiled, per-generation state."""

    __slots__ = ("cache_prefix", "config", "jwks", "name", "policy")

    def __init__(self, name: str, config: ProviderConfig, jwks: JwksClient) -> None:
        self.name = name
        self.config = config
        self.jwks = jwks
        self.policy = ClaimsPolicy(
            issuer=config.issuer,
            audiences=frozenset(config.audiences),
            leeway=float(config.clock_skew_s),
            require_exp=config.require_exp,
            max_lifetime=None if config.max_lifetime_s is None else float(config.max_lifetime_s),
            require_email_verified=config.require_email_verified,
        )
        fingerprint = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
        self.cache_prefix = f"{name}:{ENTRY_FORMAT}:{fingerprint}:"


def _header_value(value: Any) -> str | None:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if any(c in text for c in "\r\n\x00") or len(text) > 4096:
        return None
    return text


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class JwtAuthPlugin(Plugin):
    name = "jwt_auth"
    version = "1.0.0"
    priority = 1000
    cancellation_safe = True  # our hooks end promptly when cancelled (tested)
    needs = Needs(request_headers=True)
    Config: ClassVar[type[JwtAuthConfig]] = JwtAuthConfig

    config: JwtAuthConfig

    def __init__(self, config: JwtAuthConfig) -> None:
        super().__init__(config)
        self._previous: JwtAuthPlugin | None = None
        self._providers: dict[str, _Provider] = {}
        self.rules = RuleSet(config.rules, config.default_requirement(), list(config.providers))
        self.extractor = Extractor(
            config.providers,
            max_token_bytes=config.max_token_bytes,
            max_header_bytes=config.max_header_bytes,
        )
        strip: set[str] = set()
        for p in config.providers.values():
            strip |= p.output_headers()
        self._strip = tuple(sorted(strip))
        self._continue_anonymous: Result = (
            Continue(remove_headers=self._strip) if strip else CONTINUE
        )
        realm = f'realm="{config.realm}", ' if config.realm else ""
        self._challenge_missing = f'Bearer realm="{config.realm}"' if config.realm else "Bearer"
        self._challenge_invalid = f'Bearer {realm}error="invalid_token"'
        self._challenge_forbidden = f'Bearer {realm}error="insufficient_scope"'
        self.token_cache: TokenCache | None = None
        #: background re-verifications running, by cache key (one per key at a time)
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        #: how saturated the worker is (0 - 1): the Redis tier is skipped when it is
        self._saturation: Callable[[], float] = lambda: 0.0
        self._in_flight = InFlight()

    # ------------------------------------------------------------------ lifecycle

    def take_over(self, previous: Plugin) -> None:
        if isinstance(previous, JwtAuthPlugin):
            self._previous = previous

    async def initialize(self, context: PluginContext) -> None:
        self.ctx = context
        self._wall = context.wall_clock
        self._saturation = loop_saturation()
        self._in_flight = streams_in_flight()
        self._log = context.logger
        m = context.metrics
        hits = m.counter("token_cache_total", "Validated-token cache lookups", ["result"])
        self._m_hit: BoundCounter = hits.labels("hit")
        self._m_miss: BoundCounter = hits.labels("miss")
        #: background re-verifications of tokens in use near their entry's end (not lookups)
        self._m_refresh: BoundCounter = hits.labels("refresh")
        self._m_failures = m.counter(
            "failures_total", "Requests refused or passed unauthenticated, by reason", ["reason"]
        )
        validation = m.histogram(
            "validation_seconds", "Full token verification time (cache misses)", ["provider"]
        )
        self._m_forbidden: BoundCounter = self._m_failures.labels("forbidden")
        fetches = m.counter(
            "jwks_fetches_total",
            "JWKS fetches by kind and outcome",
            ["provider", "kind", "outcome"],
        )
        m.gauge(
            "jwks_key_set_age_seconds",
            "Age of each provider's key set",
            self._ages,
            ["provider"],
        )
        prev = self._previous
        self._m_validation: dict[str, BoundHistogram] = {}
        for name, pconf in self.config.providers.items():
            inherited: KeySet | None = None
            if prev is not None and name in prev._providers:
                old = prev._providers[name]
                if old.config == pconf:
                    inherited = old.jwks.key_set

            def on_fetch(kind: str, outcome: str, _n: str = name) -> None:
                fetches.labels(_n, kind, outcome).inc()

            def on_change(ks: KeySet, _n: str = name) -> None:
                if self.token_cache is not None:
                    self.token_cache.drop_keys_not_in(_n, ks.thumbprints)

            client = JwksClient(
                name,
                pconf,
                context.http,
                clock=context.clock,
                logger=context.logger,
                on_fetch=on_fetch,
                on_change=on_change,
                inherited=inherited,
            )
            self._providers[name] = _Provider(name, pconf, client)
            self._m_validation[name] = validation.labels(name)

        tc = self.config.token_cache
        if tc.enabled:
            l1 = None
            if prev is not None and prev.token_cache is not None and prev.config.token_cache == tc:
                l1 = prev.token_cache.l1
            self.token_cache = TokenCache(
                tc, clock=context.clock, rebuild=self._rebuild, redis=context.redis, l1=l1
            )
        self._previous = None  # do not keep the old generation alive

        for provider in self._providers.values():
            await provider.jwks.start()

    async def shutdown(self) -> None:
        refreshing = list(self._refreshing.values())
        for task in refreshing:
            task.cancel()  # the entry stays as it is, and expires (or a successor refreshes it)
        await asyncio.gather(*refreshing, return_exceptions=True)
        for provider in self._providers.values():
            await provider.jwks.close()
        if self.token_cache is not None:
            await self.token_cache.aclose()

    async def health_check(self) -> HealthStatus:
        worst = HealthStatus.healthy()
        details: list[str] = []
        info: dict[str, Any] = {}
        for provider in self._providers.values():
            status = provider.jwks.health()
            age = provider.jwks.age()
            info[provider.name] = {"state": status.state.value, "key_set_age_s": age}
            if status.state is not HealthState.HEALTHY:
                details.append(status.detail)
            if status.state is HealthState.UNHEALTHY or (
                status.state is HealthState.DEGRADED and worst.state is HealthState.HEALTHY
            ):
                worst = status
        if worst.state is HealthState.HEALTHY:
            return HealthStatus(HealthState.HEALTHY, "", info)
        return HealthStatus(worst.state, "; ".join(details), info)

    def metrics(self) -> Mapping[str, float]:
        out: dict[str, float] = {}
        for name, provider in self._providers.items():
            age = provider.jwks.age()
            if age is not None:
                out[f"jwks_age_seconds.{name}"] = age
        if self.token_cache is not None:
            out["token_cache_entries"] = float(len(self.token_cache.l1))
        return out

    def _ages(self) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for name, provider in self._providers.items():
            age = provider.jwks.age()
            if age is not None:
                out.append(((name,), age))
        return out

    # ------------------------------------------------------------------ requests

    async def on_request(self, event: RequestEvent) -> Result:
        if not isinstance(event, RequestHeaders):
            return CONTINUE
        try:
            rule = self.rules.match(event.request.method, event.request.route_path)
        except BadPathError:
            self._m_failures.labels("bad_path").inc()
            return Reject(400, "bad_request", "malformed request path", details="jwt_bad_path")
        try:
            return await self._authenticate(event, rule)
        except TokenError as exc:
            return self._failed(rule, exc)
        except Exception:  # a bug of ours must not become a 5xx or let a request through
            self._log.exception("jwt_auth: unexpected error")
            return self._failed(rule, TokenError("error", "token could not be verified"))

    def _failed(self, rule: CompiledRule, exc: TokenError) -> Result:
        self._m_failures.labels(exc.reason).inc()
        if rule.requirement.allow_missing_or_failed:
            return self._continue_anonymous
        return Reject(
            401,
            "unauthorized",
            exc.message,
            headers={"www-authenticate": self._challenge_invalid},
            details=f"jwt_{exc.reason}",
        )

    async def _authenticate(self, event: RequestHeaders, rule: CompiledRule) -> Result:
        found = self.extractor.extract(event.request, rule.provider_set)
        if found is None:
            if rule.level >= 3:
                self._m_failures.labels("missing").inc()
                return Reject(
                    401,
                    "unauthorized",
                    "a bearer token is required",
                    headers={"www-authenticate": self._challenge_missing},
                    details="jwt_missing",
                )
            return self._continue_anonymous
        verified = await self._verify(found, rule)

        if rule.has_authz:
            claims = verified.claims
            cfg = self.config
            if (
                missing_values(claims, cfg.scope_claim, rule.scopes)
                or missing_values(claims, cfg.roles_claim, rule.roles)
                or missing_values(claims, cfg.groups_claim, rule.groups)
            ):
                self._m_forbidden.inc()
                return Reject(
                    403,
                    "forbidden",
                    "the token does not grant access to this resource",
                    headers={"www-authenticate": self._challenge_forbidden},
                    details="jwt_insufficient_scope",
                )

        event.context[AUTH_CLAIMS] = verified.claims
        if verified.subject is not None:
            event.context[AUTH_SUBJECT] = verified.subject
        provider = self._providers[verified.provider]
        if not provider.config.forward and found.headers:
            remove = self._strip + tuple(sorted(found.headers))
            return Continue(set_headers=verified.headers, remove_headers=remove)
        result = verified.result
        # built by this generation: an entry inherited over a reload (L1 is kept when the
        # cache settings stay) may predate a change of the headers stripped from requests
        if result is not None and result.remove_headers is self._strip:
            return result
        return self._answer(verified.headers)

    def _answer(self, headers: Mapping[str, str]) -> Continue:
        """Set the token's claim headers, strip every provider's (forged) ones."""
        if not headers and not self._strip:
            return CONTINUE  # its remove_headers is () too: the identity check above holds
        return Continue(set_headers=headers, remove_headers=self._strip)

    async def _verify(self, found: FoundToken, rule: CompiledRule) -> VerifiedToken:
        candidates = [self._providers[n] for n in rule.providers if n in found.providers]
        if not candidates:  # cannot happen: extraction only looks at the rule's providers
            raise TokenError("missing", "a bearer token is required")
        cache = self.token_cache
        now = self._wall()
        digest = ""
        shaped = False  # a cached token passed the shape check when it was verified
        if cache is not None:
            digest = token_digest(found.token)
            for p in candidates:
                key = p.cache_prefix + digest
                entry, due = cache.lookup(key, now)
                # not on a saturated worker, nor beside other streams (a burst the meter has
                # not seen yet): the read would wait behind all of them (past the hook's
                # deadline: a 503 for a valid token) and costs more CPU than verifying the
                # token here (tens of µs)
                if (
                    entry is None
                    and cache.has_l2
                    and self._in_flight.count <= _L2_MAX_IN_FLIGHT
                    and not self._saturation()
                ):
                    if not shaped:  # garbage costs no Redis read
                        check_token_shape(found.token, self.extractor.max_token_bytes)
                        shaped = True
                    entry = await cache.get_remote(key)
                if entry is not None and self._still_valid(entry, p, now):
                    self._m_hit.inc()
                    if due and key not in self._refreshing:
                        self._refresh_soon(found.token, p, key)
                    return entry
            self._m_miss.inc()

        if not shaped:
            check_token_shape(found.token, self.extractor.max_token_bytes)
        started = time.perf_counter()
        parsed = parse_token(found.token)
        iss = parsed.payload.get("iss")
        matching = [p for p in candidates if p.config.issuer == iss]
        if not matching:
            raise TokenError("wrong_issuer", "token issuer is not accepted")
        first_error: TokenError | None = None
        for p in matching:
            try:
                entry = await self._verify_with(p, parsed, now)
            except TokenError as exc:
                first_error = first_error or exc
                continue
            self._m_validation[p.name].observe(time.perf_counter() - started)
            if cache is not None:
                cache.put(p.cache_prefix + digest, entry, now)
            return entry
        assert first_error is not None
        raise first_error

    def _refresh_soon(self, token: str, p: _Provider, key: str) -> None:
        """Verify ``token`` again after this request has its answer, and replace its entry.

        The task runs in a context of its own: it is not part of the request that noticed the
        entry was due, so that request's deadline (and span) must not bound or trace it; the
        JWKS client and the cache bound their own calls."""
        task = asyncio.get_running_loop().create_task(
            self._refresh(token, p, key), context=contextvars.Context()
        )
        self._refreshing[key] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key, None))

    async def _refresh(self, token: str, p: _Provider, key: str) -> None:
        cache = self.token_cache
        assert cache is not None
        now = self._wall()
        started = time.perf_counter()
        try:
            entry = await self._verify_with(p, parse_token(token), now)
        except TokenError:
            # no longer valid though its key is still in the set (the key is now pinned to
            # another algorithm ...): the next request carrying it verifies it itself and
            # gets the reason. The Redis copy goes too, or this worker (and every other) would
            # read it back on its next miss, and the key check of a hit would pass it
            await cache.drop(key)
            return
        except Exception:  # a bug of ours: the entry expires as it would have
            self._log.exception("jwt_auth: background re-verification failed")
            return
        self._m_validation[p.name].observe(time.perf_counter() - started)
        self._m_refresh.inc()
        cache.put(key, entry, now)

    def _still_valid(self, entry: VerifiedToken, p: _Provider, now: float) -> bool:
        """A cache hit still answers to the clock and to the key set."""
        if entry.provider != p.name:
            return False
        check_times(entry.exp, entry.nbf, now, p.policy.leeway)  # raises expired/not yet
        ks = p.jwks.key_set
        # the key that verified it, by its material: new material under the same kid (an
        # identity provider that reuses kids) is another key, and the entry is refused
        return ks is not None and entry.thumbprint in ks.thumbprints

    async def _verify_with(self, p: _Provider, parsed: ParsedToken, now: float) -> VerifiedToken:
        header = parsed.header
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in p.config.algorithms:
            raise TokenError("bad_alg", "token algorithm is not accepted")
        for name in _REFUSED_HEADERS:
            if name in header:
                raise TokenError("unsupported_header", f"token header {name} is not supported")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
            raise TokenError("malformed", "token kid is malformed")

        check_claims(parsed.payload, p.policy, now)  # cheap, and before any crypto or fetch

        ks = p.jwks.key_set
        if ks is None:
            ks = await p.jwks.refetch_for_kid(kid or "")
            if ks is None:
                raise TokenError("jwks_unavailable", "signing keys are unavailable")
        if kid is not None:
            key = ks.find(kid, alg)
            if key is None:
                if ks.has_kid(kid):
                    raise TokenError("bad_alg", "token algorithm does not match its key")
                refreshed = await p.jwks.refetch_for_kid(kid)
                key = refreshed.find(kid, alg) if refreshed is not None else None
                if key is None or refreshed is None:
                    raise TokenError("unknown_kid", "token signing key is unknown")
                ks = refreshed
            keys = [(ks.prints[kid], key)]
        else:
            keys = ks.for_alg(alg)
            if not keys:
                raise TokenError("unknown_kid", "token signing key is unknown")

        sig = parsed.signature
        expected = _SIG_LEN.get(alg)
        for thumbprint, key in keys:
            size = expected if expected is not None else (key.key.key_size + 7) // 8
            if len(sig) != size:
                continue
            try:
                if key.Algorithm.verify(parsed.signing_input, key.key, sig):
                    return self._build(p, kid, thumbprint, parsed.payload)
            except Exception:  # malformed signature bytes: a bad signature, not a crash
                continue
        raise TokenError("bad_signature", "token signature is invalid")

    def _build(
        self, p: _Provider, kid: str | None, thumbprint: str, payload: dict[str, Any]
    ) -> VerifiedToken:
        claims = freeze(payload)
        headers: dict[str, str] = {}
        for mapping in p.config.claim_to_headers:
            value = _claim(payload, mapping.claim)
            if value is not None:
                text = _header_value(value)
                if text is not None:
                    headers[mapping.header] = text
        if p.config.payload_header:
            raw = json.dumps(payload, separators=(",", ":")).encode()
            headers[p.config.payload_header] = (
                base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
            )
        exp = payload.get("exp")
        nbf = payload.get("nbf")
        sub = payload.get("sub")
        frozen = freeze(headers)
        return VerifiedToken(
            provider=p.name,
            kid=kid,
            thumbprint=thumbprint,
            claims=claims,
            exp=float(exp) if isinstance(exp, int | float) else None,
            nbf=float(nbf) if isinstance(nbf, int | float) else None,
            subject=sub if isinstance(sub, str) else None,
            headers=frozen,
            result=self._answer(frozen),
        )

    def _rebuild(
        self, provider: str, kid: str | None, thumbprint: str, claims: dict[str, Any]
    ) -> VerifiedToken | None:
        """An L2 (Redis) entry back into a :class:`VerifiedToken`; the provider's claim checks
        run again, so an entry written under looser rules is refused."""
        p = self._providers.get(provider)
        if p is None or not isinstance(claims, dict):
            return None
        try:
            check_claims(claims, p.policy, self._wall())
        except TokenError:
            return None
        return self._build(p, kid, thumbprint, claims)
