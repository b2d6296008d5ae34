"""Samples of the benchmark's results for the report's tests: the least a closed-loop sample
needs for ``bench.report.summarize`` to read it."""

from __future__ import annotations

from typing import Any


def closed_loop_sample() -> dict[str, Any]:
    """One scenario's closed-loop round: every field the summary reads, all trivial."""
    return {
        "rps": 1.0,
        "latency_ms": {"p50": 1, "p90": 1, "p99": 1},
        "errors": 0,
        "cpu_us": {"envoy": 1, "sidecar": 1, "redis": 0},
        "redis_cmds_per_req": 0,
        "redis_round_trips_per_req": 0,
        "redis_client_cmds_per_req": 0,
        "client_errors": 0,
        "requests": 1,
        "statuses": {},
        "batching": None,
        "hooks": {},
        "plugin_errors": {},
    }
