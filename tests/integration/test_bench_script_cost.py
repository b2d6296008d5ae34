"""``bench.script_cost`` against a real redis-server: the rate limiter's script costs Redis
more than ``INCR`` per call, and less per request in a batch."""

from __future__ import annotations

import pytest

from bench.script_cost import measure, table
from extproc.testing.redis_server import RedisServer

pytestmark = pytest.mark.redis


def test_the_script_costs_more_than_incr_and_less_per_request_in_a_batch() -> None:
    with RedisServer() as server:
        results = measure(server, calls=300, repeats=1, batches=(1, 50))
    one, fifty = results["rate limiter, batch of 1"], results["rate limiter, batch of 50"]
    assert (one["requests"], fifty["requests"]) == (1, 50)
    # measured: ~27 against ~1.3 µs in the command, and ~9 per request in batches of 100
    assert one["in_command_us"] > 3 * results["INCR"]["in_command_us"]
    assert fifty["in_command_us"] / 50 < one["in_command_us"]
    assert "| rate limiter, batch of 50 | 50 |" in table(results)


def test_a_batch_larger_than_the_key_set_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.script_cost import KEYS, main

    for batches in ("0", f"10,{KEYS + 1}"):
        with pytest.raises(SystemExit):
            main(["--batches", batches])
        assert "each from 1 to" in capsys.readouterr().err
