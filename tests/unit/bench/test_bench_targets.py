"""The targets table: one block per transport's headline scenario, measured against the
fastest bare servicer of the run whatever its transport."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from bench import report
from bench.run import _redis_calls


def _row(rps: float, **ratios: float) -> dict[str, Any]:
    return {
        "rps": rps,
        "vs_bare_fast": ratios.get("fast", float("nan")),
        "vs_bare_coalesced": ratios.get("coalesced", float("nan")),
        "vs_bare_http2": ratios.get("http2", float("nan")),
        "redis_round_trips_per_req": 0.05,
        "open_loop": {"added_p99_ms": 1.5},
    }


def test_each_transport_gets_its_targets_against_the_fastest_bare_servicer() -> None:
    summary = {
        "sdk": _row(2000),
        "bare-idiomatic": _row(3000),
        "extproc-jwt-rl": _row(2800, fast=0.6, coalesced=0.5, http2=0.25),
        "extproc-jwt-rl-h2": _row(4800, fast=0.95, coalesced=0.8, http2=0.41),
    }
    rows = {t["target"]: t for t in report.targets(summary, {})}
    grpc_fastest = rows["throughput vs fastest bare servicer (bare-http2)"]
    assert grpc_fastest["value"] == 0.25 and grpc_fastest["met"] is False
    h2 = "`extproc-jwt-rl-h2`: "
    assert rows[h2 + "throughput vs fastest bare servicer (bare-http2)"]["value"] == 0.41
    info = rows[h2 + "throughput vs fastest bare grpc.aio servicer (bare-coalesced)"]
    assert info["value"] == 0.8 and info["met"] is None  # reported, not judged
    assert rows[h2 + "throughput vs envoy-extproc-sdk"]["value"] == 2.4
    assert rows[h2 + "throughput vs envoy-extproc-sdk"]["met"] is True
    assert rows["throughput vs envoy-extproc-sdk"]["met"] is False  # 1.4
    assert "--workers 2 vs 1" in rows and h2 + "--workers 2 vs 1" not in rows
    summary["extproc-jwt-rl-w2-h2"] = _row(4800 * 1.1)
    rows = {t["target"]: t for t in report.targets(summary, {})}
    assert round(rows[h2 + "--workers 2 vs 1 (throughput ratio)"]["value"], 2) == 1.1


def test_without_the_http2_floor_the_grpc_aio_servicers_are_the_reference() -> None:
    summary = {"extproc-jwt-rl": _row(2800, fast=0.6, coalesced=0.5)}
    [first, *_] = report.targets(summary, {})
    assert first["target"] == "throughput vs fastest bare servicer (bare-coalesced)"
    assert first["value"] == 0.5


def test_a_run_without_bare_servicers_still_reports_the_other_targets() -> None:
    rows = report.targets({"extproc-jwt-rl-h2": _row(4800)}, {})
    assert rows[0]["target"] == (
        "`extproc-jwt-rl-h2`: added p99 over passthrough at the open-loop rate (ms)"
    )


def test_the_redis_floor_is_reported_beside_the_added_p99() -> None:
    summary = {
        "extproc-jwt-rl-h2": _row(4800),
        "bare-http2-redis": {"rps": 13000, "open_loop": {"added_p99_ms": 1.1}},
    }
    rows = {t["target"]: t for t in report.targets(summary, {})}
    floor = rows[
        "`extproc-jwt-rl-h2`: the same for the floor with one Redis round trip per request "
        "(bare-http2-redis, ms)"
    ]
    assert floor["value"] == 1.1 and floor["met"] is None
    del summary["bare-http2-redis"]
    assert not any("floor" in t["target"] for t in report.targets(summary, {}))


def test_the_added_p99_target_says_in_how_many_rounds_it_was_met() -> None:
    row = _row(4800)
    row["open_loop"] = {"added_p99_ms": 1.9, "added_p99_ms_rounds": [1.5, 1.9, 2.4, 68.0, 1.8]}
    rows = {t["target"]: t for t in report.targets({"extproc-jwt-rl-h2": row}, {})}
    firm = rows["`extproc-jwt-rl-h2`: open-loop rounds with added p99 <= 2 ms"]
    assert firm["value"] == "3 of 5" and firm["met"] is None  # reported, not judged
    del row["open_loop"]["added_p99_ms_rounds"]  # a run from before the field
    rows = {t["target"]: t for t in report.targets({"extproc-jwt-rl-h2": row}, {})}
    assert not any("rounds with" in name for name in rows)


def test_target_4_is_judged_on_round_trips_and_the_commands_are_reported_beside() -> None:
    row = _row(4800)
    row["redis_round_trips_per_req"] = 0.06  # a pipeline of writes is one
    row["redis_client_cmds_per_req"] = 0.12  # ... and each of its commands here
    rows = {t["target"]: t for t in report.targets({"extproc-jwt-rl-h2": row}, {})}
    trips = rows["`extproc-jwt-rl-h2`: Redis round trips per request at saturation"]
    assert trips["value"] == 0.06 and trips["met"] is True
    cmds = rows[
        "`extproc-jwt-rl-h2`: Redis commands per request at saturation (pipelined ones each)"
    ]
    assert cmds["value"] == 0.12 and cmds["met"] is None


def test_round_trips_are_the_servers_reply_writes_less_the_own_commands() -> None:
    stats = {
        "evalsha": {"calls": 10.0},
        "set": {"calls": 50.0},
        "info": {"calls": 3.0},
        "ping": {"calls": 2.0},
        "client|setinfo": {"calls": 1.0},
    }
    stack = SimpleNamespace(redis=SimpleNamespace(counters=lambda: (stats, 17)))
    calls, trips = _redis_calls(stack)  # type: ignore[arg-type]
    assert calls == {"evalsha": 10, "set": 50}
    assert trips == 17 - 6  # 10 script calls and one pipeline of 50 SETs: 11
    assert _redis_calls(SimpleNamespace(redis=None)) == ({}, 0)  # type: ignore[arg-type]
