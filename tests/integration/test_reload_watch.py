"""The config file watcher: atomic renames and Kubernetes-style symlink swaps reload; a
rewrite with the same content does not; a broken file is refused and the old one serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from extproc.config import load_config
from extproc.reload import watch_config
from extproc.server import Server
from extproc.testing.processes import free_port

BASE = "server: {{admin: '', drain_delay_s: 0}}\nplugins:\n  - plugin: headers\n" \
       "    config: {{rules: [{{path_prefix: /, request_set: {{x-v: '{v}'}}}}]}}\n"  # fmt: skip


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def watched(config: Path) -> AsyncIterator[Server]:
    server = Server(load_config(config), config_path=str(config),
                    listen=f"127.0.0.1:{free_port()}", admin="")  # fmt: skip
    await server.start()
    task = asyncio.ensure_future(watch_config(str(config), server.reload, debounce_ms=50))
    await asyncio.sleep(0.3)  # the watcher is armed
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()


async def generation(server: Server, want: int, timeout: float = 10.0) -> int:
    async with asyncio.timeout(timeout):
        while server.runtime.status()["generation"] < want:
            await asyncio.sleep(0.05)
    return int(server.runtime.status()["generation"])


async def test_atomic_rename_reloads_and_same_content_does_not(tmp_path: Path) -> None:
    cfg = tmp_path / "extproc.yaml"
    cfg.write_text(BASE.format(v=1))
    async with watched(cfg) as server:
        atomic_write(cfg, BASE.format(v=2))
        assert await generation(server, 2) == 2
        atomic_write(cfg, BASE.format(v=2))  # same content
        await asyncio.sleep(0.5)
        assert server.runtime.status()["generation"] == 2
        atomic_write(cfg, "plugins: [\n")  # broken: refused, generation 2 keeps serving
        async with asyncio.timeout(10):
            while server.runtime.status()["reloads"]["failed"] == 0:
                await asyncio.sleep(0.05)
        assert server.runtime.status()["generation"] == 2


async def test_kubernetes_configmap_symlink_swap_reloads(tmp_path: Path) -> None:
    # the layout kubelet writes: extproc.yaml -> ..data/extproc.yaml, ..data -> ..2026_x
    first = tmp_path / "..2026_01"
    first.mkdir()
    (first / "extproc.yaml").write_text(BASE.format(v=1))
    (tmp_path / "..data").symlink_to(first.name)
    cfg = tmp_path / "extproc.yaml"
    cfg.symlink_to("..data/extproc.yaml")
    async with watched(cfg) as server:
        second = tmp_path / "..2026_02"
        second.mkdir()
        (second / "extproc.yaml").write_text(BASE.format(v=2))
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(second.name)
        os.replace(tmp_link, tmp_path / "..data")  # the atomic swap
        assert await generation(server, 2) == 2
