"""``extproc serve --workers 2``: two worker processes behind one supervisor."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from extproc import supervisor
from extproc.config import parse_config
from extproc.supervisor import Supervisor, merge_metrics, usable_cpus, worker_addresses
from extproc.testing.fake_envoy import EnvoyMode, FakeEnvoy
from extproc.testing.processes import free_port


def test_worker_addresses() -> None:
    assert worker_addresses("unix:/run/x.sock", 2) == ["unix:/run/x-0.sock", "unix:/run/x-1.sock"]
    assert worker_addresses("unix:/run/x", 2) == ["unix:/run/x-0.sock", "unix:/run/x-1.sock"]
    assert worker_addresses("127.0.0.1:5000", 3) == [
        "127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5002",
    ]  # fmt: skip
    assert worker_addresses("127.0.0.1:0", 1) == ["127.0.0.1:0"]
    with pytest.raises(ValueError, match="fixed port"):
        worker_addresses("127.0.0.1:0", 2)


def test_merge_metrics_sums_series_and_keeps_the_generation() -> None:
    a = "# HELP x_total x\n# TYPE x_total counter\nx_total{a=\"1\"} 2\n" \
        "# HELP extproc_config_generation g\n# TYPE extproc_config_generation gauge\n" \
        "extproc_config_generation 3\n"  # fmt: skip
    b = a.replace("} 2", "} 5")
    merged = merge_metrics([a, b])
    assert 'x_total{a="1"} 7' in merged
    assert "extproc_config_generation 3\n" in merged
    assert merged.count("# TYPE x_total counter") == 1


@pytest.mark.parametrize("watch", [True, False])
def test_workers_are_told_whether_to_watch_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, watch: bool
) -> None:
    """``serve --workers 2 --no-watch``: the workers, which watch the file themselves, must
    not watch it either."""
    started: list[list[str]] = []

    class _Recorded:
        pid = 0

        def __init__(self, argv: list[str], **_: object) -> None:
            started.append(argv)

    monkeypatch.setattr(subprocess, "Popen", _Recorded)
    loaded = parse_config("server: {listen: '127.0.0.1:5000', admin: null}\nplugins: []\n")
    sup = Supervisor(loaded, str(tmp_path / "c.yaml"), 2, watch=watch)
    for worker in sup.workers:
        sup._spawn(worker)
    assert [argv[argv.index("--listen") + 1] for argv in started] == [
        "127.0.0.1:5000", "127.0.0.1:5001",
    ]  # fmt: skip
    assert all(("--no-watch" in argv) is (not watch) for argv in started)


def _membership(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_usable_cpus_is_the_affinity_or_the_cgroup_quota_if_lower(tmp_path: Path) -> None:
    mine = float(len(os.sched_getaffinity(0)))
    root = tmp_path / "cgroup"
    root.mkdir()
    alone = _membership(tmp_path, "0::/\n")
    assert usable_cpus(root, alone) == mine  # no cpu.max: not limited by a cgroup
    (root / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(root, alone) == mine
    (root / "cpu.max").write_text("50000 100000\n")  # a container limited to half a CPU
    assert usable_cpus(root, alone) == 0.5
    (root / "cpu.max").write_text(f"{int(mine + 2) * 100000} 100000\n")
    assert usable_cpus(root, alone) == mine  # a quota above the CPUs it may run on
    (root / "cpu.max").write_text("garbage\n")
    assert usable_cpus(root, alone) == mine
    assert usable_cpus(root, tmp_path / "missing") == mine


def test_usable_cpus_reads_the_process_cgroup_and_its_parents_v2(tmp_path: Path) -> None:
    mine = float(len(os.sched_getaffinity(0)))
    root = tmp_path / "cgroup"
    leaf = root / "kubepods" / "pod1" / "app"
    leaf.mkdir(parents=True)
    member = _membership(tmp_path, "0::/kubepods/pod1/app\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("25000 100000\n")  # the pod's limit
    (leaf / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(root, member) == 0.25  # a parent's limit binds its children
    (leaf / "cpu.max").write_text("10000 100000\n")
    assert usable_cpus(root, member) == 0.1  # the tightest wins
    # a cgroup namespace: the path the process reports is not under the mount, whose root
    # is the container's own cgroup
    elsewhere = _membership(tmp_path, "0::/system.slice/docker-1.scope\n")
    assert usable_cpus(root, elsewhere) == mine
    (root / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(root, elsewhere) == min(mine, 1.5)


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_usable_cpus_reads_cgroup_v1_cfs_quota(tmp_path: Path, mount: str) -> None:
    mine = float(len(os.sched_getaffinity(0)))
    root = tmp_path / "cgroup"
    leaf = root / mount / "docker" / "abc"
    leaf.mkdir(parents=True)
    member = _membership(tmp_path, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    (leaf / "cpu.cfs_period_us").write_text("100000\n")
    (leaf / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert usable_cpus(root, member) == mine
    (leaf / "cpu.cfs_quota_us").write_text("50000\n")
    assert usable_cpus(root, member) == 0.5
    (leaf / "cpu.cfs_quota_us").write_text("nonsense\n")
    assert usable_cpus(root, member) == mine


class _Spawned(Exception):
    pass


@pytest.mark.parametrize(("cpus", "warned"), [(1.5, True), (2.0, False)])
def test_more_workers_than_usable_cpus_is_warned_at_start(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    cpus: float,
    warned: bool,
) -> None:
    def spawn(self: Supervisor, worker: object) -> None:
        raise _Spawned

    monkeypatch.setattr(supervisor, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(Supervisor, "_spawn", spawn)
    loaded = parse_config("server: {listen: '127.0.0.1:5000', admin: null}\nplugins: []\n")
    sup = Supervisor(loaded, str(tmp_path / "c.yaml"), 2)
    with caplog.at_level(logging.WARNING, "extproc.supervisor"), pytest.raises(_Spawned):
        asyncio.run(sup.start())
    records = [r for r in caplog.records if "more workers than usable CPUs" in r.getMessage()]
    assert len(records) == (1 if warned else 0)
    if warned:
        assert (records[0].__dict__["workers"], records[0].__dict__["usable_cpus"]) == (2, 1.5)


async def test_two_workers_serve_and_aggregate(tmp_path: Path) -> None:
    sock = tmp_path / "extproc.sock"
    admin_port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"server: {{listen: 'unix:{sock}', admin: '127.0.0.1:{admin_port}', drain_delay_s: 0}}\n"
        "plugins:\n  - plugin: headers\n    config:\n"
        "      rules: [{path_prefix: /, request_set: {x-w: '1'}}]\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--workers", "2"],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])),
    )
    base = f"http://127.0.0.1:{admin_port}"
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=3) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = await client.get(f"{base}/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "workers not ready"
                assert proc.poll() is None
                await asyncio.sleep(0.2)
            for i in range(2):
                envoy = FakeEnvoy.connect(f"unix:{tmp_path}/extproc-{i}.sock", EnvoyMode())
                try:
                    for _ in range(3):
                        ex = await envoy.request(path="/x")
                        assert ex.upstream_header("x-w") == "1"
                finally:
                    await envoy.aclose()
            metrics = (await client.get(f"{base}/metrics")).text
            assert 'extproc_messages_total{phase="request_headers"} 6' in metrics
            status = json.loads((await client.get(f"{base}/status")).text)
            pids = [w["pid"] for w in status["workers"]]
            assert len(set(pids)) == 2
            # a crashed worker is restarted
            os.kill(pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                status = json.loads((await client.get(f"{base}/status")).text)
                w0 = status["workers"][0]
                if w0["restarts"] == 1 and w0["http_status"] == 200:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0


def test_workers_without_redis_are_refused_for_the_rate_limiter(tmp_path: Path) -> None:
    """Several workers with in-process counters would multiply every limit."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"server: {{listen: 'unix:{tmp_path}/s.sock', admin: '', drain_delay_s: 0}}\n"
        "plugins:\n  - plugin: rate_limit\n    config:\n      rules:\n"
        "        - {name: r, limits: [{requests: 10, per: second}]}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--workers", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "while starting" in out.stderr
    assert "redis" in out.stderr.lower()
