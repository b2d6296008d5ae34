"""The cache of validated tokens.

Keys are ``<provider>:<entry format>:<config fingerprint>:<sha256(token)>``: the raw token is
never stored (nor logged), a changed provider configuration can never hit an entry validated
under the old one, and sidecars of two versions that store entries differently (a rolling
upgrade) never read each other's. An entry lives ``ttl_fraction`` of the token's remaining
lifetime (never past ``exp``, never longer than ``max_ttl_s``); a token still in use near the
end of its entry is verified again in the background (``refresh_ahead``), so it never drops
out while requests carry it.
A hit is not a pass: the caller still checks ``exp``/``nbf`` against the clock, that the key
that verified the token (by its thumbprint, not its ``kid``) is still in the key set, and the
route's rules.

L2 (Redis) holds only ``hash -> claims JSON`` (with the provider, ``kid`` and key thumbprint)
with a TTL; its failures are misses.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from extproc.plugin import Continue
from extproc.services.cache import MemoryCache, TieredCache

from .config import TokenCacheConfig

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["ENTRY_FORMAT", "TokenCache", "VerifiedToken", "token_digest"]


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    provider: str
    kid: str | None
    #: of the key that verified the token (:func:`~plugins.jwt_auth.jwks.jwk_thumbprint`)
    thumbprint: str
    claims: Mapping[str, Any]
    exp: float | None
    nbf: float | None
    subject: str | None
    #: request headers derived from the claims (claim_to_headers, payload_header)
    headers: Mapping[str, str]
    #: the plugin's answer for this token when nothing depends on the request (the token
    #: header is forwarded): built once, returned for every request that carries the token
    result: Continue | None = field(default=None, compare=False)


#: in every key: bumped when the stored entry changes shape (2: the key thumbprint was added)
ENTRY_FORMAT: Final = "v2"

#: share of an entry's TTL taken off at random (see :meth:`TokenCache.put`)
TTL_JITTER: Final = 0.1


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "surrogateescape")).hexdigest()


def encode_entry(entry: VerifiedToken) -> bytes:
    return json.dumps(
        {"p": entry.provider, "k": entry.kid, "t": entry.thumbprint, "c": dict(entry.claims)},
        separators=(",", ":"),
    ).encode()


class TokenCache:
    """L1 memory (+ optional Redis L2) of :class:`VerifiedToken`, by provider-scoped key."""

    def __init__(
        self,
        config: TokenCacheConfig,
        *,
        clock: Callable[[], float],
        rebuild: Callable[[str, str | None, str, dict[str, Any]], VerifiedToken | None],
        redis: Redis | None = None,
        l1: MemoryCache[VerifiedToken] | None = None,
    ) -> None:
        self.config = config
        self.l1: MemoryCache[VerifiedToken] = l1 or MemoryCache(config.max_entries, clock=clock)
        self._rebuild = rebuild
        #: a hit this close to its entry's expiry (seconds) re-verifies the token (0: never)
        self._refresh_window = config.refresh_ahead * config.max_ttl_s
        self.tiered: TieredCache[VerifiedToken] = TieredCache(
            self.l1,
            redis if config.redis else None,
            encode=encode_entry,
            decode=self._decode,
            prefix=config.redis_prefix,
            l2_timeout=config.redis_timeout_ms / 1000,
            l1_max_ttl=config.max_ttl_s,
            write_window=config.redis_write_window_ms / 1000,
        )

    @property
    def has_l2(self) -> bool:
        return self.tiered.redis is not None

    def _decode(self, raw: bytes) -> VerifiedToken:
        data = json.loads(raw)
        thumbprint = data["t"]
        if not isinstance(thumbprint, str):
            raise ValueError("unusable entry")
        entry = self._rebuild(str(data["p"]), data.get("k"), thumbprint, data["c"])
        if entry is None:
            raise ValueError("unusable entry")
        return entry

    def lookup(self, key: str, now: float) -> tuple[VerifiedToken | None, bool]:
        """The L1 entry, and whether a hit should verify the token again after answering:
        its entry is in the last ``refresh_ahead`` of ``max_ttl_s`` and a new one would last
        longer (not when the token itself ends first: the new entry would be as short, and
        due again at once). ``now`` is the wall clock, as the token's ``exp``."""
        found = self.l1.get_with_ttl(key)
        if found is None:
            return None, False
        entry, left = found
        window = self._refresh_window
        if left >= window:
            return entry, False
        return entry, self._ttl(entry, now) * (1.0 - TTL_JITTER) > 2 * window

    async def get_remote(self, key: str) -> VerifiedToken | None:
        if self.tiered.redis is None:
            return None
        return await self.tiered.get(key)

    def put(self, key: str, entry: VerifiedToken, now: float) -> None:
        """Store with TTL = ``ttl_fraction`` of the remaining lifetime, capped, less up to
        :data:`TTL_JITTER` of it at random: tokens first seen together (a restart, a burst of
        new clients) must not all expire, and be verified again, in the same instant."""
        ttl = self._ttl(entry, now)
        if ttl <= 0:
            return
        ttl *= 1.0 - TTL_JITTER * random.random()
        self.tiered.set_background(key, entry, ttl)

    async def drop(self, key: str) -> None:
        """Forget ``key`` in both tiers (an L2 failure is counted, not raised)."""
        await self.tiered.delete(key)

    def _ttl(self, entry: VerifiedToken, now: float) -> float:
        """An entry's lifetime before jitter: ``ttl_fraction`` of the token's, capped."""
        ttl = self.config.max_ttl_s
        if entry.exp is not None:
            ttl = min(ttl, (entry.exp - now) * self.config.ttl_fraction)
        return ttl

    def drop_keys_not_in(self, provider: str, thumbprints: frozenset[str]) -> int:
        """Forget ``provider``'s tokens verified by a key no longer in its set (L1 only: an
        L2 entry is checked against the key set when it is read)."""
        return self.l1.discard_where(
            lambda e: e.provider == provider and e.thumbprint not in thumbprints
        )

    async def aclose(self) -> None:
        await self.tiered.aclose()


def freeze(claims: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(claims)
