"""Window and GCRA arithmetic, descriptors and keys: pure, with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.rate_limit.keys import (
    GRANTED,
    NOT_COMMITTED,
    OVER_LIMIT,
    Hit,
    client_address,
    encode_value,
    redis_key,
    route_matches,
)
from plugins.rate_limit.store import LocalStore

T0 = 1_700_000_000_000  # a window boundary for every period used here (divisible by 3.6e6)


class FakeClock:
    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def fixed(limit: int, period: int = 1000, cost: int = 1, key: str = "k", **kw: bool) -> Hit:
    return Hit(key, False, limit, period, cost, **kw)


def gcra(limit: int, period: int = 1000, cost: int = 1, key: str = "k", **kw: bool) -> Hit:
    return Hit(key, True, limit, period, cost, **kw)


# (offset ms from T0, cost) per request -> expected statuses
FIXED_CASES = [
    ("fills then denies", 3, [(0, 1)] * 5, [1, 1, 1, 0, 0]),
    ("resets at the boundary", 2, [(0, 1), (0, 1), (999, 1), (1000, 1)], [1, 1, 0, 1]),
    ("weighted all-or-nothing", 5, [(0, 3), (0, 3), (0, 2)], [1, 0, 1]),
    ("cost above limit never fits", 2, [(0, 3), (0, 1)], [0, 1]),
    ("denials are not counted", 2, [(0, 1), (0, 1), (0, 1), (1000, 1), (1000, 1)], [1, 1, 0, 1, 1]),
]


@pytest.mark.parametrize(("name", "limit", "reqs", "expected"), FIXED_CASES)
def test_fixed_window(
    name: str, limit: int, reqs: list[tuple[int, int]], expected: list[int]
) -> None:
    clock = FakeClock()
    store = LocalStore(clock)
    got = []
    for offset, cost in reqs:
        clock.ms = T0 + offset
        got.append(store.decide([[fixed(limit, cost=cost)]])[0][0].status)
    assert got == expected, name


GCRA_CASES = [
    # limit 10 per second: one permit every 100 ms, a burst of 10
    ("burst of limit", 10, [(0, 1)] * 11, [1] * 10 + [0]),
    ("one permit back after T", 10, [(0, 10), (50, 1), (100, 1), (100, 1)], [1, 0, 1, 0]),
    ("weighted", 10, [(0, 6), (0, 5), (0, 4), (400, 4)], [1, 0, 1, 1]),
    ("full after a period", 10, [(0, 10), (1000, 10)], [1, 1]),
]


@pytest.mark.parametrize(("name", "limit", "reqs", "expected"), GCRA_CASES)
def test_gcra(name: str, limit: int, reqs: list[tuple[int, int]], expected: list[int]) -> None:
    clock = FakeClock()
    store = LocalStore(clock)
    got = []
    for offset, cost in reqs:
        clock.ms = T0 + offset
        got.append(store.decide([[gcra(limit, cost=cost)]])[0][0].status)
    assert got == expected, name


def test_fixed_window_headers_values() -> None:
    clock = FakeClock(T0 + 250)
    store = LocalStore(clock)
    first = store.decide([[fixed(2)]])[0][0]
    assert (first.status, first.remaining, first.reset_ms, first.retry_ms, first.block_ms) == (
        GRANTED, 1, 750, 0, 0,
    )  # fmt: skip
    second = store.decide([[fixed(2)]])[0][0]
    assert (second.remaining, second.block_ms) == (0, 750)  # full: cache until the reset
    third = store.decide([[fixed(2)]])[0][0]
    assert (third.status, third.retry_ms) == (OVER_LIMIT, 750)


def test_gcra_retry_and_block() -> None:
    clock = FakeClock()
    store = LocalStore(clock)
    store.decide([[gcra(10, cost=10)]])
    denied = store.decide([[gcra(10, cost=3)]])[0][0]
    assert denied.status == OVER_LIMIT
    assert denied.retry_ms == 300  # three emission intervals
    assert denied.block_ms == 100  # a cost-1 hit fits after one
    assert denied.reset_ms == 1000


def test_multi_limit_all_or_nothing_and_shadow() -> None:
    store = LocalStore(FakeClock())
    second = fixed(5, key="s")
    minute = fixed(1, 60_000, key="m")
    shadow = fixed(1, key="sh", shadow=True)
    r1 = store.decide([[second, minute, shadow]])[0]
    assert [o.status for o in r1] == [GRANTED, GRANTED, GRANTED]
    r2 = store.decide([[second, minute, shadow]])[0]
    # the minute limit denies: the second limit is not counted; shadow decides on its own
    assert [o.status for o in r2] == [NOT_COMMITTED, OVER_LIMIT, OVER_LIMIT]
    assert r2[0].remaining == 4


def test_local_store_evicts_when_full() -> None:
    clock = FakeClock()
    store = LocalStore(clock, max_keys=10)
    for i in range(25):
        store.decide([[fixed(5, key=f"k{i}")]])
    assert len(store) <= 10
    clock.ms += 1000  # all expired: swept on the next insert
    store.decide([[fixed(5, key="new")]])
    assert len(store) == 1


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    limit=st.integers(1, 30),
    n=st.integers(0, 80),
    algorithm=st.sampled_from([False, True]),
    splits=st.lists(st.integers(1, 20), max_size=20),
)
def test_property_grants_equal_min_n_l(
    limit: int, n: int, algorithm: bool, splits: list[int]
) -> None:
    """However N same-instant requests are cut into batches, exactly min(N, L) are granted."""
    store = LocalStore(FakeClock())
    hit = Hit("k", algorithm, limit, 60_000)
    granted = 0
    left = n
    for size in [*splits, n]:
        take = min(size, left)
        if take == 0:
            break
        results = store.decide([[hit]] * take)
        granted += sum(r[0].status == GRANTED for r in results)
        left -= take
    assert granted == min(n, limit)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    limit=st.integers(1, 20),
    algorithm=st.sampled_from([False, True]),
    events=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 4)), max_size=60),
)
def test_property_never_over_limit_in_any_period(
    limit: int, algorithm: bool, events: list[tuple[int, int]]
) -> None:
    """Fixed: granted cost per window <= L. GCRA: over any span d, <= L + d * L / P."""
    clock = FakeClock()
    store = LocalStore(clock)
    period = 1000
    granted: list[tuple[int, int]] = []
    t = 0
    for gap, cost in events:
        t += gap
        clock.ms = T0 + t
        if store.decide([[Hit("k", algorithm, limit, period, cost)]])[0][0].status == GRANTED:
            granted.append((t, cost))
    for i, (start, _) in enumerate(granted):
        if algorithm:  # GCRA: a burst of L, then one permit per P/L ms
            for end, _ in granted[i:]:
                used = sum(c for s, c in granted if start <= s <= end)
                assert used * period <= limit * period + (end - start) * limit
        else:
            window = start // period
            assert sum(c for s, c in granted if s // period == window) <= limit


ROUTES = [
    ("/api/x", "GET", "/api/", None, (), True),
    ("/apix", "GET", "/api/", None, (), False),
    ("/login", "POST", None, "/login", ("POST",), True),
    ("/login", "GET", None, "/login", ("POST",), False),
    ("/login/x", "POST", None, "/login", (), False),
    ("/anything", "PUT", None, None, (), True),
]


@pytest.mark.parametrize(("path", "method", "prefix", "exact", "methods", "expected"), ROUTES)
def test_route_matches(
    path: str,
    method: str,
    prefix: str | None,
    exact: str | None,
    methods: tuple[str, ...],
    expected: bool,
) -> None:
    assert route_matches(path, method, prefix=prefix, exact=exact, methods=methods) is expected


ADDRESSES = [
    ({"source.address": "10.0.0.1:4567"}, (), 0, "10.0.0.1"),
    ({"source.address": "[2001:db8::1]:443"}, (), 0, "2001:db8::1"),
    ({"source.address": "2001:db8::1"}, (), 0, "2001:db8::1"),
    ({}, (), 0, None),
    ({"source.address": "10.0.0.9:1"}, ("1.1.1.1, 2.2.2.2",), 1, "2.2.2.2"),
    ({}, ("1.1.1.1, 2.2.2.2", "3.3.3.3"), 2, "2.2.2.2"),
    ({}, ("1.1.1.1",), 2, None),
]


@pytest.mark.parametrize(("attrs", "xff", "hops", "expected"), ADDRESSES)
def test_client_address(
    attrs: dict[str, str], xff: tuple[str, ...], hops: int, expected: str | None
) -> None:
    assert client_address(attrs, xff, hops) == expected


def test_keys_carry_one_hash_tag_and_escape_values() -> None:
    value = encode_value("a}b{c|d")
    key = redis_key("rl", "rule", [value, "x"], gcra=True, limit=10, period_ms=1000)
    assert key == "rl:{rule|a%7Db%7Bc%7Cd|x}:g10/1000"
    assert key.count("{") == 1 and key.count("}") == 1
    long = encode_value("v" * 500)
    assert long.startswith("#") and len(long) == 33
