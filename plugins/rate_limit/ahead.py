"""What one worker knows of its keys' counts in Redis, for ``grant_ahead``
(:class:`~plugins.rate_limit.config.GrantAheadConfig`).

Per key: the ``remaining`` of Redis' latest answer, when it came, and ``owed``: the cost of
this worker's hits sent, queued or gathered since, not yet answered. Every hit is owed from
the moment it is allowed ahead (:meth:`Ledger.grant`) or submitted through Redis
(:meth:`Ledger.owe`) until its answer (:meth:`Ledger.learn`), its failure
(:meth:`Ledger.forget`) or its removal unsent (:meth:`Ledger.dropped`). A request may be
granted ahead when each of its hits fits in ``share x remaining - owed``.

Why that is exact for one worker alone: Redis runs this worker's hits in the order they were
sent and answers on one connection in that order, so the latest answer counts every hit sent
before it and ``owed`` every hit after it; only time (a window's end, a bucket's leak) moves
the true count the other way. Answers must be learnt in that order: a round trip settled by
a task a loop turn after its reply was read may come after a later one's, so it is only
``forget``-ed (the key goes through Redis until the next answer).

With other workers or sidecars counting the same key, what Redis last said leaves out their
hits since, and those they make before this worker's hit lands. So each key also keeps how
fast the others spend it (``others``, cost per second): between two answers in send order
this worker's own hits are exactly those answered, so whatever else the count fell by was
theirs, spent over the time between the answers. That rate, an exponential average with a
time constant of ``_RATE_TAU`` seconds, times the age of the answer plus ``lag`` (the
others' hits gathered or in flight when Redis answered, and this hit's own way there), is
taken off the remaining before ``share`` applies. Alone, nobody else lowers the count, the
rate stays 0, and the rule is the one above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from plugins.rate_limit.keys import Hit, Outcome

__all__ = ["Known", "Ledger"]

#: seconds over which the others' spending of a key is averaged: short enough to follow
#: a burst that spends a one-second window's limit in a fraction of it
_RATE_TAU = 0.1


class Known:
    """One key: Redis' latest ``remaining`` (``None``: unknown), when it was learnt and when
    the key's window resets, both on the ledger's clock, the cost ``owed`` since, and how
    fast other workers spend it (``others``, cost per second, as of ``at``)."""

    __slots__ = ("at", "others", "owed", "remaining", "reset_at")

    def __init__(self) -> None:
        self.remaining: int | None = None
        self.at = 0.0
        self.reset_at = 0.0
        self.owed = 0
        self.others = 0.0


class Ledger:
    """The keys one worker has sent to Redis (about ``max_keys`` at most: only keys owing
    nothing are dropped), and the rule that allows a request ahead (:meth:`grant`)."""

    def __init__(
        self,
        *,
        share: float,
        max_age: float,
        max_keys: int,
        clock: Callable[[], float],
        lag: float = 0.0,
    ) -> None:
        self.share = share
        self.max_age = max_age
        self.max_keys = max_keys
        #: seconds of the others' spending a grant must leave beyond the answer's age: what
        #: they had gathered or in flight when Redis answered, and this hit's way to Redis
        self.lag = lag
        self._clock = clock
        self._keys: dict[str, Known] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key: str) -> Known | None:
        return self._keys.get(key)

    def grant(self, hits: Sequence[Hit], now: float) -> list[Known] | None:
        """Owe ``hits`` and return their keys' entries when every hit fits in what is known;
        else ``None`` (nothing owed: the request goes through Redis)."""
        keys = self._keys
        entries = []
        share, oldest = self.share, now - self.max_age
        for h in hits:
            k = keys.get(h.key)
            if k is None or k.remaining is None or k.at < oldest:
                return None
            left: float = k.remaining
            if k.others:  # what the others spend before this hit runs
                left -= k.others * (now - k.at + self.lag)
            if k.owed + h.cost > share * left:
                return None
            entries.append(k)
        for k, h in zip(entries, hits, strict=True):
            k.owed += h.cost
        return entries

    def owe(self, hits: Sequence[Hit]) -> None:
        """``hits`` were submitted to Redis."""
        keys = self._keys
        for h in hits:
            k = keys.get(h.key)
            if k is None:
                if len(keys) >= self.max_keys:
                    self._shrink()
                k = keys[h.key] = Known()
            k.owed += h.cost

    def learn(self, batch: Sequence[Sequence[Hit]], outcomes: Sequence[Sequence[Outcome]]) -> None:
        """Redis answered ``batch`` (answers learnt in the order Redis ran them)."""
        now = self._clock()
        keys = self._keys
        for hits, decided in zip(batch, outcomes, strict=True):
            for h, o in zip(hits, decided, strict=True):
                k = keys.get(h.key)
                if k is None:  # not owed here (cannot happen: owed keys are kept)
                    continue
                k.owed -= h.cost
                if k.remaining is not None and now > k.at:
                    # in send order, this hit is the only one of ours Redis ran since the
                    # last answer: the rest of the fall was the others' (a window that
                    # reset or a bucket that leaked makes it negative: nothing), at an even
                    # rate over the time since, folded into the average for that time
                    spent = max(0, k.remaining - h.cost - o.remaining)
                    elapsed = now - k.at
                    kept = math.exp(-elapsed / _RATE_TAU)
                    k.others = k.others * kept + spent / elapsed * (1.0 - kept)
                k.remaining = o.remaining
                k.at = now
                k.reset_at = now + o.reset_ms / 1000.0

    def forget(self, batch: Sequence[Sequence[Hit]]) -> None:
        """``batch`` failed, or its answer may be out of order: it is no longer owed, and its
        keys' counts are unknown until Redis answers again."""
        keys = self._keys
        for hits in batch:
            for h in hits:
                k = keys.get(h.key)
                if k is not None:
                    k.owed -= h.cost
                    k.remaining = None

    def dropped(self, hits: Sequence[Hit]) -> None:
        """``hits`` left the queue unsent: no longer owed, nothing learnt."""
        keys = self._keys
        for h in hits:
            k = keys.get(h.key)
            if k is not None:
                k.owed -= h.cost

    def _shrink(self) -> None:
        """Make room: drop keys owing nothing, those unknown or too old first, then the
        oldest learnt, down to nine tenths of ``max_keys``. Keys with hits owed stay (they
        are bounded by the batcher's queue)."""
        keys = self._keys
        oldest = self._clock() - self.max_age
        for key in [
            key for key, k in keys.items() if not k.owed and (k.remaining is None or k.at < oldest)
        ]:
            del keys[key]
        target = self.max_keys * 9 // 10
        if len(keys) <= target:
            return
        idle = sorted((k.at, key) for key, k in keys.items() if not k.owed)
        for _, key in idle[: len(keys) - target]:
            del keys[key]
