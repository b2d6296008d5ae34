"""Plugins that hang, raise, leak, or ignore cancellation, under mixed load through real Envoy:
each one's deadline and failure policy hold, and the other plugins and requests are
unaffected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Load, Stack, budget, http_sender, upstream_header

pytestmark = pytest.mark.e2e

CONFIG = """
version: 1
server: {message_timeout_ms: 300, drain_delay_s: 0}
plugins:
  - plugin: headers
    config:
      rules: [{path_prefix: /, request_set: {x-added: "yes"}}]
  - plugin: tests.support.plugins:HangPlugin
    timeout_ms: 100
    fail: closed
    config: {path: /hang-closed, seconds: 5}
  - plugin: tests.support.plugins:HangPlugin
    name: hang_open
    timeout_ms: 100
    fail: open
    config: {path: /hang-open, seconds: 5}
  - plugin: tests.support.plugins:RaisePlugin
    fail: closed
    config: {path: /raise}
  - plugin: tests.faults.plugins:LeakPlugin
    fail: closed
    config: {path: /leak}
"""

STUBBORN = """
  - plugin: tests.faults.plugins:StubbornHangPlugin
    timeout_ms: 100
    fail: open
    config: {path: /stubborn, seconds: 2}
"""

#: path -> (status, the headers plugin ran: x-added reached the upstream)
EXPECTED = {
    "/ok": (200, True),
    "/hang-closed": (503, False),
    "/hang-open": (200, True),
    "/raise": (500, False),
    "/leak": (200, True),
}


async def run_mixed(stack: Stack, paths: list[str], n: int) -> Load:
    load = Load(
        http_sender(
            stack.http,
            lambda i: (paths[i % len(paths)], f"{paths[i % len(paths)]}/{i}", {}),
            keep=upstream_header("x-added"),
        ),
        concurrency=6,
        max_requests=n,
        timeout=5.0,
    )
    async with load:
        load.phase = "mixed"
        await load.wait_for(n)
    return load


def check(load: Load, expected: dict[str, tuple[int, bool]]) -> None:
    for path, (status, added) in expected.items():
        got = load.select(kind=path)
        assert {o.status for o in got} == {status}, (path, load.statuses(kind=path))
        if status == 200:
            assert all(o.info.get("x-added") == ("yes" if added else None) for o in got), path
        else:
            assert all("hunter2" not in o.info.get("body", "") for o in got)
    # every request was answered well within a second (deadline 100 ms, budget 280 ms)
    assert max(o.elapsed for o in load.outcomes) < 1.0, max(o.elapsed for o in load.outcomes)


@budget(45)
async def test_hang_raise_leak_under_mixed_load(tmp_path: Path, figures: dict[str, Any]) -> None:
    cfg = tmp_path / "extproc.yaml"
    cfg.write_text(CONFIG)
    async with Stack([cfg]) as stack:
        load = await run_mixed(stack, list(EXPECTED), 300)
        assert stack.envoy is not None
        stats = stack.envoy.stats("http.*ext_proc|extproc")
    figures.update(load.figures())
    check(load, EXPECTED)
    # the sidecar's answers were all in protocol: Envoy saw no failed or timed-out stream
    broken = {k: v for k, v in stats.items() if k.endswith(("streams_failed", "message_timeouts"))}
    assert broken and not any(broken.values()), broken


@budget(45)
async def test_plugin_ignoring_cancellation_still_gets_its_failure_policy(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    cfg = tmp_path / "extproc.yaml"
    cfg.write_text(CONFIG + STUBBORN)
    async with Stack([cfg]) as stack:
        load = await run_mixed(stack, ["/ok", "/stubborn"], 40)
    figures.update(load.figures())
    check(load, {"/ok": (200, True), "/stubborn": (200, True)})
