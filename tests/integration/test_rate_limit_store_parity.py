"""The Redis store's Lua script and the in-process store decide alike: the same random
batches (fixed windows and GCRA, several hits per request, costs, shadow hits, requests with
no hits, keys shared inside a batch) through both, against a real redis-server."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pytest

from extproc.services.breaker import BreakerState, CircuitBreaker
from extproc.services.redis import make_redis
from extproc.services.redis_pipe import PipeSettings, RedisPipe
from extproc.testing.redis_server import RedisServer
from plugins.rate_limit.keys import GRANTED, NOT_COMMITTED, OVER_LIMIT, Hit
from plugins.rate_limit.store import LocalStore, RedisStore, StoreUnavailableError

if TYPE_CHECKING:
    from redis.asyncio import Redis

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


def _pipe_for(redis: Redis) -> RedisPipe:
    settings = PipeSettings.from_client(redis)
    assert settings is not None
    return RedisPipe(settings)


@pytest.mark.parametrize("transport", ["pool", "pipe"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_redis_script_decides_as_the_local_store(seed: int, transport: str) -> None:
    rng = random.Random(seed)
    local = LocalStore(lambda: int(time.time() * 1000))
    with RedisServer() as server:
        redis = make_redis(server.url, socket_timeout=2.0, connect_timeout=2.0)
        store = RedisStore(
            redis,
            CircuitBreaker("parity", failure_threshold=5, reset_timeout=1),
            pipe=_pipe_for(redis) if transport == "pipe" else None,
        )
        assert store.pipelined is (transport == "pipe")
        seen: set[int] = set()
        try:
            for batch in batches(rng, 60):
                remote = await store.acquire(batch, 2.0)
                assert decisions(remote) == decisions(local.decide(batch)), batch
                seen.update(o.status for req in remote for o in req)
        finally:
            await store.aclose()
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
            await store.aclose()  # the drop runs in the background; this waits for it
            assert store._dropping is not None and store._dropping.done()
            results = await asyncio.gather(
                *(store.acquire(hit, 2.0) for _ in range(4)), return_exceptions=True
            )
            assert [type(r).__name__ for r in results] == ["list"] * 4
        finally:
            await redis.aclose()


async def test_the_pipe_survives_a_restart_and_a_pause_without_crossed_replies() -> None:
    """Through the pipe: after a restart the script is loaded again and no call fails once the
    loop has seen the close; a call that timed out on a paused Redis leaves its late reply to
    be dropped, and the next batch gets its own decision."""
    hit = [[Hit("rl:pipe", False, 1_000_000, DAY_MS)]]
    with RedisServer() as server:
        redis = make_redis(server.url, socket_timeout=2.0, connect_timeout=2.0)
        store = RedisStore(
            redis, CircuitBreaker("pipe", failure_threshold=50, reset_timeout=1),
            pipe=_pipe_for(redis),
        )  # fmt: skip
        try:
            first = await store.acquire(hit, 2.0)
            assert first[0][0].remaining == 1_000_000 - 1
            await asyncio.to_thread(server.restart)  # empty data, no script
            await asyncio.sleep(0.05)
            again = await store.acquire(hit, 2.0)
            assert again[0][0].remaining == 1_000_000 - 1  # counted afresh: a new server
            server.pause()
            with pytest.raises(StoreUnavailableError, match="timed out"):
                await store.acquire(hit, 0.1)
            server.resume()
            other = [[Hit("rl:pipe:other", False, 7, DAY_MS)]]
            answer = await store.acquire(other, 2.0)
            assert answer[0][0].remaining == 6  # not the late reply of "rl:pipe"
            # the timed-out call ran once Redis did (it was sent): it counted, as any request
            # whose answer came too late may
            assert (await store.acquire(hit, 2.0))[0][0].remaining == 1_000_000 - 3
        finally:
            server.resume()
            await store.aclose()
            await redis.aclose()
