"""Where counters live: :class:`RedisStore` (one Lua script per batch) and :class:`LocalStore`
(the same decisions in this process). Both implement :class:`Store`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from extproc.deadlines import Deadline, loop_deadlines
from extproc.services.breaker import CircuitBreaker
from extproc.services.redis_pipe import PendingReply, RedisPipe, ReplyError, pack_command
from plugins.rate_limit.keys import Hit, Outcome, current, evaluate, next_state

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "SCRIPT",
    "SCRIPT_SHA",
    "Decided",
    "LocalStore",
    "RedisStore",
    "Store",
    "StoreUnavailableError",
]


class StoreUnavailableError(Exception):
    """The store could not decide (timeout, connection error, breaker open)."""


#: what a callback-shaped round trip (:meth:`RedisStore.start`) hands back: the outcomes, or
#: the :class:`StoreUnavailableError` that :meth:`RedisStore.acquire` would have raised
Decided = Callable[["list[list[Outcome]] | StoreUnavailableError"], None]

#: what a round trip's failure is, for the breaker and the metrics, and what the caller sees
_FAILURES: Final = (RedisError, ReplyError, OSError, ValueError, TypeError)


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    if isinstance(exc, TimeoutError):
        return StoreUnavailableError("redis timed out")
    return StoreUnavailableError(f"redis failed: {type(exc).__name__}")


class Store(Protocol):
    async def acquire(self, batch: Sequence[Sequence[Hit]], budget: float) -> list[list[Outcome]]:
        """Decide a batch of requests (each a sequence of hits) in order, within ``budget``
        seconds, or raise :class:`StoreUnavailableError`."""
        ...


# The script mirrors keys.evaluate step for step (see there for the rules). Integer division is
# corrected after the double division so that results stay exact for large operands.
SCRIPT: Final = r"""
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b) return -idiv(-a, b) end
local function nums(s)
  local t, n = {}, 0
  for v in string.gmatch(s, '[^,]+') do
    n = n + 1
    t[n] = tonumber(v)
  end
  return t, n
end
local spec = nums(ARGV[1])
local arg, nargs = nums(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + idiv(tonumber(t[2]), 1000)
local nk = #KEYS
local kind, lim, per, cur, dirty = {}, {}, {}, {}, {}
for i = 1, nk do
  local j = (i - 1) * 3
  kind[i] = spec[j + 1]
  lim[i] = spec[j + 2]
  per[i] = spec[j + 3]
  local s = redis.call('HMGET', KEYS[i], 'a', 'b')
  local c = 0
  if s[1] and s[2] then
    local a, b = tonumber(s[1]), tonumber(s[2])
    if kind[i] == 1 then
      c = b - (now - a) * lim[i]
      if c < 0 then c = 0 end
    elseif a == idiv(now, per[i]) then
      c = b
    end
  end
  cur[i] = c
end
local out = {}
local p = 1
while p <= nargs do
  local n = arg[p]
  p = p + 1
  local idx, cost, shadow, fits = {}, {}, {}, {}
  local ok = true
  for h = 1, n do
    local i = arg[p]
    idx[h] = i
    cost[h] = arg[p + 1]
    shadow[h] = arg[p + 2] == 1
    p = p + 3
    if kind[i] == 1 then
      fits[h] = cur[i] + cost[h] * per[i] <= per[i] * lim[i]
    else
      fits[h] = cur[i] + cost[h] <= lim[i]
    end
    if not fits[h] and not shadow[h] then ok = false end
  end
  local st = {}
  for h = 1, n do
    local i = idx[h]
    if not fits[h] then
      st[h] = 0
    elseif shadow[h] or ok then
      if kind[i] == 1 then cur[i] = cur[i] + cost[h] * per[i] else cur[i] = cur[i] + cost[h] end
      dirty[i] = true
      st[h] = 1
    else
      st[h] = 2
    end
  end
  for h = 1, n do
    local i = idx[h]
    local L, P, c = lim[i], per[i], cur[i]
    local rem, reset, retry, block = 0, 0, 0, 0
    if kind[i] == 1 then
      local cap = P * L
      rem = idiv(cap - c, P)
      reset = cdiv(c, L)
      if st[h] == 0 then retry = cdiv(c + cost[h] * P - cap, L) end
      if c + P > cap then block = cdiv(c + P - cap, L) end
    else
      reset = (idiv(now, P) + 1) * P - now
      rem = L - c
      if rem < 0 then rem = 0 end
      if st[h] == 0 then retry = reset end
      if c >= L then block = reset end
    end
    local k = #out
    out[k + 1] = string.format('%d,%d,%d,%d,%d', st[h], rem, reset, retry, block)
  end
end
for i = 1, nk do
  if dirty[i] then
    local a, ttl
    if kind[i] == 1 then
      a = now
      ttl = cdiv(cur[i], lim[i])
    else
      a = idiv(now, per[i])
      ttl = (a + 1) * per[i] - now
    end
    if ttl > 0 then
      redis.call('HSET', KEYS[i], 'a', string.format('%d', a), 'b', string.format('%d', cur[i]))
      redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl))
    end
  end
end
return table.concat(out, ',')
"""

SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()
_FIELDS: Final = 5


def _script_args(batch: Sequence[Sequence[Hit]]) -> tuple[list[str], str, str]:
    """KEYS (each distinct key once) and the two ARGV strings, comma-separated integers: per
    key its kind, limit and period; per request the number of hits, then key index, cost and
    shadow flag of each. Two strings instead of eight arguments per hit: packing each argument
    is most of a large batch's client CPU (redis-py encodes them one by one)."""
    index: dict[str, int] = {}
    keys: list[str] = []
    specs: list[int] = []
    tail: list[int] = []
    for hits in batch:
        tail.append(len(hits))
        for h in hits:
            i = index.get(h.key)
            if i is None:
                i = index[h.key] = len(keys) + 1
                keys.append(h.key)
                specs += (1 if h.gcra else 0, h.limit, h.period_ms)
            tail += (i, h.cost, 1 if h.shadow else 0)
    return keys, ",".join(map(str, specs)), ",".join(map(str, tail))


def _parse(batch: Sequence[Sequence[Hit]], reply: object) -> list[list[Outcome]]:
    """The script's reply, five comma-separated integers per hit (status, remaining, reset,
    retry after, block), back into outcomes, in the batch's order."""
    if isinstance(reply, str):
        reply = reply.encode()
    if not isinstance(reply, bytes):
        raise ValueError("unexpected script reply type")
    raw = [int(v) for v in reply.split(b",")] if reply else []
    out: list[list[Outcome]] = []
    p = 0
    for hits in batch:
        decided = []
        for _ in hits:
            decided.append(Outcome(*raw[p : p + _FIELDS]))
            p += _FIELDS
        out.append(decided)
    if p != len(raw):
        raise ValueError("unexpected script reply length")
    return out


class RedisStore:
    """Counters in Redis: a whole batch is one ``EVALSHA`` (``EVAL`` after ``NOSCRIPT``), the
    time is Redis' own (``TIME`` in the script), every call is bounded by ``budget`` and goes
    through ``breaker``. A cancelled call makes redis-py drop its connection (it disconnects on
    any exception while sending or reading), so a late reply is never read by the next call.

    A lost connection (Redis restarted, a proxy closed it) drops every idle connection of the
    pool too: they went stale together, and each would otherwise fail one more request
    (a fail-closed 503) on its first use.

    With ``pipe`` (:class:`~extproc.services.redis_pipe.RedisPipe`) the script goes over one
    pipelined connection instead of the pool: a timed-out call leaves its reply to be read and
    dropped there, and a lost connection is reopened by the pipe itself.

    A batch must live on one node: with Redis Cluster, group it by the keys' hash-tag slot first
    (not done yet: the sidecar talks to one Redis).
    """

    def __init__(
        self,
        redis: Redis,
        breaker: CircuitBreaker,
        *,
        on_round_trip: Callable[[str, int], None] | None = None,
        pipe: RedisPipe | None = None,
    ) -> None:
        self._redis = redis
        self._pipe = pipe
        self.breaker = breaker
        self._on_round_trip = on_round_trip
        self._dropping: asyncio.Task[None] | None = None

    async def acquire(self, batch: Sequence[Sequence[Hit]], budget: float) -> list[list[Outcome]]:
        if not batch:
            return []
        refused = self._refused(budget)
        if refused is not None:
            raise refused
        keys, specs, requests = _script_args(batch)
        outcome = "error"
        loop = asyncio.get_running_loop()
        try:
            with loop_deadlines(loop).timeout(loop.time() + budget):  # no timer of its own
                if self._pipe is not None:
                    raw = await self._run_piped(keys, specs, requests)
                else:
                    raw = await self._run_pooled(keys, specs, requests)
            result = _parse(batch, raw)
            outcome = "ok"
        except TimeoutError as exc:
            outcome = "timeout"
            raise _unavailable(exc) from exc
        except _FAILURES as exc:
            if self._pipe is None and isinstance(exc, RedisConnectionError | OSError):
                self._drop_idle_connections()
            raise _unavailable(exc) from exc
        except BaseException:
            outcome = "cancelled"  # a failure too: never leave a half-open trial pending
            raise
        finally:
            self._settled(outcome, len(batch))
        return result

    def start(self, batch: Sequence[Sequence[Hit]], budget: float, done: Decided) -> bool:
        """:meth:`acquire` shaped as a callback, over the pipe's open connection: ``done`` gets
        the outcomes, or the :class:`StoreUnavailableError` that ``acquire`` would raise, from
        the read that brings the reply (one loop turn sooner than an awaiting task) or from the
        deadline. The same breaker, ``NOSCRIPT`` fallback and round-trip counting. ``False``:
        nothing was sent (no pipe, or no open connection yet): use :meth:`acquire`."""
        if self._pipe is None or not self._pipe.usable():
            return False
        if not batch:
            done([])
            return True
        refused = self._refused(budget)
        if refused is not None:
            done(refused)
            return True
        call = _PipedCall(self, batch, done)
        call.send("EVALSHA", SCRIPT_SHA)
        if call.pending is not None:  # sent, not failed at once
            loop = asyncio.get_running_loop()
            call.deadline = loop_deadlines(loop).at(loop.time() + budget, call.expire)
        return True

    def _refused(self, budget: float) -> StoreUnavailableError | None:
        """Why a round trip may not start now (no time left, breaker open), or ``None``."""
        if budget <= 0:
            return StoreUnavailableError("no time left")
        if not self.breaker.allow():
            return StoreUnavailableError("redis breaker open")
        return None

    def _settled(self, outcome: str, size: int) -> None:
        """A round trip ended (``ok`` or how it failed): tell the breaker and the metrics."""
        if outcome == "ok":
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
        if self._on_round_trip is not None:
            self._on_round_trip(outcome, size)

    async def warm(self, within: float) -> None:
        """Open the connection and load the script before a request needs them: a TLS
        handshake or a distant Redis can take longer than one decision's budget, and the
        first requests would get their rules' fail policy. Raises
        :class:`StoreUnavailableError` (the caller logs it; requests try again)."""
        try:
            async with asyncio.timeout(within):
                if self._pipe is not None:
                    await self._pipe.execute("SCRIPT", "LOAD", SCRIPT)
                else:
                    await self._redis.execute_command(  # type: ignore[no-untyped-call]
                        "SCRIPT", "LOAD", SCRIPT
                    )
        except (RedisError, ReplyError, OSError) as exc:  # TimeoutError is an OSError
            raise _unavailable(exc) from exc

    @property
    def pipelined(self) -> bool:
        return self._pipe is not None

    async def _run_piped(self, keys: list[str], specs: str, requests: str) -> object:
        assert self._pipe is not None
        try:
            return await self._pipe.execute_packed(
                pack_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, specs, requests)
            )
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._pipe.execute_packed(
            pack_command("EVAL", SCRIPT, len(keys), *keys, specs, requests)
        )

    async def _run_pooled(self, keys: list[str], specs: str, requests: str) -> object:
        try:
            return await self._redis.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", SCRIPT_SHA, len(keys), *keys, specs, requests
            )
        except NoScriptError:
            evaluate_script = self._redis.execute_command
            return await evaluate_script(  # type: ignore[no-untyped-call]
                "EVAL", SCRIPT, len(keys), *keys, specs, requests
            )

    def _drop_idle_connections(self) -> None:
        if self._dropping is not None and not self._dropping.done():
            return
        pool = getattr(self._redis, "connection_pool", None)
        if pool is None:
            return

        async def drop() -> None:
            # closing a dead socket may fail too; it is closed either way
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=False)

        self._dropping = asyncio.get_running_loop().create_task(drop())

    async def aclose(self) -> None:
        """Close the pipe, and wait for a drop of stale connections that is still running
        (the shared client itself belongs to the server, which closes it)."""
        if self._pipe is not None:
            await self._pipe.aclose()
        if self._dropping is not None:
            with contextlib.suppress(Exception):
                await self._dropping


class _PipedCall:
    """One :meth:`RedisStore.start` round trip: ``EVALSHA`` (``EVAL`` after ``NOSCRIPT``) sent
    on the pipe, settled exactly once - by the reply, the connection's end, or the deadline."""

    __slots__ = ("args", "batch", "deadline", "done", "pending", "store")

    def __init__(self, store: RedisStore, batch: Sequence[Sequence[Hit]], done: Decided) -> None:
        self.store = store
        self.batch = batch
        self.done: Decided | None = done
        keys, specs, requests = _script_args(batch)
        self.args: tuple[Any, ...] = (len(keys), *keys, specs, requests)
        self.pending: PendingReply | None = None
        self.deadline: Deadline | None = None

    def send(self, *command: str) -> None:
        """Send ``command`` + the script's arguments; settled at once (an error) when it
        cannot go: too many commands waiting, or the connection is gone."""
        assert self.store._pipe is not None
        try:
            self.pending = self.store._pipe.send_nowait(
                pack_command(*command, *self.args), self.reply
            )
        except ConnectionError as exc:
            self.pending = None
            self.settle("error", _unavailable(exc))
            return
        if self.pending is None:
            self.settle("error", _unavailable(ConnectionError("Redis connection lost")))

    def reply(self, reply: object, exc: BaseException | None) -> None:
        if self.done is None:
            return
        if isinstance(exc, ReplyError) and str(exc).startswith("NOSCRIPT"):
            self.send("EVAL", SCRIPT)  # Redis lost its scripts (restarted, flushed)
            return
        if exc is not None:
            self.settle("error", _unavailable(exc))
            return
        try:
            decided = _parse(self.batch, reply)
        except (ValueError, TypeError) as bad:
            self.settle("error", _unavailable(bad))
            return
        self.settle("ok", decided)

    def expire(self) -> None:
        if self.pending is not None:
            self.pending.cancel()  # its reply is read when it comes, and dropped
        self.settle("timeout", StoreUnavailableError("redis timed out"))

    def settle(self, outcome: str, result: list[list[Outcome]] | StoreUnavailableError) -> None:
        done, self.done = self.done, None
        if done is None:
            return
        if self.deadline is not None:
            self.deadline.cancel()
        self.store._settled(outcome, len(self.batch))
        done(result)


class LocalStore:
    """The same decisions in this process (one worker): counters in a bounded dict.

    ``clock_ms`` gives Unix milliseconds (fixed windows align to the epoch as in Redis). When
    ``max_keys`` is reached, expired keys are swept; if that is not enough the oldest keys are
    dropped (their counts are lost: those clients may get extra permits).
    """

    def __init__(self, clock_ms: Callable[[], int], max_keys: int = 1_000_000) -> None:
        self._clock_ms = clock_ms
        self._max_keys = max_keys
        self._states: dict[str, tuple[int, int, int]] = {}  # key -> (a, b, expires_at_ms)

    def __len__(self) -> int:
        return len(self._states)

    async def acquire(self, batch: Sequence[Sequence[Hit]], budget: float) -> list[list[Outcome]]:
        return self.decide(batch)

    def decide(self, batch: Sequence[Sequence[Hit]]) -> list[list[Outcome]]:
        now = self._clock_ms()
        counters: dict[str, int] = {}
        specs: dict[str, Hit] = {}
        for hits in batch:
            for h in hits:
                if h.key in counters:
                    continue
                st = self._states.get(h.key)
                state = None if st is None or st[2] <= now else (st[0], st[1])
                counters[h.key] = current(h, state, now)
                specs[h.key] = h
        before = dict(counters)
        result = evaluate(batch, now, counters)
        for key, value in counters.items():
            if value != before[key]:
                (a, b), ttl = next_state(specs[key], value, now)
                if ttl > 0:
                    self._put(key, (a, b, now + ttl), now)
        return result

    def _put(self, key: str, value: tuple[int, int, int], now: int) -> None:
        states = self._states
        if key not in states and len(states) >= self._max_keys:
            for k in [k for k, v in states.items() if v[2] <= now]:
                del states[k]
            if len(states) >= self._max_keys:
                for k in list(states)[: max(1, self._max_keys // 10)]:
                    del states[k]
        states[key] = value
