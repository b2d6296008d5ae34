"""The Redis store's Lua script and the in-process store decide alike: the same random
batches (fixed windows and GCRA, several hits per request, costs, shadow hits, requests with
no hits, keys shared inside a batch) through both, against a real redis-server."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Sequence

import pytest

from extproc.services.breaker import BreakerState, CircuitBreaker
from extproc.services.redis import make_redis
from extproc.testing.redis_server import RedisServer
from plugins.rate_limit.keys import GRANTED, NOT_COMMITTED, OVER_LIMIT, Hit
from plugins.rate_limit.store import LocalStore, RedisStore, StoreUnavailableError

pytestmark = pytest.mark.redis

DAY_MS = 86_400_000  # a window boundary (or a GCRA drip) inside the test is out of reach


def batches(rng: random.Random, count: int) -> Iterator[list[list[Hit]]]:
    keys = [f"rl:parity:{i}" for i in range(8)]
    specs = {k: (rng.random() < 0.5, rng.randint(1, 9)) for k in keys}
    for _ in range(count):
        batch: list[list[Hit]] = []
        for _ in range(rng.randint(1, 16)):
            hits = []
            for key in rng.sample(keys, rng.randint(0, 3)):
                gcra, limit = specs[key]
                cost = rng.choice((1, 1, 1, 2, 3))
                hits.append(Hit(key, gcra, limit, DAY_MS, cost, shadow=rng.random() < 0.15))
            batch.append(hits)
        yield batch


def decisions(outcomes: Sequence[Sequence[object]]) -> list[list[tuple[int, int]]]:
    return [[(o.status, o.remaining) for o in req] for req in outcomes]  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_redis_script_decides_as_the_local_store(seed: int) -> None:
    rng = random.Random(seed)
    local = LocalStore(lambda: int(time.time() * 1000))
    with RedisServer() as server:
        redis = make_redis(server.url, socket_timeout=2.0, connect_timeout=2.0)
        store = RedisStore(redis, CircuitBreaker("parity", failure_threshold=5, reset_timeout=1))
        seen: set[int] = set()
        try:
            for batch in batches(rng, 60):
                remote = await store.acquire(batch, 2.0)
                assert decisions(remote) == decisions(local.decide(batch)), batch
                seen.update(o.status for req in remote for o in req)
        finally:
            await redis.aclose()
        # one script call a batch (the first EVALSHA finds no script and EVAL loads it)
        assert (server.calls("evalsha"), server.calls("eval")) == (60, 1)
    assert seen == {GRANTED, OVER_LIMIT, NOT_COMMITTED}  # every branch was taken


class _Replying:
    """A stand-in client whose script call returns ``reply``."""

    def __init__(self, reply: object) -> None:
        self.reply = reply

    async def execute_command(self, *args: object) -> object:
        return self.reply


@pytest.mark.parametrize("reply", [b"1,2,3", b"1,2,3,4,x", [1, 2, 3, 4, 5], None])
async def test_a_malformed_script_reply_is_store_unavailable(reply: object) -> None:
    breaker = CircuitBreaker("odd", failure_threshold=2, reset_timeout=60)
    store = RedisStore(_Replying(reply), breaker)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(StoreUnavailableError):
            await store.acquire([[Hit("k", False, 5, 1000)]], 1.0)
    assert breaker.state is BreakerState.OPEN  # each one counted as a failure of the store


async def test_a_lost_connection_drops_the_pools_other_stale_connections() -> None:
    """After a Redis restart only the first call fails: the idle connections that went stale
    with it are dropped, not each left to fail a request of its own later."""
    hit = [[Hit("rl:restart", False, 1_000_000, DAY_MS)]]
    with RedisServer() as server:
        redis = make_redis(server.url, socket_timeout=2.0, connect_timeout=2.0)
        store = RedisStore(redis, CircuitBreaker("restart", failure_threshold=50, reset_timeout=1))
        try:
            await asyncio.gather(*(store.acquire(hit, 2.0) for _ in range(4)))  # 4 connections
            assert len(redis.connection_pool._available_connections) == 4
            await asyncio.to_thread(server.restart)
            with pytest.raises(StoreUnavailableError):
                await store.acquire(hit, 2.0)  # a stale connection: "closed by server"
            await asyncio.sleep(0.05)  # the drop runs in the background
            results = await asyncio.gather(
                *(store.acquire(hit, 2.0) for _ in range(4)), return_exceptions=True
            )
            assert [type(r).__name__ for r in results] == ["list"] * 4
        finally:
            await redis.aclose()
