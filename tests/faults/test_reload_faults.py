"""Configuration reloads under steady load through real Envoy: broken files are refused with
zero failed requests, a good one switches every new request to the new plugin config."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.harness import (
    Load,
    Stack,
    admin_status,
    budget,
    http_sender,
    poll,
    upstream_header,
    write_atomic,
)

pytestmark = pytest.mark.e2e

GOOD = """
version: 1
server: {{message_timeout_ms: 200, drain_delay_s: 0}}
plugins:
  - plugin: headers
    config:
      rules: [{{path_prefix: /, request_set: {{x-version: "{version}"}}}}]
"""

BROKEN = {
    "yaml_syntax": "version: 1\nplugins: [\n  - plugin: headers\n",
    "unknown_plugin": "version: 1\nplugins:\n  - plugin: no_such_plugin\n",
    "bad_plugin_config": (
        "version: 1\nplugins:\n  - plugin: headers\n    config: {rules: [{path_prefix: nope}]}\n"
    ),
    "failing_init": "version: 1\nplugins:\n  - plugin: tests.support.plugins:FailingInitPlugin\n",
}


@pytest.mark.parametrize("trigger", ["watch", "sighup"])
@budget(60)
async def test_broken_then_good_reload_under_load(
    tmp_path: Path, figures: dict[str, Any], trigger: str
) -> None:
    cfg = tmp_path / "extproc.yaml"
    cfg.write_text(GOOD.format(version="v1"))
    args = ("--no-watch",) if trigger == "sighup" else ()
    async with (
        Stack([cfg], admin=True, sidecar_args=args) as stack,
        httpx.AsyncClient(trust_env=False) as admin_client,
    ):
        sidecar, admin = stack.sidecars[0], stack.admins[0]
        assert sidecar.pid is not None

        def apply(text: str) -> None:
            write_atomic(cfg, text)
            if trigger == "sighup":
                assert sidecar.pid is not None
                os.kill(sidecar.pid, signal.SIGHUP)

        async def status() -> dict[str, Any]:
            return await admin_status(admin_client, admin)

        load = Load(
            http_sender(
                stack.http, lambda i: ("get", f"/r{i}", {}), keep=upstream_header("x-version")
            ),
            concurrency=4,
            max_requests=5000,
            timeout=5.0,
            pause=0.005,
        )
        async with load:
            load.phase = "v1"
            await load.wait_for(40)
            for n, (name, text) in enumerate(BROKEN.items(), start=1):
                load.phase = f"broken:{name}"
                apply(text)

                async def refused(n: int = n) -> bool:
                    return (await status())["reloads"]["failed"] >= n

                await poll(refused, timeout=10, what=f"{name} refused")
                await load.wait_for(25, phase=f"broken:{name}")
            refused_status = await status()
            load.phase = "switching"
            written = asyncio.get_running_loop().time()
            apply(GOOD.format(version="v2"))

            async def switched() -> bool:
                return (await status())["generation"] == 2

            await poll(switched, timeout=10, what="generation 2")
            load.phase = "v2"
            await load.wait_for(60, phase="v2")
        final = await status()
        log = sidecar.log_text()
    figures.update(load.figures())
    figures["reloads"] = final["reloads"]

    # zero failed requests through four refused files and one good reload
    assert set(load.statuses()) == {200}, load.statuses()
    # each bad file was refused, the running config stayed (and says why it refused)
    assert refused_status["generation"] == 1
    assert refused_status["reloads"] == {"ok": 0, "failed": len(BROKEN)}
    assert "failed to initialize" in (refused_status["last_reload_error"] or "")
    for phase in [f"broken:{name}" for name in BROKEN] + ["v1"]:
        done = [o for o in load.select(phase) if o.ended < written]
        assert len(done) >= 20 and {o.info.get("x-version") for o in done} == {"v1"}, phase
    # the switch: every request that started after /status showed generation 2 saw v2
    assert {o.info.get("x-version") for o in load.select("v2")} == {"v2"}
    assert final["reloads"] == {"ok": 1, "failed": len(BROKEN)}
    assert log.count("configuration refused") + log.count("failed to start") >= len(BROKEN)
