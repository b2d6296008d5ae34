"""Pure parts of the rate limiter: descriptors, Redis keys and the window / GCRA arithmetic.

No I/O and no clock here: time comes in as ``now_ms``. :func:`evaluate` is the reference of
the decision; the Lua script in :mod:`plugins.rate_limit.store` implements the same steps on the
same integers, and the in-process store calls :func:`evaluate` directly.

Counting rules (both algorithms, both stores):

* Requests are decided one by one in arrival order. A request's enforced hits (one per limit of
  every matching non-shadow rule) are all-or-nothing: it is granted only if every one of them
  fits, and only then are they counted. A denied request counts nothing, so denials never eat
  into the quota of the next window.
* A hit of cost ``c`` needs ``c`` permits at once (all or nothing); a cost above the limit never
  fits.
* Shadow hits are decided independently (counted when they fit) and never deny.

Fixed window: ``window = now_ms // period_ms`` (aligned to the Unix epoch, as in
envoyproxy/ratelimit); the state is ``(window, count)``.

GCRA: the state is ``(updated_ms, tat)`` where ``tat`` is how far the theoretical arrival time
lies ahead of ``updated_ms``, in integer units of ``1/limit`` ms. One permit advances it by
``period_ms`` units (``period/limit`` ms); a hit fits while the result stays within
``period_ms * limit`` units (a full bucket: ``limit`` permits at once). Integer units keep the
arithmetic exact in Lua's doubles (config bounds ``limit * period_ms <= 2**46``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "GRANTED",
    "NOT_COMMITTED",
    "OVER_LIMIT",
    "Hit",
    "Outcome",
    "client_address",
    "current",
    "encode_value",
    "evaluate",
    "next_state",
    "redis_key",
    "route_matches",
]

OVER_LIMIT: Final = 0  # this hit does not fit
GRANTED: Final = 1  # fits and was counted
NOT_COMMITTED: Final = 2  # fits, but another enforced hit of the request did not: not counted


@dataclass(frozen=True, slots=True)
class Hit:
    """One limit applied to one request: the unit the stores count."""

    key: str
    gcra: bool
    limit: int
    period_ms: int
    cost: int = 1
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one hit, after its request was decided.

    ``remaining``: cost-1 permits left now; ``reset_ms``: until the window ends (fixed) or the
    bucket is full again (GCRA); ``retry_ms``: until this hit's cost would fit (0 if it did);
    ``block_ms``: until a cost-1 hit would fit (0 if one fits now) - what the over-limit cache
    may rely on.
    """

    status: int
    remaining: int
    reset_ms: int
    retry_ms: int
    block_ms: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- arithmetic


def current(hit: Hit, state: tuple[int, int] | None, now_ms: int) -> int:
    """The counter value now: count in this window, or GCRA ``tat`` units ahead of now."""
    if state is None:
        return 0
    a, b = state
    if hit.gcra:
        return max(0, b - (now_ms - a) * hit.limit)
    return b if a == now_ms // hit.period_ms else 0


def _fits(hit: Hit, cur: int) -> bool:
    if hit.gcra:
        return cur + hit.cost * hit.period_ms <= hit.period_ms * hit.limit
    return cur + hit.cost <= hit.limit


def _add(hit: Hit, cur: int) -> int:
    return cur + (hit.cost * hit.period_ms if hit.gcra else hit.cost)


def _outcome(hit: Hit, cur: int, status: int, now_ms: int) -> Outcome:
    period, limit = hit.period_ms, hit.limit
    if hit.gcra:
        cap = period * limit
        remaining = (cap - cur) // period
        reset = _ceil_div(cur, limit)
        retry = 0 if status != OVER_LIMIT else _ceil_div(cur + hit.cost * period - cap, limit)
        block = _ceil_div(cur + period - cap, limit) if cur + period > cap else 0
        return Outcome(status, remaining, reset, retry, block)
    reset = (now_ms // period + 1) * period - now_ms
    remaining = max(0, limit - cur)
    retry = 0 if status != OVER_LIMIT else reset
    block = reset if cur >= limit else 0
    return Outcome(status, remaining, reset, retry, block)


def next_state(hit: Hit, cur: int, now_ms: int) -> tuple[tuple[int, int], int]:
    """The state to store after a decision and its time to live in ms (0: nothing to keep)."""
    if hit.gcra:
        return (now_ms, cur), _ceil_div(cur, hit.limit)
    window = now_ms // hit.period_ms
    return (window, cur), ((window + 1) * hit.period_ms - now_ms) if cur else 0


def evaluate(
    requests: Sequence[Sequence[Hit]], now_ms: int, counters: MutableMapping[str, int]
) -> list[list[Outcome]]:
    """Decide ``requests`` in order. ``counters`` maps every key to :func:`current` and is
    updated in place with the granted hits."""
    out: list[list[Outcome]] = []
    for hits in requests:
        fits = [_fits(h, counters[h.key]) for h in hits]
        enforced_ok = all(ok for h, ok in zip(hits, fits, strict=True) if not h.shadow)
        decided: list[Outcome] = []
        statuses: list[int] = []
        for h, ok in zip(hits, fits, strict=True):
            if not ok:
                statuses.append(OVER_LIMIT)
            elif h.shadow or enforced_ok:
                counters[h.key] = _add(h, counters[h.key])
                statuses.append(GRANTED)
            else:
                statuses.append(NOT_COMMITTED)
        for h, status in zip(hits, statuses, strict=True):
            decided.append(_outcome(h, counters[h.key], status, now_ms))
        out.append(decided)
    return out


# ---------------------------------------------------------------- descriptors and keys


def route_matches(
    path: str,
    method: str,
    *,
    prefix: str | None,
    exact: str | None,
    methods: tuple[str, ...],
) -> bool:
    if methods and method.upper() not in methods:
        return False
    if exact is not None:
        return path == exact
    return prefix is None or path.startswith(prefix)


def _strip_port(address: str) -> str:
    address = address.strip()
    if address.startswith("["):  # [v6]:port
        return address[1 : address.find("]")] if "]" in address else address
    if address.count(":") == 1:  # v4:port
        return address.partition(":")[0]
    return address  # bare v4 or bare v6


def client_address(
    attributes: Mapping[str, Any], xff: tuple[str, ...], trusted_hops: int
) -> str | None:
    """The client's IP: from ``x-forwarded-for`` when ``trusted_hops`` proxies in front of
    Envoy append to it (the entry ``trusted_hops`` from the right), else from Envoy's
    ``source.address`` attribute (``ip:port``)."""
    if trusted_hops:
        entries = [e.strip() for value in xff for e in value.split(",") if e.strip()]
        if len(entries) < trusted_hops:
            return None
        return _strip_port(entries[-trusted_hops])
    source = attributes.get("source.address")
    if not isinstance(source, str) or not source:
        return None
    return _strip_port(source)


_ESCAPES: Final = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D", "|": "%7C", "\n": "%0A"})
_MAX_VALUE: Final = 96


def encode_value(value: str) -> str:
    """A descriptor value made safe for a key: braces (the cluster hash tag) and separators are
    escaped, long values are replaced by a digest."""
    if len(value) > _MAX_VALUE:
        digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16)
        return "#" + digest.hexdigest()
    return value.translate(_ESCAPES)


def redis_key(
    prefix: str,
    rule: str,
    descriptor: Sequence[str],
    *,
    gcra: bool,
    limit: int,
    period_ms: int,
) -> str:
    """``<prefix>:{<rule>|<v1>|<v2>}:<f|g><limit>/<period_ms>``.

    The hash tag is the rule and descriptor, so every limit of one client under one rule lands
    in one Redis Cluster slot. The limit itself is part of the name: an override or a config
    change never reads a counter kept under other arithmetic.
    """
    tag = "|".join((rule, *descriptor))
    return f"{prefix}:{{{tag}}}:{'g' if gcra else 'f'}{limit}/{period_ms}"
