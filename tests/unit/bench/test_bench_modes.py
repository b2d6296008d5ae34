"""The harness's modes: the quick one fits in a minute, the full one has five latency rounds,
and a warm-up "together" loads every sidecar at once and nothing else."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from bench import run as bench_run
from bench.load import LoadResult
from bench.run import MODES, Mode, _warm
from bench.stack import scenario

#: what the harness spends around the load in the quick mode, measured: starting the stack
#: (~8 s: every sidecar imports at once on two cores), reading counters per sample, the report
AROUND_THE_LOAD_S = 15


def _load_seconds(mode: Mode) -> float:
    """Seconds of generated load a mode plans (wrk runs at least a whole second)."""
    n = len(mode.scenarios)
    wrk = max(1.0, round(mode.duration_s))
    warm = max(1.0, round(mode.warmup_s))
    latency = len(mode.latency_scenarios) if mode.latency_scenarios is not None else n
    return (
        (warm if mode.warmup_together else n * warm)
        + mode.rounds * n * wrk
        + mode.latency_rounds * latency * mode.latency_duration_s
    )


def test_the_quick_mode_plans_less_than_a_minute() -> None:
    quick = MODES["quick"]
    assert _load_seconds(quick) + AROUND_THE_LOAD_S < 60
    # one warm-up serially per scenario would not fit
    serial = Mode(**{**quick.__dict__, "warmup_together": False})
    assert _load_seconds(serial) + AROUND_THE_LOAD_S > 60


def test_the_full_mode_takes_medians_of_five_rounds_in_both_phases() -> None:
    full = MODES["full"]
    assert full.rounds >= 5
    assert full.latency_rounds >= 5
    assert not full.warmup_together


class _Stack:
    def port(self, key: str) -> int:
        return 1000 + len(key)


def test_a_warm_up_together_loads_every_sidecar_at_the_same_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = [scenario(k) for k in ("passthrough", "native", "bare-fast", "extproc", "sdk")]
    sidecars = [s for s in chosen if s.sidecar]
    barrier = threading.Barrier(len(sidecars), timeout=5)
    calls: list[tuple[int, dict[str, Any]]] = []

    def fake_wrk(port: int, script: Path, **kw: Any) -> LoadResult:
        calls.append((port, kw))
        barrier.wait()  # raises BrokenBarrierError unless all of them run at once
        return LoadResult(123, 1.0, {"200": 123}, 0, {"p99": 1.0})

    monkeypatch.setattr(bench_run, "run_wrk", fake_wrk)
    mode = Mode(**{**MODES["quick"].__dict__, "scenarios": tuple(s.key for s in chosen)})
    _warm(_Stack(), chosen, Path("x.lua"), mode)  # type: ignore[arg-type]
    assert sorted(port for port, _ in calls) == sorted(_Stack().port(s.key) for s in sidecars)
    assert all(kw["duration_s"] == mode.warmup_s for _, kw in calls)
    assert all(kw["connections"] < mode.connections for _, kw in calls)
    out = capsys.readouterr().out
    assert all(f"warm {s.key}" in out for s in sidecars)
    assert "passthrough" not in out


def _plugins_but_the_key_prefix(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A sidecar config's plugins with each one's key prefix blanked: it follows the
    scenario's key, so variants of one scenario differ there by design."""
    return [{**p, "config": {**p["config"], "key_prefix": ""}} for p in config["plugins"]]


def test_the_tracing_off_variant_has_no_tracing_section_and_the_rest_alike() -> None:
    from bench.stack import sidecar_config
    from bench.traffic import make_traffic

    traffic = make_traffic(2)
    on = sidecar_config(scenario("extproc-jwt-rl-h2"), traffic, "redis://x", "http://otlp")
    off = sidecar_config(scenario("extproc-jwt-rl-nt-h2"), traffic, "redis://x", "http://otlp")
    assert on["tracing"]["sample_ratio"] == pytest.approx(0.01)
    assert "tracing" not in off
    assert off["server"] == on["server"] and off["server"]["transport"] == "http2"
    # the same plugins but for the key prefix, which follows the scenario's key
    assert _plugins_but_the_key_prefix(off) == _plugins_but_the_key_prefix(on)


def test_the_watchdog_off_variant_differs_only_in_its_threshold_and_loads() -> None:
    import json

    from bench.stack import sidecar_config
    from bench.traffic import make_traffic
    from extproc.config import parse_config

    traffic = make_traffic(2)
    for suffix in ("", "-h2"):
        on = sidecar_config(scenario(f"extproc-jwt-rl{suffix}"), traffic, "redis://x", "")
        off = sidecar_config(scenario(f"extproc-jwt-rl-nowd{suffix}"), traffic, "redis://x", "")
        assert off["server"].pop("loop_lag_threshold_ms") == 0
        assert off["server"] == on["server"]
        assert _plugins_but_the_key_prefix(off) == _plugins_but_the_key_prefix(on)
        off["server"]["loop_lag_threshold_ms"] = 0
        loaded = parse_config(json.dumps(off), "off.yaml")
        assert loaded.config.server.loop_lag_threshold_ms == 0


def test_the_grant_ahead_variant_differs_only_there_and_loads() -> None:
    import json

    from bench.run import ALL
    from bench.stack import sidecar_config
    from bench.traffic import make_traffic
    from extproc.config import parse_config

    traffic = make_traffic(2)
    base = sidecar_config(scenario("extproc-jwt-rl-h2"), traffic, "redis://x", "http://otlp")
    ahead = sidecar_config(scenario("extproc-jwt-rl-ahead-h2"), traffic, "redis://x", "http://o")
    plugins = _plugins_but_the_key_prefix(ahead)  # copies: ``ahead`` is loaded below
    rl = next(p["config"] for p in plugins if p["plugin"] == "rate_limit")
    assert rl.pop("grant_ahead") == {"enabled": True, "max_age_ms": 300_000}
    assert plugins == _plugins_but_the_key_prefix(base)
    assert ahead["server"] == base["server"]
    assert "extproc-jwt-rl-ahead-h2" in ALL  # in the full run, beside extproc-jwt-rl-h2
    # the file the sidecar is given is one it accepts (a config error raises)
    loaded = parse_config(json.dumps(ahead))
    rate_limit = next(cfg for entry, _, cfg in loaded.plugins if entry.plugin == "rate_limit")
    assert rate_limit.grant_ahead.enabled


def test_the_hot_key_variants_count_all_traffic_under_one_limited_key() -> None:
    import json

    from bench.run import ALL, _allowed
    from bench.stack import HOT_LIMIT, sidecar_config
    from bench.traffic import make_traffic
    from extproc.config import parse_config

    traffic = make_traffic(2)
    keys = [
        "extproc-jwt-rl-hot", "extproc-jwt-rl-hot-w2",
        "extproc-jwt-rl-ahead-hot", "extproc-jwt-rl-ahead-hot-w2",
    ]  # fmt: skip
    for key in keys + [f"{k}-h2" for k in keys]:
        s = scenario(key)
        assert s.hot_limit == HOT_LIMIT and s.denies and key not in ALL
        assert _allowed(s) == frozenset({"200", "429"})
        assert s.workers == (2 if "-w2" in key else 1)
        config = sidecar_config(s, traffic, "redis://x", None)
        rl = {p["plugin"]: p["config"] for p in config["plugins"]}["rate_limit"]
        assert rl["rules"] == [
            {"name": "hot", "key": ["method"], "limits": [{"requests": HOT_LIMIT, "per": "second"}]}
        ]
        assert ("grant_ahead" in rl) is ("-ahead" in key)
        parse_config(json.dumps(config))  # one the sidecar accepts
    plain = scenario("extproc-jwt-rl")
    assert not plain.denies and _allowed(plain) == frozenset({"200"})
    assert scenario("extproc-deny").denies


def test_every_scenario_and_its_baseline_twin_get_a_distinct_valid_key_prefix() -> None:
    from bench.report import BASE_SUFFIX
    from bench.stack import SCENARIOS, _key_prefix

    keys = [s.key for s in SCENARIOS] + [s.key + BASE_SUFFIX for s in SCENARIOS]
    prefixes = [_key_prefix(k) for k in keys]
    assert len(set(prefixes)) == len(keys)
    assert all(len(p) <= 32 for p in prefixes)  # rate_limit's limit
    assert _key_prefix("extproc-jwt-rl") == "extproc_jwt_rl"  # short ones unchanged


def test_the_floor_and_burn_variants_are_optional_and_set_what_their_servicers_need() -> None:
    assert scenario("bare-fast-redis").needs_redis and scenario("bare-fast-redis").optional
    for key, backend in (("bare-fast-burn300", "bare-fast"), ("bare-http2-burn100", "bare-http2")):
        s = scenario(key)
        assert (s.backend, s.optional, s.needs_redis) == (backend, True, False)
        assert s.burn_us == float(key.rpartition("burn")[2])
    assert scenario("bare-fast").burn_us == 0.0
    # spun Python before one round trip: the floor of a Redis-backed decision plus the CPU
    s = scenario("bare-http2-redis-burn300")
    assert (s.backend, s.burn_us, s.needs_redis) == ("bare-http2-redis", 300.0, True)


def test_the_script_floors_run_the_rate_limiters_script_and_need_a_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    from bench.servicers.bare import parse_floor_arguments

    for base in ("bare-http2-redis", "bare-fast-redis"):
        s = scenario(f"{base}-script")
        assert (s.backend, s.redis_script, s.needs_redis, s.optional) == (base, True, True, True)
    assert not scenario("bare-http2-redis").redis_script

    def parse(*argv: str) -> argparse.Namespace:
        monkeypatch.setattr("sys.argv", ["floor", *argv])
        parser = argparse.ArgumentParser()
        parser.add_argument("--style", choices=("own", "own-redis"))
        return parse_floor_arguments(parser, "own")

    assert parse("--style", "own-redis", "--redis", "h:1", "--redis-script").redis_script
    assert not parse("--style", "own-redis", "--redis", "h:1").redis_script
    with pytest.raises(SystemExit):
        parse("--style", "own", "--redis-script")
