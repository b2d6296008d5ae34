"""JWKS: parsing key sets, and the client that keeps one fresh. The plugin's only I/O.

* The key set is fetched (and parsed) during ``initialize``; failing that, the plugin starts
  not ready (or with the key set inherited from the previous generation) and keeps trying in
  the background with exponential backoff.
* A background task refreshes the key set before it goes stale; a failed, slow or garbage
  response keeps the last good key set (health turns DEGRADED with its age).
* An unknown ``kid`` triggers one refetch: single-flight (concurrent requests share it),
  at most one per ``refetch_min_interval_s``, and kids still unknown afterwards go into a
  bounded negative cache, so a flood of random kids costs no extra fetches.
* Only the configured URI is ever fetched: nothing in a token (``jku``, ``x5u``...) is used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWK

from extproc.context import time_left
from extproc.plugin import HealthStatus
from extproc.services.http import BreakerOpenError, HttpClient, HttpError

from .config import ProviderConfig

__all__ = ["JwksClient", "JwksError", "KeySet", "jwk_thumbprint", "parse_jwks"]

_RSA_ALGS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_CURVES: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
MIN_RSA_BITS: Final = 2048
NEGATIVE_CACHE_SIZE: Final = 4096

Logger = logging.LoggerAdapter[logging.Logger] | logging.Logger


class JwksError(Exception):
    """A JWKS document that cannot be used (not JSON, no keys, no usable key)."""


#: the members of each key type that a thumbprint covers (RFC 7638 section 3.2, RFC 8037)
_THUMBPRINT_MEMBERS: Final = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (base64url): its key material alone,
    whatever its ``kid``, ``alg`` or ``use``. Raises ``ValueError`` for a key type or member
    it does not cover."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError("no thumbprint for this key type")
    required = {name: jwk.get(name) for name in members}
    if not all(isinstance(v, str) for v in required.values()):
        raise ValueError("key member missing or not a string")
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class KeySet:
    """Verification keys by ``kid`` then algorithm; each key is pinned to its algorithm.

    ``prints`` has each ``kid``'s key thumbprint (:func:`jwk_thumbprint`), ``thumbprints``
    all of them: a validated token remembers the thumbprint of the key that verified it, so
    new key material under an old ``kid`` is a different key to the token cache."""

    by_kid: Mapping[str | None, Mapping[str, PyJWK]]
    fetched_at: float
    prints: Mapping[str | None, str] = field(default_factory=dict)
    #: ``prints``' values, for the cache's per-hit membership check (derived, never passed)
    thumbprints: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thumbprints", frozenset(self.prints.values()))

    def find(self, kid: str, alg: str) -> PyJWK | None:
        keys = self.by_kid.get(kid)
        return None if keys is None else keys.get(alg)

    def has_kid(self, kid: str | None) -> bool:
        return kid in self.by_kid

    def for_alg(self, alg: str) -> list[tuple[str, PyJWK]]:
        """Every key usable with ``alg`` (for tokens without a ``kid``), with its thumbprint."""
        return [(self.prints[k], keys[alg]) for k, keys in self.by_kid.items() if alg in keys]


def _key_algorithms(jwk: Mapping[str, Any], allowed: Sequence[str]) -> list[str]:
    kty = jwk.get("kty")
    declared = jwk.get("alg")
    if kty == "RSA":
        natural = [a for a in _RSA_ALGS if a in allowed]
    elif kty == "EC":
        alg = _EC_CURVES.get(jwk.get("crv", ""))
        natural = [alg] if alg and alg in allowed else []
    elif kty == "OKP":
        natural = ["EdDSA"] if jwk.get("crv") == "Ed25519" and "EdDSA" in allowed else []
    else:  # "oct" (HMAC secrets) and anything else: never
        return []
    if declared is not None:
        return [declared] if declared in natural else []
    return natural


def parse_jwks(
    document: Any,
    allowed: Sequence[str],
    *,
    fetched_at: float,
    max_keys: int = 64,
    logger: Logger | None = None,
) -> KeySet:
    """Build a :class:`KeySet` from a decoded JWKS document. Keys that are not for signatures,
    use an algorithm not allowed, are symmetric, malformed or too short are skipped; a
    document with no usable key raises :class:`JwksError`."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document")
    by_kid: dict[str | None, dict[str, PyJWK]] = {}
    prints: dict[str | None, str] = {}
    for jwk in document["keys"][: max_keys * 4]:
        if len(by_kid) >= max_keys:
            break
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        if kid in by_kid:
            if logger:
                logger.warning("jwks: duplicate kid %r skipped", kid)
            continue
        keys: dict[str, PyJWK] = {}
        for alg in _key_algorithms(jwk, allowed):
            try:
                key = PyJWK(jwk, algorithm=alg)
            except Exception:  # malformed key material: skip the key, keep the set
                if logger:
                    logger.warning("jwks: key %r is malformed, skipped", kid)
                break
            if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
                if logger:
                    logger.warning("jwks: RSA key %r is shorter than %d bits", kid, MIN_RSA_BITS)
                break
            keys[alg] = key
        if keys:
            try:
                prints[kid] = jwk_thumbprint(jwk)
            except ValueError:  # PyJWK took it, so this should not happen: skip the key
                if logger:
                    logger.warning("jwks: key %r is malformed, skipped", kid)
                continue
            by_kid[kid] = keys
    if not by_kid:
        raise JwksError("no usable signing key")
    return KeySet(by_kid, fetched_at, prints)


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise JwksError("response is not JSON") from None


FetchHook = Callable[[str, str], None]  # (kind, outcome)


@dataclass(slots=True)
class _Negative:
    """Kids recently proven unknown, each until a deadline (bounded, LRU)."""

    size: int
    entries: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def contains(self, kid: str, now: float) -> bool:
        until = self.entries.get(kid)
        if until is None:
            return False
        if now >= until:
            del self.entries[kid]
            return False
        return True

    def add(self, kid: str, until: float) -> None:
        self.entries[kid] = until
        self.entries.move_to_end(kid)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class JwksClient:
    """Keeps one provider's key set. ``key_set`` is read on the hot path without awaiting."""

    def __init__(
        self,
        provider_name: str,
        config: ProviderConfig,
        http: HttpClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: Logger | None = None,
        on_fetch: FetchHook | None = None,
        on_change: Callable[[KeySet], None] | None = None,
        inherited: KeySet | None = None,
    ) -> None:
        self.name = provider_name
        self.config = config
        self._http = http
        self._clock = clock
        self._log: Logger = logger or logging.getLogger("extproc.plugin.jwt_auth")
        self._on_fetch = on_fetch
        self._on_change = on_change
        self.key_set: KeySet | None = inherited
        self.inherited = inherited is not None
        self.ready = asyncio.Event()
        if inherited is not None:
            self.ready.set()
        self.last_error: str | None = None
        self.last_ok: bool = inherited is not None
        self.fetches = 0
        self.refetches = 0
        self._inflight: asyncio.Task[bool] | None = None
        self._last_refetch = -math.inf
        self._negative = _Negative(NEGATIVE_CACHE_SIZE)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    @property
    def remote(self) -> bool:
        return self.config.jwks.uri is not None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load a static key set (errors are configuration errors and raise) or warm a remote
        one (errors never raise: the client starts not ready and keeps trying)."""
        if not self.remote:
            self._install(self._load_static())
            self.last_ok = True
            return
        await self._fetch_shared("initial")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"jwks-refresh-{self.name}", context=contextvars.Context()
        )

    async def close(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._task = None

    async def refresh(self) -> bool:
        """Fetch now (joining a fetch in flight); ``True`` when the key set was replaced."""
        if not self.remote:
            return False
        return await asyncio.shield(self._fetch_shared("refresh"))

    def refresh_now(self) -> None:
        """Wake the background task for an immediate refresh (tests, admin)."""
        self._wake.set()

    def _load_static(self) -> KeySet:
        jwks = self.config.jwks
        if jwks.file is not None:
            document = _decode(Path(jwks.file).read_bytes())
        elif isinstance(jwks.inline, str):
            document = _decode(jwks.inline.encode())
        else:
            document = jwks.inline
        return parse_jwks(
            document,
            self.config.algorithms,
            fetched_at=self._clock(),
            max_keys=self.config.max_keys,
            logger=self._log,
        )

    # ------------------------------------------------------------------ fetching

    def _fetch_shared(self, kind: str) -> asyncio.Task[bool]:
        """The running fetch, or a new one. Runs in a fresh context so that the deadline of the
        request that triggered it does not cut the fetch short for the others."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(
                self._fetch(kind), name=f"jwks-fetch-{self.name}", context=contextvars.Context()
            )
        return self._inflight

    async def _fetch(self, kind: str) -> bool:
        uri = self.config.jwks.uri
        assert uri is not None
        self.fetches += 1
        try:
            response = await self._http.get(
                uri,
                timeout_s=self.config.timeout_ms / 1000,
                max_bytes=self.config.max_jwks_bytes,
                retries=self.config.retries,
                headers={"accept": "application/json"},
            )
            if response.status != 200:
                raise JwksError(f"HTTP {response.status}")
            key_set = parse_jwks(
                _decode(response.body),
                self.config.algorithms,
                fetched_at=self._clock(),
                max_keys=self.config.max_keys,
                logger=self._log,
            )
        except (HttpError, BreakerOpenError, JwksError) as exc:
            self.last_ok = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._failures += 1
            self._report(kind, "error")
            self._log.warning("jwks %s fetch for %s failed: %s", kind, self.name, self.last_error)
            return False
        self.last_ok = True
        self.last_error = None
        self._failures = 0
        self.inherited = False
        self._install(key_set)
        self._report(kind, "ok")
        return True

    def _install(self, key_set: KeySet) -> None:
        previous = self.key_set
        self.key_set = key_set
        self.ready.set()
        if (
            previous is not None
            and previous.prints != key_set.prints
            and self._on_change is not None
        ):
            self._on_change(key_set)

    def _report(self, kind: str, outcome: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(kind, outcome)

    def _next_delay(self) -> float:
        cfg = self.config
        if self.key_set is not None and self.last_ok:
            age = self._clock() - self.key_set.fetched_at
            return max(0.0, cfg.cache_duration_s * 0.8 - age)
        backoff = cfg.fetch_retry_min_s * (2 ** min(self._failures - 1, 16))
        return float(min(cfg.fetch_retry_max_s, max(cfg.fetch_retry_min_s, backoff)))

    async def _run(self) -> None:
        while True:
            delay = self._next_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            try:
                await self._fetch_shared("refresh")
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the refresher die
                self._log.exception("jwks refresh for %s crashed", self.name)

    # ------------------------------------------------------------------ unknown kid

    async def refetch_for_kid(self, kid: str) -> KeySet | None:
        """Called on the request path for a ``kid`` not in the key set. Returns the key set if
        the kid is now known, ``None`` otherwise. Waits at most ``time_left()``."""
        if not self.remote:
            return None
        now = self._clock()
        if self._negative.contains(kid, now):
            return None
        interval = self.config.refetch_min_interval_s
        inflight = self._inflight is not None and not self._inflight.done()
        if not inflight:
            if now - self._last_refetch < interval:
                self._negative.add(kid, self._last_refetch + interval)
                return None
            self._last_refetch = now
            self.refetches += 1
            self._report("refetch", "started")
        task = self._fetch_shared("refetch")
        budget = min(time_left(), self.config.timeout_ms / 1000 * (1 + self.config.retries))
        try:
            await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            return None
        key_set = self.key_set
        if key_set is not None and key_set.has_kid(kid):
            return key_set
        self._negative.add(kid, self._clock() + interval)
        return None

    # ------------------------------------------------------------------ health

    def age(self) -> float | None:
        return None if self.key_set is None else self._clock() - self.key_set.fetched_at

    def health(self) -> HealthStatus:
        if self.key_set is None:
            why = self.last_error or "first fetch pending"
            return HealthStatus.unhealthy(f"jwks for provider {self.name} not loaded ({why})")
        if not self.remote:
            return HealthStatus.healthy()
        age = self.age() or 0.0
        if not self.last_ok or self.inherited or age > self.config.cache_duration_s:
            why = self.last_error or "inherited from the previous generation"
            return HealthStatus.degraded(
                f"jwks for provider {self.name}: serving a key set {age:.0f}s old ({why})"
            )
        return HealthStatus.healthy()
