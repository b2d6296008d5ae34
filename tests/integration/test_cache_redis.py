"""TieredCache on a real redis-server through the sidecar's own client: what one process
writes another reads, with the TTL Redis keeps, and a burst of background writes reaches Redis
as one pipeline (counted by the server: its reply writes, one per round trip)."""

from __future__ import annotations

import pytest

from extproc.services.cache import MemoryCache, TieredCache
from extproc.services.redis import make_redis
from extproc.testing.redis_server import RedisServer

pytestmark = pytest.mark.redis

#: the test's own commands (INFO); the client connects before the first count


def _cache(url: str) -> TieredCache[str]:
    return TieredCache(
        MemoryCache(1000),
        make_redis(url),
        encode=str.encode,
        decode=bytes.decode,
        prefix="tc:",
        l2_timeout=1.0,
    )


def _round_trips(server: RedisServer, before: tuple[dict[str, dict[str, float]], int]) -> int:
    stats, writes = server.counters()
    own = sum(
        v["calls"] - before[0].get(name, {}).get("calls", 0)
        for name, v in stats.items()
        if name == "info"
    )
    return int(writes - before[1] - own)


async def test_a_burst_of_background_writes_is_one_round_trip_and_readable_elsewhere() -> None:
    with RedisServer() as server:
        writer, reader = _cache(server.url), _cache(server.url)
        try:
            await writer.redis.ping()  # type: ignore[union-attr]  # connected: set-up is not counted
            before = server.counters()
            for i in range(100):
                writer.set_background(f"tok{i}", f"claims{i}", 30)
            await writer.aclose()
            assert writer.l2_errors == 0 and writer.l2_write_batches == 1
            assert server.calls("set") == 100
            assert _round_trips(server, before) == 1  # 100 SETs, one pipeline
            assert await reader.get("tok42") == "claims42"  # another process's L1 is empty
            assert 29 < (reader.l1.ttl("tok42") or 0) <= 30
            assert int(server.command("PTTL", "tc:tok99")[1:].strip()) > 29_000
        finally:
            await writer.redis.aclose()  # type: ignore[union-attr]
            await reader.redis.aclose()  # type: ignore[union-attr]
