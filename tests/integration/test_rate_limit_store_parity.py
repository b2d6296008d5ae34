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


async def started(store: RedisStore, batch: Sequence[Sequence[Hit]], budget: float) -> object:
    """:meth:`RedisStore.start`, awaited here: the outcomes, or the error it handed back."""
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    assert store.start(batch, budget, future.set_result)
    return await future


@pytest.mark.parametrize("transport", ["pool", "pipe", "start"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_redis_script_decides_as_the_local_store(seed: int, transport: str) -> None:
    rng = random.Random(seed)
    local = LocalStore(lambda: int(time.time() * 1000))
    with RedisServer() as server:
        redis = make_redis(server.url, socket_timeout=2.0, connect_timeout=2.0)
        store = RedisStore(
            redis,
            CircuitBreaker("parity", failure_threshold=5, reset_timeout=1),
            pipe=_pipe_for(redis) if transport != "pool" else None,
        )
        assert store.pipelined is (transport != "pool")
        seen: set[int] = set()
        try:
            if transport == "start":  # open the connection; the script is not loaded
                assert store._pipe is not None
                await store._pipe.execute("PING")
            for batch in batches(rng, 60):
                if transport == "start":
                    remote = await started(store, batch, 2.0)
                    assert isinstance(remote, list), remote
                else:
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


async def test_start_settles_by_the_reply_the_deadline_or_the_breaker() -> None:
    """The callback-shaped round trip keeps acquire's rules: it needs an open connection
    (else ``False``: the caller awaits acquire, which opens one), a paused Redis ends it at
    its budget with the late reply dropped, and an open breaker answers at once."""
    hit = [[Hit("rl:start", False, 1_000_000, DAY_MS)]]
    trips: list[tuple[str, int]] = []
    with RedisServer() as server:
        redis = make_redis(server.url, socket_timeout=2.0, connect_timeout=2.0)
        breaker = CircuitBreaker("start", failure_threshold=3, reset_timeout=60)
        store = RedisStore(
            redis, breaker, pipe=_pipe_for(redis),
            on_round_trip=lambda outcome, n: trips.append((outcome, n)),
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            assert not store.start(hit, 2.0, lambda r: None)  # no connection yet
            await store.warm(2.0)
            first = await started(store, hit, 2.0)
            assert first[0][0].remaining == 1_000_000 - 1  # type: ignore[index]
            server.pause()
            began = loop.time()
            late = await started(store, hit, 0.1)
            assert isinstance(late, StoreUnavailableError) and "timed out" in str(late)
            assert loop.time() - began < 1.0
            server.resume()
            other = await started(store, [[Hit("rl:start:other", False, 7, DAY_MS)]], 2.0)
            assert other[0][0].remaining == 6  # type: ignore[index]  # not the late reply
            assert trips == [("ok", 1), ("timeout", 1), ("ok", 1)]
            for _ in range(3):
                breaker.record_failure()
            shut = await started(store, hit, 2.0)
            assert isinstance(shut, StoreUnavailableError) and "breaker open" in str(shut)
            assert len(trips) == 3  # nothing was sent
            breaker.record_success()
            await asyncio.to_thread(server.restart)
            await asyncio.sleep(0.05)  # the pipe has read the close
            assert not store.start(hit, 2.0, lambda r: None)  # acquire reconnects
            assert (await store.acquire(hit, 2.0))[0][0].remaining == 1_000_000 - 1
            after = await started(store, hit, 2.0)  # reconnected: start works again
            assert after[0][0].remaining == 1_000_000 - 2  # type: ignore[index]
        finally:
            server.resume()
            await store.aclose()
            await redis.aclose()
