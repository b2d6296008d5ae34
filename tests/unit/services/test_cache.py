"""MemoryCache (bounded LRU + TTL, injected clock) and TieredCache (L2 failures are misses)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from extproc.context import _deadline
from extproc.services.cache import Cache, MemoryCache, TieredCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_and_lru() -> None:
    clock = Clock()
    c: MemoryCache[str] = MemoryCache(2, clock=clock)
    c.set_nowait("a", "1", 10)
    c.set_nowait("b", "2", 5)
    assert c.get_nowait("a") == "1"  # a is now most recent
    c.set_nowait("c", "3", 10)  # evicts b (least recently used)
    assert c.get_nowait("b") is None and len(c) == 2 and c.evictions == 1
    clock.now = 9.99
    assert c.get_nowait("a") == "1"
    clock.now = 10
    assert c.get_nowait("a") is None and "a" not in c
    assert c.ttl("c") is None
    c.set_nowait("d", "4", 0)  # ttl <= 0: not stored
    assert c.get_nowait("d") is None


def test_get_with_ttl_is_a_get_that_says_how_long_the_entry_has_left() -> None:
    clock = Clock()
    c: MemoryCache[str] = MemoryCache(2, clock=clock)
    c.set_nowait("a", "1", 10)
    c.set_nowait("b", "2", 10)
    clock.now = 4
    assert c.get_with_ttl("a") == ("1", 6)  # and a is now the most recent ...
    c.set_nowait("c", "3", 10)
    assert c.get_nowait("b") is None  # ... so b went first
    clock.now = 10
    assert c.get_with_ttl("a") is None and len(c) == 1  # expired: dropped, as get_nowait does
    assert c.get_with_ttl("missing") is None


def test_discard_where_and_clear() -> None:
    c: MemoryCache[int] = MemoryCache(10)
    for i in range(6):
        c.set_nowait(str(i), i, 60)
    assert c.discard_where(lambda v: v % 2 == 0) == 3
    assert sorted(c.keys()) == ["1", "3", "5"]
    c.clear()
    assert len(c) == 0


def test_bounded_under_load() -> None:
    c: MemoryCache[int] = MemoryCache(100)
    for i in range(10_000):
        c.set_nowait(str(i), i, 60)
    assert len(c) == 100 and c.get_nowait("9999") == 9999 and c.get_nowait("0") is None


async def test_protocol() -> None:
    cache: Cache = MemoryCache()
    await cache.set("k", b"v", 5)
    assert await cache.get("k") == b"v"
    await cache.delete("k")
    assert await cache.get("k") is None


class FakeRedis:
    """Just enough of redis.asyncio for TieredCache, with failure switches."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.fail = False
        self.hang = False
        #: seconds a call cancelled while it hangs takes to clean up, shielded (as redis-py
        #: drops the connection and gives it back to its pool under a lock)
        self.cleanup = 0.0
        #: pipelines executed (each one round trip)
        self.pipelines = 0

    async def _maybe_fail(self) -> None:
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if self.cleanup:
                    await asyncio.shield(asyncio.sleep(self.cleanup))
                raise
        if self.fail:
            raise ConnectionError("redis down")

    async def set(self, key: str, value: bytes, px: int) -> None:
        await self._maybe_fail()
        self.data[key] = (value, px)

    async def delete(self, key: str) -> None:
        await self._maybe_fail()
        self.data.pop(key, None)

    def pipeline(self, transaction: bool = False) -> Any:
        redis = self

        class Pipe:
            def __init__(self) -> None:
                self.ops: list[tuple[Any, ...]] = []

            def get(self, key: str) -> None:
                self.ops.append(("get", key))

            def pttl(self, key: str) -> None:
                self.ops.append(("pttl", key))

            def set(self, key: str, value: bytes, px: int) -> None:
                self.ops.append(("set", key, value, px))

            async def execute(self) -> list[Any]:
                redis.pipelines += 1
                await redis._maybe_fail()
                out: list[Any] = []
                for op, key, *args in self.ops:
                    item = redis.data.get(key)
                    if op == "get":
                        out.append(item[0] if item else None)
                    elif op == "pttl":
                        out.append(item[1] if item else -2)
                    else:
                        redis.data[key] = (args[0], args[1])
                        out.append(True)
                return out

        return Pipe()


def tiered(redis: FakeRedis | None, clock: Clock | None = None) -> TieredCache[str]:
    return TieredCache(
        MemoryCache(10, clock=clock or Clock()),
        redis,  # type: ignore[arg-type]
        encode=str.encode,
        decode=bytes.decode,
        prefix="t:",
        l2_timeout=0.05,
    )


async def test_l2_round_trip_fills_l1() -> None:
    redis = FakeRedis()
    writer = tiered(redis)
    await writer.set("k", "v", 30)
    assert redis.data["t:k"] == (b"v", 30_000)
    reader = tiered(redis)  # another process: empty L1
    assert reader.get_nowait("k") is None
    assert await reader.get("k") == "v"
    assert reader.get_nowait("k") == "v" and reader.l2_hits == 1
    assert reader.l1.ttl("k") == pytest.approx(30)


async def test_l2_failures_are_misses_never_errors() -> None:
    redis = FakeRedis()
    c = tiered(redis)
    redis.fail = True
    await c.set("k", "v", 30)  # L1 still written
    assert c.get_nowait("k") == "v"
    c.l1.clear()
    assert await c.get("k") is None
    await c.delete("k")
    assert c.l2_errors == 3


async def test_slow_l2_is_bounded() -> None:
    redis = FakeRedis()
    redis.hang = True
    c = tiered(redis)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await c.get("k") is None
    await c.set("k", "v", 30)
    assert loop.time() - start < 2.0 and c.l2_errors == 2


async def test_slow_l2_takes_at_most_half_of_what_the_plugin_has_left() -> None:
    redis = FakeRedis()
    redis.hang = True
    c = TieredCache(MemoryCache(10), redis, encode=str.encode, decode=bytes.decode, l2_timeout=10)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    start = loop.time()
    token = _deadline.set(start + 0.4)  # as inside a plugin hook with 400 ms left
    try:
        assert await c.get("k") is None  # a miss the plugin can still act on
    finally:
        _deadline.reset(token)
    assert 0.15 <= loop.time() - start <= 0.3


async def test_a_timed_out_call_does_not_wait_for_the_client_to_clean_up() -> None:
    """A call that runs out of time is left behind, not cancelled under the caller: the miss
    (or the dropped write) comes at the bound, and the call ends alone, its own bound and
    clean-up later (here a clean-up of 0.5 s: redis-py, cancelled mid-reply, drops the
    connection and hands it back to its pool under a lock)."""
    redis = FakeRedis()
    redis.hang = True
    redis.cleanup = 0.5
    c = tiered(redis)  # l2_timeout 50 ms
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await c.get("k") is None
    await c.set("k", "v", 30)
    await c.delete("k")
    assert loop.time() - start < 0.4  # three bounds of 50 ms, not three clean-ups of 500
    assert c.l2_errors == 3
    assert len(c._pending) == 3  # still going: their own bound (100 ms), then the clean-up
    await asyncio.wait(list(c._pending), timeout=5)
    assert not c._pending


async def test_a_cancelled_caller_leaves_the_call_behind_at_once() -> None:
    redis = FakeRedis()
    redis.hang = True
    redis.cleanup = 0.5
    c = TieredCache(MemoryCache(10), redis, encode=str.encode, decode=bytes.decode, l2_timeout=5)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    reader = loop.create_task(c.get("k"))
    await asyncio.sleep(0.02)
    start = loop.time()
    reader.cancel()  # the plugin's deadline
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert loop.time() - start < 0.3  # not after the 0.5 s clean-up
    (left,) = c._pending
    left.cancel()  # the test does not wait for its 10 s bound
    await asyncio.wait([left], timeout=5)


async def test_undecodable_l2_value_is_a_miss() -> None:
    redis = FakeRedis()
    redis.data["t:k"] = (b"\xff\xfe", 1000)
    assert await tiered(redis).get("k") is None


async def test_background_write() -> None:
    redis = FakeRedis()
    c = tiered(redis)
    c.set_background("k", "v", 10)
    assert c.get_nowait("k") == "v"
    await c.aclose()
    assert redis.data["t:k"] == (b"v", 10_000)


async def test_background_writes_share_a_pipeline() -> None:
    """A burst of new or refreshed entries (tokens first seen together expire together) is
    one round trip per ``write_batch``, not one each; a key written twice goes once, with the
    later value."""
    redis = FakeRedis()
    c = TieredCache(
        MemoryCache(100),
        redis,
        encode=str.encode,
        decode=bytes.decode,  # type: ignore[arg-type]
        prefix="t:",
        write_batch=20,
    )
    for i in range(50):
        c.set_background(f"k{i}", f"v{i}", 10)
    c.set_background("k3", "newer", 20)
    assert c.get_nowait("k3") == "newer" and redis.pipelines == 0  # nothing sent yet
    await c.aclose()
    assert redis.pipelines == c.l2_write_batches == 3  # 20 + 20 + 10
    assert len(redis.data) == 50 and redis.data["t:k3"] == (b"newer", 20_000)
    assert redis.data["t:k49"] == (b"v49", 10_000) and c.l2_errors == 0


async def test_a_delete_cancels_a_write_still_gathering() -> None:
    """A token verified and, within the window, found bad (its re-verification failed) must
    not come back in Redis when the window ends."""
    redis = FakeRedis()
    c = tiered(redis)
    c.set_background("k", "v", 10)
    c.set_background("other", "v", 10)
    await c.delete("k")
    await c.aclose()
    assert "t:k" not in redis.data and "t:other" in redis.data


async def test_a_background_write_that_fails_is_dropped_and_counted() -> None:
    def encode(value: str) -> bytes:
        if value == "bad":
            raise ValueError("cannot encode")
        return value.encode()

    redis = FakeRedis()
    c = TieredCache(MemoryCache(10), redis, encode=encode, decode=bytes.decode, prefix="t:")  # type: ignore[arg-type]
    c.set_background("a", "ok", 10)
    c.set_background("b", "bad", 10)
    await c.aclose()
    assert redis.data == {"t:a": (b"ok", 10_000)} and c.l2_errors == 1
    redis.fail = True
    c.set_background("c", "v", 10)
    c.set_background("d", "v", 10)
    await c.aclose()
    assert c.l2_errors == 3 and c.get_nowait("d") == "v"  # L1 still has them
    redis.fail, redis.hang = False, True
    c.set_background("e", "v", 10)
    await c.aclose()  # bounded by l2_timeout: the hung pipeline is cancelled
    assert c.l2_errors == 4 and not c._pending


async def test_without_redis_it_is_l1_only() -> None:
    c = tiered(None)
    await c.set("k", "v", 10)
    assert await c.get("k") == "v"


async def test_a_call_that_failed_as_its_caller_was_cancelled_is_not_logged() -> None:
    """The call fails and, before its caller wakes to read the failure, the caller is
    cancelled (the plugin's deadline): the failure is still read, so asyncio does not log
    "Task exception was never retrieved" with a traceback to stderr."""
    redis = FakeRedis()
    c = tiered(redis)
    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    reader: asyncio.Task[Any] | None = None

    def fail_and_cancel_the_caller(transaction: bool = False) -> Any:
        assert reader is not None
        reader.cancel()
        raise ConnectionError("pool exhausted")

    redis.pipeline = fail_and_cancel_the_caller  # type: ignore[method-assign]
    try:
        reader = loop.create_task(c.get("k"))
        with pytest.raises(asyncio.CancelledError):
            await reader
        await asyncio.sleep(0)
        gc.collect()  # a task's unread failure is logged when the task is freed
        assert logged == []
    finally:
        loop.set_exception_handler(None)
