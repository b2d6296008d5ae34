"""``apikey``: authenticate requests by API key; the key's owner goes into the request context.

Without a key (or with an unknown one) the client gets a JSON 401 and the upstream is never
reached. A known key sets ``apikey.owner`` (and ``auth.subject``) in the request context, where
later plugins - rate limiting first - find it.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Final

from extproc.context import AUTH_SUBJECT, PluginContext, time_left
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
from redis.exceptions import RedisError

from extproc_apikey.config import ApiKeyConfig, hash_key

__all__ = ["OWNER_KEY", "ApiKeyPlugin"]

#: the request-context key this plugin sets to the key's owner
OWNER_KEY: Final = "apikey.owner"


class KeyStoreUnavailableError(Exception):
    """Redis did not answer in time (or failed) and the config says to refuse then."""


class ApiKeyPlugin(Plugin):
    name = "apikey"
    version = "1.0.0"
    api_version = "1"
    priority = 1010  # authentication runs first: before jwt_auth (1000) and rate_limit (900)
    Config = ApiKeyConfig
    needs: ClassVar[Needs] = Needs(request_headers=True)

    config: ApiKeyConfig

    async def initialize(self, context: PluginContext) -> None:
        self._static = {k.sha256: k.owner for k in self.config.keys}
        self._redis = context.redis
        self._cache = context.cache
        self._log = context.logger
        decisions = context.metrics.counter("decisions_total", "API key checks", ("result",))
        self._count = {r: decisions.labels(r) for r in ("ok", "missing", "invalid", "error")}
        self._challenge = {"www-authenticate": f'ApiKey header="{self.config.header}"'}
        self._redis_failures = 0

    async def on_request(self, event: RequestEvent) -> Result:
        if not isinstance(event, RequestHeaders):
            return CONTINUE
        if event.request.route_path.startswith(self.config.anonymous_prefixes):
            return CONTINUE
        presented = event.headers.get(self.config.header)
        if not presented:
            self._count["missing"].inc()
            return Reject(401, "unauthorized", "An API key is required.", headers=self._challenge)
        try:
            owner = await self._owner(hash_key(presented))
        except KeyStoreUnavailableError:
            self._count["error"].inc()
            return Reject(503, "unavailable", "The API key could not be checked.")
        if owner is None:
            self._count["invalid"].inc()
            return Reject(401, "unauthorized", "The API key is not valid.", headers=self._challenge)
        self._count["ok"].inc()
        event.context[OWNER_KEY] = owner
        if self.config.set_auth_subject:
            event.context.setdefault(AUTH_SUBJECT, f"apikey:{owner}")
        return Continue(
            set_headers={self.config.owner_header: owner} if self.config.owner_header else {},
            remove_headers=(self.config.header,) if self.config.strip_key else (),
        )

    async def _owner(self, digest: str) -> str | None:
        """The owner of the key with this SHA-256, or ``None`` for an unknown key."""
        if self._redis is None:
            return self._static.get(digest)
        cache_key = f"apikey:{digest}"
        cached = await self._cache.get(cache_key)
        if cached is not None:
            return str(cached) or None  # "" caches "unknown"
        try:
            # never wait longer than the deadline the chain gave us, and keep a little of it
            # for our own answer: otherwise the chain's timeout decides, with a generic 503
            async with asyncio.timeout(time_left(default=0.05) * 0.8):
                raw: Any = await self._redis.get(self.config.redis_prefix + digest)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failures += 1
            self._log.warning("redis lookup failed: %s", type(exc).__name__)
            if self.config.redis_down == "static":
                return self._static.get(digest)
            raise KeyStoreUnavailableError from exc
        self._redis_failures = 0
        owner = raw.decode() if isinstance(raw, bytes) else raw
        ttl = self.config.cache_ttl_s if owner else self.config.negative_cache_ttl_s
        if ttl > 0:
            await self._cache.set(cache_key, owner or "", ttl)
        return owner or None

    async def health_check(self) -> HealthStatus:
        if self._redis_failures >= 3:
            return HealthStatus.degraded(f"{self._redis_failures} Redis lookups failed in a row")
        return HealthStatus.healthy()
