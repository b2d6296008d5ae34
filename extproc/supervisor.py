"""``extproc serve --workers N``: N worker processes, one event loop each.

Workers are started fresh (``python -m extproc serve``), never forked after grpc is imported.
Each listens on its own address (``unix:/run/x.sock`` -> ``unix:/run/x-0.sock`` ...;
``host:port`` -> ``host:port``, ``host:port+1`` ...), and ``extproc envoy-config --workers N``
lists every one as an endpoint so Envoy spreads streams across cores. The supervisor owns the
admin port: ``/metrics`` sums the workers' metrics, ``/readyz`` is ready when every worker is,
``/status`` shows each worker. A worker that dies is restarted (with backoff); SIGTERM drains
all workers; SIGHUP is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.admin import AdminHttp, fetch
from extproc.config import LoadedConfig

__all__ = ["Supervisor", "merge_metrics", "usable_cpus", "worker_addresses"]

log = logging.getLogger("extproc.supervisor")

# gauges that must not be summed across workers
_MAX_NOT_SUM = ("extproc_config_generation",)


def worker_addresses(listen: str, workers: int) -> list[str]:
    """The gRPC address of each worker."""
    if workers == 1:
        return [listen]
    if listen.startswith("unix:"):
        path = listen[5:]
        stem, dot, ext = path.rpartition(".")
        if not dot or "/" in ext:
            stem, ext = path, "sock"
        return [f"unix:{stem}-{i}.{ext}" for i in range(workers)]
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        raise ValueError("--workers needs a fixed port (or a unix socket) in server.listen")
    return [f"{host}:{int(port) + i}" for i in range(workers)]


def usable_cpus(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float:
    """How many CPUs this process may use: the CPUs it may run on, or fewer when a CPU quota
    (a container's CPU limit) allows less time than that.

    The quota is read from the process's own cgroup and each of its ancestors (the tightest
    wins), under cgroup v2 (``cpu.max``) and under v1's ``cpu`` controller
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). A container with its own cgroup namespace
    sees its cgroup as the mount's root, which is always read too."""
    cpus = float(len(os.sched_getaffinity(0)))
    for quota in _cpu_quotas(root, membership):
        cpus = min(cpus, quota)
    return cpus


def _cpu_quotas(root: Path, membership: Path) -> list[float]:
    """Every CPU quota (in CPUs) set on the process's cgroup path, v2 and v1."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = "/", None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    quotas = [q for d in _up_from(root, v2_path) if (q := _read_v2(d)) is not None]
    if v1_path is not None:
        for mount in (root / "cpu", root / "cpu,cpuacct"):
            if mount.is_dir():
                quotas += [q for d in _up_from(mount, v1_path) if (q := _read_v1(d)) is not None]
                break
    return quotas


def _up_from(mount: Path, path: str) -> list[Path]:
    """``mount``/``path`` and each of its parents up to ``mount`` itself."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_v2(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None  # -1: no quota
    except (OSError, ValueError, ZeroDivisionError):
        return None


def merge_metrics(texts: list[str]) -> str:
    """Sum the samples of several Prometheus text expositions with the same series."""
    order: list[str] = []
    meta: dict[str, list[str]] = {}
    samples: dict[str, dict[str, float]] = {}
    family = ""
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    family = parts[2]
                    if family not in meta:
                        meta[family] = []
                        order.append(family)
                        samples[family] = {}
                    if line not in meta[family]:
                        meta[family].append(line)
                continue
            series, _, value = line.rpartition(" ")
            bucket = samples.setdefault(family, {})
            try:
                v = float(value)
            except ValueError:
                continue
            if family in _MAX_NOT_SUM:
                bucket[series] = max(bucket.get(series, v), v)
            else:
                bucket[series] = bucket.get(series, 0.0) + v
    out: list[str] = []
    for fam in order:
        out.extend(meta[fam])
        for series, v in samples[fam].items():
            out.append(f"{series} {int(v) if v.is_integer() else v!r}")
    return "\n".join(out) + "\n"


@dataclass(slots=True)
class _Worker:
    index: int
    address: str
    admin: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 0.5
    history: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        loaded: LoadedConfig,
        config_path: str,
        workers: int,
        *,
        listen: str | None = None,
        admin: str | None = None,
        watch: bool = True,
    ) -> None:
        self.loaded = loaded
        #: workers watch the configuration file themselves (each reloads on its own)
        self.watch = watch
        self.config_path = config_path
        settings = loaded.config.server
        self.listen = listen or settings.listen
        self.admin_address = admin if admin is not None else settings.admin
        self._dir = tempfile.mkdtemp(prefix="extproc-workers-")
        self.workers = [
            _Worker(i, addr, f"unix:{self._dir}/admin-{i}.sock")
            for i, addr in enumerate(worker_addresses(self.listen, workers))
        ]
        self.count = workers
        self.stopping = False
        self._admin: AdminHttp | None = None
        self._done = asyncio.Event()
        self._watcher: asyncio.Future[None] | None = None

    def _spawn(self, worker: _Worker) -> None:
        argv = [
            sys.executable, "-m", "extproc", "serve", "--config", self.config_path,
            "--listen", worker.address, "--admin", worker.admin,
        ]  # fmt: skip
        if not self.watch:
            argv.append("--no-watch")
        env = dict(os.environ, EXTPROC_WORKERS=str(self.count), EXTPROC_WORKER=str(worker.index))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.admin[5:])
        worker.proc = subprocess.Popen(argv, env=env)
        worker.started_at = time.monotonic()
        log.info("worker started", extra={"worker": worker.index, "pid": worker.proc.pid,
                                          "listen": worker.address})  # fmt: skip

    async def start(self, startup_timeout: float = 60.0) -> None:
        """Start every worker and wait until each answers; a worker that exits while
        starting (a configuration it refuses, say) stops them all."""
        cpus = usable_cpus()
        if self.count > cpus:
            log.warning(
                "more workers than usable CPUs: they will share cores (and Envoy's, on the "
                "same host), and a worker costs more CPU per request at a smaller share of the "
                "load; see docs/operations.md, Scaling",
                extra={"workers": self.count, "usable_cpus": cpus},
            )
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + startup_timeout
        pending = list(self.workers)
        while pending:
            for w in list(pending):
                assert w.proc is not None
                if w.proc.poll() is not None:
                    await self._abort(
                        f"worker {w.index} exited with {w.proc.returncode} "
                        "while starting (see its log above)"
                    )
                status, _ = await self._ask(w, "/healthz")
                if status == 200:
                    pending.remove(w)
            if pending and time.monotonic() > deadline:
                await self._abort(f"workers {[w.index for w in pending]} did not start in time")
            await asyncio.sleep(0.1)
        if self.admin_address:
            self._admin = AdminHttp(self.admin_address, self._route)
            await self._admin.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, self._forward_hup)
        self._watcher = asyncio.ensure_future(self._watch())

    async def _abort(self, reason: str) -> None:
        log.error("supervisor stops: %s", reason)
        await self.stop()
        raise SystemExit(1)

    def _forward_hup(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    async def _watch(self) -> None:
        """Restart workers that died, with a backoff that resets after a minute of uptime."""
        while not self.stopping:
            await asyncio.sleep(0.2)
            for w in self.workers:
                if self.stopping or w.proc is None or w.proc.poll() is None:
                    continue
                code = w.proc.returncode
                uptime = time.monotonic() - w.started_at
                w.backoff = 0.5 if uptime > 60 else min(w.backoff * 2, 30.0)
                log.error("worker exited; restarting", extra={
                    "worker": w.index, "code": code, "restart_in_s": w.backoff})  # fmt: skip
                w.restarts += 1
                w.proc = None
                await asyncio.sleep(w.backoff)
                if not self.stopping:
                    self._spawn(w)

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        settings = self.loaded.config.server
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.drain_delay_s + settings.shutdown_grace_s + 10
        for w in self.workers:
            if w.proc is None:
                continue
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.to_thread(w.proc.wait, remaining)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                await asyncio.to_thread(w.proc.wait, 5)
        if self._admin is not None:
            await self._admin.stop()
        with contextlib.suppress(OSError):
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
        self._done.set()

    async def wait(self) -> None:
        await self._done.wait()

    # ------------------------------------------------------------ admin

    async def _ask(self, worker: _Worker, path: str) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(2.0):
                return await fetch(worker.admin, path)
        except (OSError, TimeoutError, ValueError, IndexError):
            return 0, b""

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            alive = any(w.proc is not None and w.proc.poll() is None for w in self.workers)
            return (200, "text/plain", b"ok\n") if alive else (503, "text/plain", b"no worker\n")
        answers = await asyncio.gather(*(self._ask(w, path) for w in self.workers))
        if path == "/metrics":
            text = merge_metrics([body.decode() for status, body in answers if status == 200])
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
        if path in ("/readyz", "/status"):
            per_worker: list[dict[str, Any]] = []
            for w, (status, body) in zip(self.workers, answers, strict=True):
                try:
                    detail = json.loads(body) if body else None
                except ValueError:
                    detail = None
                per_worker.append({
                    "worker": w.index, "pid": w.proc.pid if w.proc else None,
                    "listen": w.address, "restarts": w.restarts, "http_status": status,
                    "detail": detail,
                })  # fmt: skip
            ready = not self.stopping and all(p["http_status"] == 200 for p in per_worker)
            doc = {"ready": ready, "workers": per_worker}
            code = 200 if path == "/status" or ready else 503
            return code, "application/json", (json.dumps(doc, indent=1) + "\n").encode()
        return 404, "text/plain", b"not found\n"


async def supervise(
    loaded: LoadedConfig,
    config_path: str,
    workers: int,
    *,
    listen: str | None = None,
    admin: str | None = None,
    watch: bool = True,
) -> None:
    sup = Supervisor(loaded, config_path, workers, listen=listen, admin=admin, watch=watch)
    await sup.start()
    await sup.wait()
