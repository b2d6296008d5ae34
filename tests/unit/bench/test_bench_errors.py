"""The benchmark explains its errors: 5xx by status and the sidecar's plugin failures during
each sample (from ``extproc_plugin_errors_total``), summed in the report's Errors section."""

from __future__ import annotations

from bench import report
from bench.run import _plugin_errors

FAMILY = "extproc_plugin_errors_total"


def test_the_plugin_failures_during_the_sample() -> None:
    before = {
        f'{FAMILY}{{kind="timeout",plugin="jwt_auth"}}': 5.0,
        f'{FAMILY}{{kind="exception",plugin="rate_limit"}}': 2.0,
        "extproc_rate_limit_batch_size_count": 9.0,
    }
    after = {
        f'{FAMILY}{{kind="timeout",plugin="jwt_auth"}}': 12.0,
        f'{FAMILY}{{kind="exception",plugin="rate_limit"}}': 2.0,  # none during the sample
        f'{FAMILY}{{kind="timeout",plugin="rate_limit"}}': 1.0,  # first seen now
        "extproc_rate_limit_batch_size_count": 20.0,
    }
    assert _plugin_errors(before, after) == {"jwt_auth timeout": 7, "rate_limit timeout": 1}
    assert _plugin_errors({}, {}) == {}


def test_error_causes_are_summed_and_listed_only_where_there_were_errors() -> None:
    samples = [
        {"statuses": {"200": 900, "503": 4, "429": 3}, "socket_errors": 0,
         "plugin_errors": {"jwt_auth timeout": 4}},
        {"statuses": {"200": 800, "503": 1, "504": 2}, "socket_errors": 1, "plugin_errors": {}},
    ]  # fmt: skip
    causes = report._error_causes(samples)
    assert causes == {"503": 5, "504": 2, "socket": 1, "jwt_auth timeout": 4}
    data = {
        "settings": {"latency_rate": 1000.0},
        "summary": {
            "extproc-jwt-rl": {"error_causes": causes, "open_loop": {"error_causes": {}}},
            "passthrough": {"error_causes": {}},
        },
    }
    section = report._errors_section(data)
    assert [ln for ln in section if ln.startswith("- ")] == [
        "- `extproc-jwt-rl`, saturated (closed loop): 503 5, 504 2, jwt_auth timeout 4, socket 1"
    ]
    assert report._errors_section({"settings": data["settings"], "summary": {}}) == []
