"""The grant_ahead ledger: what one worker may allow before Redis answers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from plugins.rate_limit import RateLimitConfig
from plugins.rate_limit.ahead import Ledger
from plugins.rate_limit.keys import GRANTED, OVER_LIMIT, Hit, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hit(key: str = "a", cost: int = 1, limit: int = 100) -> Hit:
    return Hit(key, False, limit, 60_000, cost)


def answer(remaining: int, status: int = GRANTED, reset_ms: int = 30_000) -> Outcome:
    return Outcome(status, remaining, reset_ms, 0, 0)


def ledger(clock: Clock, share: float = 0.5, max_age: float = 10.0, max_keys: int = 100) -> Ledger:
    return Ledger(share=share, max_age=max_age, max_keys=max_keys, clock=clock)


def learnt(book: Ledger, key: str, remaining: int) -> None:
    """Redis answered one hit of ``key`` with ``remaining``."""
    book.owe([hit(key)])
    book.learn([[hit(key)]], [[answer(remaining)]])


def test_unknown_keys_go_through_redis() -> None:
    book = ledger(Clock())
    assert book.grant([hit()], 100.0) is None
    book.owe([hit()])  # sent, not answered yet: still unknown
    assert book.grant([hit()], 100.0) is None


def test_grants_up_to_share_of_the_known_remaining_minus_what_is_owed() -> None:
    clock = Clock()
    book = ledger(clock, share=0.5)
    learnt(book, "a", 10)
    for _ in range(5):  # 0.5 x 10
        assert book.grant([hit()], clock.now) is not None
    assert book.grant([hit()], clock.now) is None
    k = book.get("a")
    assert k is not None and k.owed == 5 and k.remaining == 10
    # a request sent through Redis meanwhile is owed too, and leaves less to grant
    book.owe([hit()])
    assert k.owed == 6
    # Redis answers the six in one batch, in order: remaining 9 .. 4; all owed are settled
    book.learn([[hit()]] * 6, [[answer(r)] for r in range(9, 3, -1)])
    assert k.owed == 0 and k.remaining == 4
    assert book.grant([hit()], clock.now) is not None  # 1 <= 0.5 x 4
    assert book.grant([hit()], clock.now) is not None  # 2 <= 2
    assert book.grant([hit()], clock.now) is None


def test_share_one_never_grants_past_the_remaining() -> None:
    clock = Clock()
    book = ledger(clock, share=1.0)
    learnt(book, "a", 3)
    granted = sum(book.grant([hit()], clock.now) is not None for _ in range(10))
    assert granted == 3


def test_cost_counts_and_a_request_is_all_or_nothing() -> None:
    clock = Clock()
    book = ledger(clock, share=1.0)
    learnt(book, "a", 10)
    learnt(book, "b", 2)
    assert book.grant([hit("a", cost=4), hit("b", cost=3)], clock.now) is None
    a, b = book.get("a"), book.get("b")
    assert a is not None and b is not None and a.owed == 0 and b.owed == 0  # nothing owed
    assert book.grant([hit("a", cost=4), hit("b", cost=2)], clock.now) is not None
    assert (a.owed, b.owed) == (4, 2)


def test_old_knowledge_is_not_used() -> None:
    clock = Clock()
    book = ledger(clock, max_age=2.0)
    learnt(book, "a", 50)
    clock.now += 1.9
    assert book.grant([hit()], clock.now) is not None
    clock.now += 0.2
    assert book.grant([hit()], clock.now) is None


def test_a_failed_round_trip_forgets_its_keys_and_an_unsent_one_does_not() -> None:
    clock = Clock()
    book = ledger(clock)
    learnt(book, "a", 50)
    assert book.grant([hit()], clock.now) is not None
    book.dropped([hit()])  # never sent: no longer owed, the count is still known
    k = book.get("a")
    assert k is not None and k.owed == 0 and k.remaining == 50
    assert book.grant([hit()], clock.now) is not None
    book.forget([[hit()]])  # failed (or answered out of order): unknown until Redis answers
    assert k.owed == 0 and k.remaining is None
    assert book.grant([hit()], clock.now) is None


def test_an_over_limit_answer_stops_grants() -> None:
    clock = Clock()
    book = ledger(clock, share=1.0)
    learnt(book, "a", 5)
    book.owe([hit(cost=1)])
    book.learn([[hit()]], [[answer(0, status=OVER_LIMIT)]])  # another worker took the rest
    assert book.grant([hit()], clock.now) is None


def test_the_latest_answer_in_a_batch_wins_and_reset_is_kept() -> None:
    clock = Clock()
    book = ledger(clock)
    book.owe([hit()])
    book.owe([hit()])
    book.learn([[hit()], [hit()]], [[answer(8, reset_ms=5_000)], [answer(7, reset_ms=4_000)]])
    k = book.get("a")
    assert k is not None and (k.remaining, k.owed, k.reset_at) == (7, 0, 104.0)


def test_room_is_made_from_keys_owing_nothing() -> None:
    clock = Clock()
    book = ledger(clock, max_keys=10, max_age=5.0)
    for i in range(5):
        learnt(book, f"old{i}", 10)
    clock.now += 6.0  # the five above are now too old to use
    book.owe([hit("owed")])  # in flight: must stay whatever happens
    for i in range(4):
        learnt(book, f"new{i}", 10)
        clock.now += 0.01
    assert len(book) == 10
    learnt(book, "one-more", 10)  # full: the old ones go first
    assert len(book) == 6
    assert book.get("old0") is None and book.get("owed") is not None
    for i in range(10):
        learnt(book, f"more{i}", 10)
        clock.now += 0.01
    # full of current keys: the oldest learnt go, down to nine tenths; the owed key stays
    assert len(book) <= 10
    assert book.get("owed") is not None and book.get("owed").owed == 1  # type: ignore[union-attr]
    assert book.get("new0") is None and book.get("more9") is not None


def _answered_every(
    book: Ledger, clock: Clock, remaining: int, others: int, n: int, every: float = 0.01
) -> int:
    """``n`` answers ``every`` seconds apart to one hit of ours each, the others spending
    ``others`` between two of them; returns the last remaining."""
    for _ in range(n):
        clock.now += every
        remaining -= 1 + others
        book.owe([hit()])
        book.learn([[hit()]], [[answer(remaining)]])
    return remaining


def test_what_the_others_spend_is_learnt_and_kept_out_of_grants() -> None:
    clock = Clock()
    book = Ledger(share=1.0, max_age=10.0, max_keys=100, clock=clock, lag=0.1)
    learnt(book, "a", 1_000)
    # others spend 1 every 10 ms (100 a second) between our answers, for 0.4 s
    remaining = _answered_every(book, clock, 1_000, others=1, n=40)
    k = book.get("a")
    assert k is not None and remaining == 920
    assert 90 < k.others < 110  # a decayed average: about 100 a second
    # 20 ms after the last answer, with 100 ms until a hit runs: about 12 fewer to grant
    clock.now += 0.02
    expected = int(remaining - k.others * 0.12)
    granted = sum(book.grant([hit()], clock.now) is not None for _ in range(1_000))
    assert granted == expected and remaining - 14 <= granted <= remaining - 10
    # without the others' rate the same answers would let all 920 go
    alone = Ledger(share=1.0, max_age=10.0, max_keys=100, clock=clock, lag=0.1)
    learnt(alone, "a", 920)
    assert sum(alone.grant([hit()], clock.now) is not None for _ in range(1_000)) == 920


def test_alone_the_rate_stays_zero_and_a_window_reset_is_not_spending() -> None:
    clock = Clock()
    book = Ledger(share=0.5, max_age=10.0, max_keys=100, clock=clock, lag=0.1)
    learnt(book, "a", 100)
    remaining = _answered_every(book, clock, 100, others=0, n=20)  # only our own hits
    k = book.get("a")
    assert k is not None and k.others == 0.0 and remaining == 80
    clock.now += 0.05
    book.owe([hit()])
    book.learn([[hit()]], [[answer(99)]])  # a new window: the count went up
    assert k.others == 0.0
    assert sum(book.grant([hit()], clock.now) is not None for _ in range(100)) == 49


def test_a_spender_that_stops_fades_within_a_few_tenths_of_a_second() -> None:
    clock = Clock()
    book = Ledger(share=1.0, max_age=60.0, max_keys=100, clock=clock)
    learnt(book, "a", 1_000)
    _answered_every(book, clock, 1_000, others=1, n=40)
    k = book.get("a")
    assert k is not None
    busy = k.others
    remaining = _answered_every(book, clock, k.remaining or 0, others=0, n=30)  # 0.3 s alone
    assert k.others < busy * 0.06 and remaining == k.remaining


def test_spending_seen_after_a_long_gap_is_spread_over_it() -> None:
    clock = Clock()
    book = Ledger(share=1.0, max_age=60.0, max_keys=100, clock=clock)
    learnt(book, "a", 10_000)
    clock.now += 5.0
    book.owe([hit()])
    book.learn([[hit()]], [[answer(10_000 - 1 - 500)]])  # others: 500 in 5 s
    k = book.get("a")
    assert k is not None and k.others == pytest.approx(100.0)  # not 500 at once


def _cfg(**extra: object) -> RateLimitConfig:
    rule = {"name": "a", "key": ["header:k"], "limits": [{"requests": 10, "per": "second"}]}
    return RateLimitConfig.model_validate({"rules": [rule], **extra})


def test_config() -> None:
    assert _cfg().grant_ahead.enabled is False
    cfg = _cfg(grant_ahead={"enabled": True})
    ahead = cfg.grant_ahead
    assert (ahead.share, ahead.max_age_ms, ahead.flush_ms) == (0.5, 10_000.0, 5.0)
    with pytest.raises(ValidationError, match="redis_pipeline"):
        _cfg(grant_ahead={"enabled": True}, redis_pipeline=False)
    bad_values = ({"share": 0}, {"share": 1.5}, {"max_age_ms": 0}, {"max_keys": 0})
    for bad in (*bad_values, {"flush_ms": -1}, {"flush_ms": 101}):
        with pytest.raises(ValidationError):
            _cfg(grant_ahead={"enabled": True, **bad})
