"""The benchmark's reading of the plugin hooks' duration histogram: per plugin, only the
request-headers phase, only the sample's own observations, and the report's table."""

from __future__ import annotations

import pytest

from bench import report
from bench.run import _hooks

FAMILY = "extproc_plugin_duration_seconds"
BOUNDS = ("5e-05", "0.0001", "0.001", "0.01")


def scrape(durations: dict[tuple[str, str], list[float]]) -> dict[str, float]:
    """What the harness keeps of one /metrics scrape: the sidecar renders ``le`` first."""
    out: dict[str, float] = {}
    for (plugin, phase), seen in durations.items():
        labels = f'phase="{phase}",plugin="{plugin}"'
        for le in BOUNDS:
            out[f'{FAMILY}_bucket{{le="{le}",{labels}}}'] = float(sum(d <= float(le) for d in seen))
        out[f'{FAMILY}_bucket{{le="+Inf",{labels}}}'] = float(len(seen))
        out[f"{FAMILY}_count{{{labels}}}"] = float(len(seen))
        out[f"{FAMILY}_sum{{{labels}}}"] = sum(seen)
    return out


def test_each_plugin_s_request_headers_hook_during_the_sample() -> None:
    earlier = {("rate_limit", "request_headers"): [0.02] * 50}
    during = [0.00003] * 50 + [0.0004] * 49 + [0.005]
    before = scrape(earlier | {("jwt_auth", "request_headers"): []})
    after = scrape(
        {
            ("rate_limit", "request_headers"): earlier[("rate_limit", "request_headers")] + during,
            ("jwt_auth", "request_headers"): [0.00002] * 100,
            ("headers", "response_headers"): [0.001] * 10,  # another phase: not reported
        }
    )
    hooks = _hooks(before, after)
    assert set(hooks) == {"rate_limit", "jwt_auth"}
    rl = hooks["rate_limit"]
    assert rl["mean_us"] == pytest.approx(sum(during) / 100 * 1e6)
    assert rl["p50_us"] == pytest.approx(50.0)  # rank 50: the top of the first bucket
    # rank 99 of 100 falls in (0.1 ms, 1 ms], which holds ranks 51-99: its top
    assert rl["p99_us"] == pytest.approx(1000.0)
    assert hooks["jwt_auth"]["p99_us"] < 50


def test_no_admin_port_or_no_request_gives_nothing() -> None:
    assert _hooks({}, {}) == {}
    same = scrape({("jwt_auth", "request_headers"): [0.001]})
    assert _hooks(same, same) == {}


def test_report_table_has_a_row_per_plugin_and_load() -> None:
    hook = {"mean_us": 300.0, "p50_us": 250.0, "p99_us": 1200.0}
    data = {
        "settings": {"latency_rate": 1000.0},
        "summary": {
            "passthrough": {"hooks": {}, "open_loop": {"hooks": {}}},
            "extproc-jwt-rl": {
                "hooks": {"rate_limit": hook},
                "open_loop": {"hooks": {"rate_limit": dict(hook, p99_us=900.0)}},
            },
        },
    }
    rows = [ln for ln in report._hooks_table(data) if ln.startswith("| `")]
    assert rows == [
        "| `extproc-jwt-rl` | saturated (closed loop) | rate_limit | 300 | 250 | 1,200 |",
        "| `extproc-jwt-rl` | 1000 req/s | rate_limit | 300 | 250 | 900 |",
    ]
    assert report._hooks_table({"settings": data["settings"], "summary": {}}) == []
