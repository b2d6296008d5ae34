"""The benchmark's reading of the rate limiter's batching histograms: deltas between two
/metrics scrapes, quantiles interpolated within buckets, and the report's table."""

from __future__ import annotations

import pytest

from bench import report
from bench.run import _batching

WAIT = "extproc_rate_limit_batch_wait_seconds"
SIZE = "extproc_rate_limit_batch_size"
BOUNDS = ("5e-05", "0.0001", "0.001", "0.01")


def scrape(waits: list[float], sizes: list[int]) -> dict[str, float]:
    """What the harness keeps of one /metrics scrape, for these cumulative observations."""
    out = {
        f'{WAIT}_bucket{{le="{le}"}}': float(sum(w <= float(le) for w in waits)) for le in BOUNDS
    }
    out[f'{WAIT}_bucket{{le="+Inf"}}'] = float(len(waits))
    out[f"{WAIT}_count"] = float(len(waits))
    out[f"{WAIT}_sum"] = sum(waits)
    out[f"{SIZE}_count"] = float(len(sizes))
    out[f"{SIZE}_sum"] = float(sum(sizes))
    return out


def test_only_the_sample_s_own_observations_count() -> None:
    earlier = [0.02] * 50  # before the sample: slow waits that must not leak into it
    during = [0.00001] * 60 + [0.0005] * 30 + [0.005] * 10
    before = scrape(earlier, [50])
    after = scrape(earlier + during, [50, 40, 40, 20])
    b = _batching(before, after)
    assert b is not None
    assert b["batches"] == 3
    assert b["ahead"] == 0  # no grant_ahead
    assert b["mean_batch"] == pytest.approx(100 / 3)
    assert b["wait_mean_us"] == pytest.approx(sum(during) / 100 * 1e6)
    # rank 50 of 100 falls in the first bucket (60 there): 50/60 of the way to 50 µs
    assert b["wait_p50_us"] == pytest.approx(50 * 50 / 60)
    # rank 99: 9 of the 10 in (1 ms, 10 ms]
    assert b["wait_p99_us"] == pytest.approx(1000 + 9000 * 9 / 10)


def test_requests_allowed_ahead_and_past_the_limit_are_summed_over_rules() -> None:
    ahead = "extproc_rate_limit_granted_ahead_total"
    over = "extproc_rate_limit_granted_ahead_over_limit_total"
    before = {**scrape([0.001], [1]), f'{ahead}{{rule="a"}}': 5.0, f'{over}{{rule="a"}}': 3.0}
    after = {
        **scrape([0.001] * 11, [1, 10]),
        f'{ahead}{{rule="a"}}': 12.0,
        f'{ahead}{{rule="b"}}': 2.0,
        f'{over}{{rule="a"}}': 7.0,
        f'{over}{{rule="b"}}': 1.0,
    }
    b = _batching(before, after)
    assert b is not None and b["ahead"] == 9 and b["over"] == 5


def test_no_round_trip_in_the_sample_or_no_admin_port_gives_nothing() -> None:
    same = scrape([0.001], [1])
    assert _batching(same, same) is None
    assert _batching({}, {}) is None


def test_report_table_shows_both_loads() -> None:
    batching = {
        "mean_batch": 24.0,
        "wait_mean_us": 1500.0,
        "wait_p50_us": 1200.0,
        "wait_p99_us": 9000.0,
        "round_trips_per_req": 0.041,
    }
    quiet = dict(batching, mean_batch=1.1, round_trips_per_req=0.9, wait_p99_us=400.0)
    data = {
        "settings": {"latency_rate": 1000.0},
        "summary": {
            "extproc": {"batching": None, "open_loop": {"batching": None}},
            "extproc-jwt-rl": {"batching": batching, "open_loop": {"batching": quiet}},
        },
    }
    lines = report._batching_table(data)
    rows = [ln for ln in lines if ln.startswith("| `")]
    assert rows == [
        "| `extproc-jwt-rl` | saturated (closed loop) | 0.041 | 24.0 | 1,500 | 1,200 | 9,000 | - |",
        "| `extproc-jwt-rl` | 1000 req/s | 0.900 | 1.1 | 1,500 | 1,200 | 400 | - |",
    ]
    # with grant_ahead: the share of requests allowed before Redis answered (median)
    ahead = [dict(batching, ahead_share=s) for s in (0.95, 0.99, 0.97)]
    chosen = report._batching([{"batching": b} for b in ahead])
    assert chosen is not None and chosen["ahead_share"] == pytest.approx(0.97)
    data["summary"]["extproc-jwt-rl"] = {"batching": chosen, "open_loop": {"batching": None}}
    rows = [ln for ln in report._batching_table(data) if ln.startswith("| `")]
    assert rows == [
        "| `extproc-jwt-rl` | saturated (closed loop) | 0.041 | 24.0 | 1,500 | 1,200 | 9,000 "
        "| 97.0 % |"
    ]
    assert report._batching_table({"settings": data["settings"], "summary": {}}) == []


async def test_the_scrape_keeps_what_the_tables_read() -> None:
    """The families the harness keeps, read from a real rate limiter's exposition."""
    from bench.run import _scraped
    from extproc.observability.metrics import Registry
    from extproc.testing.context import make_plugin_context
    from plugins.rate_limit import RateLimitConfig, RateLimitPlugin

    rule = {"name": "per_user", "key": ["header:k"], "limits": [{"requests": 5, "per": "second"}]}
    cfg = RateLimitConfig.model_validate({"rules": [rule]})
    registry = Registry()
    ctx = make_plugin_context("rate_limit", cfg, registry=registry)
    plugin = RateLimitPlugin(cfg)
    await plugin.initialize(ctx)
    try:
        kept = _scraped(registry.render_prometheus())
    finally:
        await plugin.shutdown()
        await ctx.http.aclose()
    assert 'extproc_rate_limit_granted_ahead_total{rule="per_user"}' in kept
    assert 'extproc_rate_limit_granted_ahead_over_limit_total{rule="per_user"}' in kept
    assert not any(name.startswith("extproc_rate_limit_decisions") for name in kept)


def test_the_hot_key_table() -> None:
    def sample(ok: int, over: float, seconds: float = 4.0) -> dict[str, object]:
        return {
            "rps": 3000.0, "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
            "cpu_us": {"envoy": 1.0, "sidecar": 2.0, "redis": 0.1},
            "redis_cmds_per_req": 0.1, "redis_round_trips_per_req": 0.01, "errors": 0,
            "client_errors": 12000 - ok, "requests": 12000, "duration_s": seconds,
            "statuses": {"200": ok, "429": 12000 - ok},
            "batching": {"round_trips_per_req": 0.01, "mean_batch": 9.0, "wait_mean_us": 1.0,
                         "wait_p50_us": 1.0, "wait_p99_us": 2.0, "over": over},
        }  # fmt: skip

    data = {
        "settings": {"latency_rate": 1000.0},
        "scenarios": [
            {"key": "extproc-jwt-rl", "title": "t"},
            {"key": "extproc-jwt-rl-ahead-hot-w2", "title": "h", "hot_limit": 1000},
        ],
        "rounds": [
            {"extproc-jwt-rl": sample(12000, 0), "extproc-jwt-rl-ahead-hot-w2": sample(4000, 8)},
            {"extproc-jwt-rl": sample(12000, 0), "extproc-jwt-rl-ahead-hot-w2": sample(4400, 20)},
        ],
    }
    summary = report.summarize(data)
    assert "hot" not in summary["extproc-jwt-rl"]
    hot = summary["extproc-jwt-rl-ahead-hot-w2"]["hot"]
    # 200s a second; 4 s touch at most 5 one-second windows; past the limit a second
    assert hot == {
        "limit_per_s": 1000.0, "allowed_per_s": 1050.0, "bound_per_s": 1250.0,
        "over_per_s": 3.5,
    }  # fmt: skip
    lines = report._hot_table({"summary": summary})
    assert lines[-1] == "| `extproc-jwt-rl-ahead-hot-w2` | 3,000 | 1,000 | 1,050 | 1,250 | 3.5 |"
    assert len([x for x in lines if x.startswith("| `")]) == 1
