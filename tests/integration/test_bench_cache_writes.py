"""``bench.cache_writes`` against a real redis-server: every background write is one SET, and a
longer window takes fewer round trips (the server's own count)."""

from __future__ import annotations

import pytest

from bench.cache_writes import one
from extproc.testing.redis_server import RedisServer

pytestmark = pytest.mark.redis


async def test_a_longer_window_gathers_more_writes_into_a_round_trip() -> None:
    with RedisServer() as server:
        short = await one(server, rate=200, window_ms=2, seconds=1.0)
        long = await one(server, rate=200, window_ms=200, seconds=1.0)
    for r in (short, long):
        assert r["errors"] == 0 and r["writes"] > 50
        assert r["sets"] == r["writes"]  # each write once, none lost
    # 1 s of writes in 200 ms windows: about five pipelines (a window opens at the first
    # write after the last one closed; the last sleep and the closing flush can add one or
    # two), where 2 ms windows at ~200 a second take dozens. The count is the server's
    # writes, and a ~12 KB pipeline that reaches it in several reads may be answered in
    # as many (the likely reason for the 9 seen once in CI): the bound leaves room for it
    assert 4 <= long["round_trips"] <= 12
    assert short["round_trips"] > 4 * long["round_trips"]
