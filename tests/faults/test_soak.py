"""Soak runs bounded by request count: after a warm-up, file descriptors (sidecar process behind
real Envoy), live asyncio tasks and traced allocations (server in process) stay flat. A
deliberately leaking plugin shows the same measurements do catch a leak."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from extproc.config import load_config
from extproc.server import Server
from extproc.testing.fake_envoy import EnvoyMode, FakeEnvoy
from extproc.testing.jwt import JwksServer, TokenFactory, make_ec_key
from extproc.testing.processes import free_port
from extproc.testing.redis_server import RedisServer
from tests.faults.harness import Load, Stack, budget, fd_count, http_sender
from tests.support import TRANSPORTS

ISSUER = "https://issuer.test"
PLUGINS = """
plugins:
  - plugin: headers
    config:
      rules: [{{path_prefix: /, request_set: {{x-added: "yes"}}, response_set: {{x-out: "1"}}}}]
  - plugin: jwt_auth
    timeout_ms: 150
    config:
      providers:
        main:
          issuer: {issuer}
          algorithms: [ES256]
          jwks: {jwks}
      rules:
        - {{match: {{prefix: /api}}, requires: {{provider: main}}}}
        - {{match: {{prefix: /}}, requires: {{allow_missing: true}}}}
  - plugin: rate_limit
    timeout_ms: 150
    config:
      rules:
        - {{name: per_user, key: [header:x-user], limits: [{{requests: 1000000, per: hour}}]}}
        - {{name: tiny, match: {{path_prefix: /tiny}}, key: [header:x-user],
           limits: [{{requests: 1, per: hour}}]}}
{extra}
"""

LEAK = """
  - plugin: tests.faults.plugins:LeakPlugin
    config: {path: /}
"""


def pick(tokens: list[str]) -> Any:
    def choose(i: int) -> tuple[str, str, dict[str, str]]:
        user = f"u{i % 50}"
        headers = {"x-user": user, "authorization": f"Bearer {tokens[i % len(tokens)]}"}
        if i % 10 == 0:
            headers["connection"] = "close"  # churn Envoy's downstream connections too
        path = ("/api/x", "/tiny", "/open")[i % 3]
        return path, path, headers

    return choose


@pytest.mark.e2e
@pytest.mark.redis
@budget(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_soak_file_descriptors_stay_flat(
    tmp_path: Path, figures: dict[str, Any], transport: str
) -> None:
    key = make_ec_key("k1")
    factory = TokenFactory(key, issuer=ISSUER)
    tokens = [factory.mint({"sub": f"s{i}"}) for i in range(20)]
    redis = await asyncio.to_thread(RedisServer)
    try:
        async with JwksServer([key]) as jwks:
            cfg = tmp_path / "extproc.yaml"
            text = (
                f"version: 1\nserver: {{drain_delay_s: 0, transport: {transport}}}\n"
                f'redis: {{url: "{redis.url}"}}\n'
            )
            text += PLUGINS.format(issuer=ISSUER, jwks=f'{{uri: "{jwks.url}"}}', extra="")
            cfg.write_text(text)
            async with Stack([cfg]) as stack:
                pid = stack.sidecars[0].pid
                assert pid is not None
                load = Load(http_sender(stack.http, pick(tokens)), concurrency=8, max_requests=4000)
                fds: list[int] = []
                async with load:
                    for n in (200, 600, 600):
                        await load.wait_for(n, timeout=60)
                        await asyncio.sleep(0.2)
                        fds.append(await fd_count(pid))
                assert stack.envoy is not None
    finally:
        await asyncio.to_thread(redis.close)
    figures.update(load.figures())
    figures["sidecar_fds"] = fds
    assert set(load.statuses("start", "/api/x")) == {200}
    assert set(load.statuses("start", "/open")) == {200}
    assert set(load.statuses("start", "/tiny")) <= {200, 429}
    assert load.statuses("start", "/tiny")[429] >= 350  # the counters keep working
    # tolerance: a pooled Redis connection or two may still open under a burst
    assert fds[2] - fds[1] <= 3 and fds[2] - fds[0] <= 6, fds


async def in_process_soak(
    tmp_path: Path, extra: str, warm: int, more: int, transport: str = "grpcio"
) -> dict[str, Any]:
    key = make_ec_key("k1")
    factory = TokenFactory(key, issuer=ISSUER)
    tokens = [factory.mint({"sub": f"s{i}"}) for i in range(20)]
    cfg = tmp_path / "extproc.yaml"
    jwks = "{inline: '" + json.dumps({"keys": [key.jwk()]}) + "'}"
    cfg.write_text(
        f"version: 1\nserver: {{drain_delay_s: 0, transport: {transport}}}\n"
        + PLUGINS.format(issuer=ISSUER, jwks=jwks, extra=extra)
    )
    port = free_port()
    server = Server(load_config(cfg), listen=f"127.0.0.1:{port}", admin="")
    await server.start()
    envoys = [
        FakeEnvoy.connect(f"127.0.0.1:{port}", EnvoyMode(response_headers=True)) for _ in range(4)
    ]
    choose = pick(tokens)
    statuses: dict[int, int] = {}

    async def run(start: int, count: int) -> None:
        async def worker(w: int) -> None:
            for i in range(start + w, start + count, len(envoys)):
                _, path, headers = choose(i)
                headers.pop("connection", None)
                ex = await envoys[w].request(path=path, headers=headers)
                statuses[ex.status] = statuses.get(ex.status, 0) + 1

        await asyncio.gather(*(worker(w) for w in range(len(envoys))))

    def measure() -> tuple[int, int]:
        gc.collect()
        size, _ = tracemalloc.get_traced_memory()
        return len(asyncio.all_tasks()), size

    try:
        await run(0, warm)
        tracemalloc.start()
        try:
            await run(warm, 100)  # fill what tracing itself allocates once
            tasks0, mem0 = measure()
            await run(warm + 100, more)
            tasks1, mem1 = measure()
        finally:
            tracemalloc.stop()
    finally:
        for envoy in envoys:
            await envoy.aclose()
        await server.stop()
    return {
        "requests": warm + 100 + more,
        "statuses": statuses,
        "tasks": [tasks0, tasks1],
        "traced_kib": [mem0 // 1024, mem1 // 1024],
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
@budget(60)
async def test_soak_in_process_tasks_and_memory_stay_flat(
    tmp_path: Path, figures: dict[str, Any], transport: str
) -> None:
    result = await in_process_soak(tmp_path, "", warm=500, more=1500, transport=transport)
    figures.update(result)
    tasks0, tasks1 = result["tasks"]
    mem0, mem1 = result["traced_kib"]
    assert set(result["statuses"]) == {200, 429}
    assert tasks1 - tasks0 <= 5, result
    # 1500 requests: well under 1 KiB per request would show as > 1.5 MiB
    assert mem1 - mem0 < 512, result


@budget(60)
async def test_soak_measurements_catch_a_leaking_plugin(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    """The control: the same measurements, a plugin that leaks a task and 10 kB per request."""
    result = await in_process_soak(tmp_path, LEAK, warm=100, more=300)
    figures.update(result)
    tasks0, tasks1 = result["tasks"]
    mem0, mem1 = result["traced_kib"]
    # two thirds of the requests reach the plugin (the rest are answered 429 before it)
    assert tasks1 - tasks0 >= 150
    assert mem1 - mem0 > 1500
