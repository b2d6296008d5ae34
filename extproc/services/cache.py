"""Caches for plugins: a bounded in-process LRU with per-entry TTL, and a two-tier cache that
puts Redis behind it.

:class:`MemoryCache` is synchronous underneath (``*_nowait`` methods, O(1) each) so that a hot
path can use it without an ``await``; the async :class:`Cache` protocol on top is what plugins
program against, so a Redis-backed tier can stand in for it. :class:`TieredCache` never lets a
Redis failure reach its caller: a failed or slow L2 read is a miss, a failed L2 write is dropped
(and counted).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from extproc.context import time_left

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Cache", "MemoryCache", "TieredCache"]

V = TypeVar("V")
R = TypeVar("R")


class Cache(Protocol):
    """The cache interface plugins program against (``PluginContext.cache``). ``ttl`` is in
    seconds. Values are whatever the implementation can hold: any object for
    :class:`MemoryCache`, what its codec accepts for :class:`TieredCache`."""

    async def get(self, key: str) -> Any: ...

    async def set(self, key: str, value: Any, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...


class MemoryCache(Generic[V]):
    """A bounded LRU with a TTL per entry and an injected monotonic clock.

    Expired entries are dropped when touched and, past ``max_entries``, the least recently used
    entry is evicted: every operation is O(1). Not thread-safe (one event loop per process).
    """

    __slots__ = ("_clock", "_data", "evictions", "max_entries")

    def __init__(self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.evictions = 0

    # synchronous core ------------------------------------------------------------

    def get_nowait(self, key: str) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if self._clock() >= expires:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def get_with_ttl(self, key: str) -> tuple[V, float] | None:
        """:meth:`get_nowait` that also says how many seconds the entry has left."""
        item = self._data.get(key)
        if item is None:
            return None
        left = item[0] - self._clock()
        if left <= 0:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1], left

    def set_nowait(self, key: str, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1

    def delete_nowait(self, key: str) -> None:
        self._data.pop(key, None)

    def discard_where(self, predicate: Callable[[V], bool]) -> int:
        """Drop every entry whose value matches ``predicate``; O(n), for rare events (a key set
        changed), never per request. Returns how many were dropped."""
        doomed = [k for k, (_, v) in self._data.items() if predicate(v)]
        for k in doomed:
            del self._data[k]
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or ``None`` when absent/expired (does not touch LRU)."""
        item = self._data.get(key)
        if item is None:
            return None
        left = item[0] - self._clock()
        return left if left > 0 else None

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.ttl(key) is not None

    def __iter__(self) -> Iterator[str]:
        """The keys (a snapshot, expired ones included until touched)."""
        return iter(list(self._data))

    def keys(self) -> Iterator[str]:
        return iter(self)

    # Cache protocol ---------------------------------------------------------------

    async def get(self, key: str) -> V | None:
        return self.get_nowait(key)

    async def set(self, key: str, value: V, ttl: float) -> None:
        self.set_nowait(key, value, ttl)

    async def delete(self, key: str) -> None:
        self.delete_nowait(key)


class TieredCache(Generic[V]):
    """L1 :class:`MemoryCache` in front of an optional Redis (L2).

    Values cross into Redis through ``encode``/``decode`` (bytes); a value that fails to decode
    is a miss. L2 calls are bounded by ``l2_timeout`` and by half of what the running plugin
    has left; an L2 hit is copied into L1 for the TTL Redis reports (capped by ``l1_max_ttl``).

    A call that runs out of time is left behind, not cancelled: each runs in a task of its
    own that the caller stops waiting for. Cancelling a redis-py call mid-reply makes it drop
    the connection and hand it back to its pool under the pool's lock: loop turns that, on a
    busy worker, fell inside the plugin's own deadline (measured: jwt_auth's 20 ms token read
    ended 36-80 ms in, and the plugin's 50 ms deadline answered a valid token with a 503). A
    left-behind call ends by its own bound (``2 x l2_timeout``) and releases its connection
    then; the pool's size bounds how many there can be.
    """

    def __init__(
        self,
        l1: MemoryCache[V],
        redis: Redis | None = None,
        *,
        encode: Callable[[V], bytes],
        decode: Callable[[bytes], V],
        prefix: str = "extproc:cache:",
        l2_timeout: float = 0.05,
        l1_max_ttl: float = 300.0,
        write_window: float = 0.02,
        write_batch: int = 128,
    ) -> None:
        self.l1 = l1
        self.redis = redis
        self._encode = encode
        self._decode = decode
        self._prefix = prefix
        self._l2_timeout = l2_timeout
        self._l1_max_ttl = l1_max_ttl
        self._write_window = write_window
        self._write_batch = write_batch
        self.l2_errors = 0
        self.l2_hits = 0
        #: pipelines of background writes sent (each one Redis round trip)
        self.l2_write_batches = 0
        self._pending: set[asyncio.Task[Any]] = set()
        #: background writes waiting for the next pipeline, by key (a later one replaces)
        self._writes: dict[str, tuple[V, float]] = {}
        self._flusher: asyncio.Task[None] | None = None

    def get_nowait(self, key: str) -> V | None:
        return self.l1.get_nowait(key)

    async def _bounded(self, call: Callable[[], Awaitable[R]], budget: float) -> R:
        """``call()`` in a task, waited for at most ``budget`` seconds (TimeoutError past it);
        on time out or on the caller's cancellation the task goes on alone (see the class)."""
        task = asyncio.get_running_loop().create_task(self._alone(call))
        # read at the end whoever waits: the caller may be cancelled after the call failed
        # and before it woke to read the failure
        task.add_done_callback(_retrieve)
        try:
            await asyncio.wait((task,), timeout=budget)
        finally:
            if not task.done():
                self._keep(task)
        if not task.done():
            raise TimeoutError
        return task.result()

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a call nobody waits for until it ends (``aclose`` waits for them, briefly)."""
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _alone(self, call: Callable[[], Awaitable[R]]) -> R:
        async with asyncio.timeout(2 * self._l2_timeout):
            return await call()

    def _budget(self) -> float:
        # at most half of what the running plugin has left: a slow L2 must end as a miss the
        # plugin can still act on (verify the token itself), not as the plugin's own timeout
        return min(self._l2_timeout, time_left() / 2)

    async def get(self, key: str) -> V | None:
        value = self.l1.get_nowait(key)
        if value is not None or self.redis is None:
            return value
        budget = self._budget()
        if budget <= 0:
            return None
        redis, name = self.redis, self._prefix + key

        async def read() -> Any:
            pipe = redis.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            return await pipe.execute()

        try:
            raw, pttl = await self._bounded(read, budget)
        except Exception:  # L2 trouble is a miss, never an error
            self.l2_errors += 1
            return None
        if raw is None:
            return None
        try:
            value = self._decode(raw if isinstance(raw, bytes) else str(raw).encode())
        except Exception:
            self.l2_errors += 1
            return None
        ttl = pttl / 1000.0 if isinstance(pttl, int) and pttl > 0 else 0.0
        if ttl > 0:
            self.l1.set_nowait(key, value, min(ttl, self._l1_max_ttl))
        self.l2_hits += 1
        return value

    async def set(self, key: str, value: V, ttl: float) -> None:
        self.l1.set_nowait(key, value, min(ttl, self._l1_max_ttl))
        if self.redis is None or ttl <= 0:
            return
        budget = self._budget()
        if budget <= 0:
            return
        redis = self.redis
        try:
            data = self._encode(value)
            await self._bounded(
                lambda: redis.set(self._prefix + key, data, px=max(1, int(ttl * 1000))), budget
            )
        except Exception:
            self.l2_errors += 1

    def set_background(self, key: str, value: V, ttl: float) -> None:
        """L1 now, L2 later, in one pipeline with the other background writes of the next
        ``write_window`` (at most ``write_batch`` in a pipeline): the request does not wait
        for Redis, and a burst of new or refreshed entries costs a round trip, not one each."""
        self.l1.set_nowait(key, value, min(ttl, self._l1_max_ttl))
        if self.redis is None or ttl <= 0:
            return
        self._writes.pop(key, None)  # a later write replaces, and goes last
        self._writes[key] = (value, ttl)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_writes())
            self._keep(self._flusher)

    async def _flush_writes(self) -> None:
        try:
            await asyncio.sleep(self._write_window)
            while self._writes:
                keys = list(itertools.islice(self._writes, self._write_batch))
                await self._write_l2([(key, *self._writes.pop(key)) for key in keys])
        finally:
            self._flusher = None

    async def _write_l2(self, batch: list[tuple[str, V, float]]) -> None:
        """One pipeline of SETs. A write that fails (to encode, or with its pipeline) is
        dropped and counted. Nobody waits for it, so its bound cancels it outright."""
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        queued = 0
        for key, value, ttl in batch:
            try:
                data = self._encode(value)
            except Exception:
                self.l2_errors += 1
                continue
            pipe.set(self._prefix + key, data, px=max(1, int(ttl * 1000)))
            queued += 1
        if not queued:
            return
        self.l2_write_batches += 1
        try:
            async with asyncio.timeout(self._l2_timeout):
                await pipe.execute()
        except Exception:
            self.l2_errors += queued

    async def delete(self, key: str) -> None:
        self.l1.delete_nowait(key)
        if self.redis is None:
            return
        self._writes.pop(key, None)  # a write still gathering would bring it back
        redis = self.redis
        try:
            await self._bounded(lambda: redis.delete(self._prefix + key), self._budget())
        except Exception:
            self.l2_errors += 1
        # a read of the old L2 value that was in flight meanwhile may have copied it to L1
        self.l1.delete_nowait(key)

    async def aclose(self) -> None:
        """Wait (briefly) for background L2 writes, those still gathering included."""
        if self._pending:
            await asyncio.wait(
                list(self._pending), timeout=self._write_window + self._l2_timeout * 2
            )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A call nobody waits for: read its outcome so asyncio does not log it."""
    if not task.cancelled():
        task.exception()
