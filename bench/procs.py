"""The processes the harness starts, stops (by pid, only its own) and measures.

Envoy, the sidecar and Redis come from ``extproc.testing``; this module adds a plain process
for the bare servicers and the SDK, CPU time from ``/proc``, and the SDK's own venv.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from extproc.testing.processes import stop_popen

__all__ = [
    "CLK_TCK",
    "SDK_PACKAGES",
    "MachineReading",
    "Proc",
    "ProcError",
    "cpu_seconds",
    "ensure_sdk_venv",
    "process_tree",
    "read_until",
    "sdk_python",
    "wait_tcp",
    "which_or_hint",
]

BENCH_DIR = Path(__file__).resolve().parent
SDK_VENV = BENCH_DIR / ".venvs" / "sdk"
#: envoy-extproc-sdk 0.1.1 (2022) imports ``ddtrace.Span``, which ddtrace 3 removed
SDK_PACKAGES = ("envoy-extproc-sdk==0.1.1", "grpcio-health-checking", "xds-protos", "ddtrace<3")
#: /proc's unit of CPU time (USER_HZ), ticks per second
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcError(RuntimeError):
    """A process of the harness did not start; the message ends with its log."""


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc, at this moment)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes, in seconds (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


class MachineReading(NamedTuple):
    """The whole machine's idle and stolen CPU time so far, from ``/proc/stat``'s ``cpu``
    line, in ticks (USER_HZ), and when it was read."""

    idle: int  #: idle + iowait, all CPUs
    steal: int  #: taken by the hypervisor
    cpus: int  #: the ``cpuN`` lines: CPUs online
    at: float  #: ``time.monotonic()`` at the reading


def machine_ticks(stat: str | None = None, at: float | None = None) -> MachineReading:
    """Read ``/proc/stat`` (``stat``, ``at``: that file's text and the time, for tests).

    Only idle and steal are kept: busy is the rest of the elapsed time. The user and system
    fields are sampled at the scheduler's tick, and on these VMs a load of short bursts (a
    sidecar at 1,000 req/s) made them read 0.5-2 % busy in rows where the stack's processes'
    own CPU time (exact, from the scheduler) added up to 10-25 % of the machine, and more
    ticks than elapsed time in other windows. Idle, counted on entering and leaving the idle
    loop, matched the processes' sum to within a point (2026-12-08)."""
    text = stat if stat is not None else Path("/proc/stat").read_text()
    now = time.monotonic() if at is None else at
    lines = text.split("\n")
    fields = [int(v) for v in lines[0].split()[1:]]
    fields += [0] * (8 - len(fields))
    idle, iowait, steal = fields[3], fields[4], fields[7]
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return MachineReading(idle + iowait, steal, max(1, cpus), now)


def machine_shares(before: MachineReading, after: MachineReading) -> dict[str, float]:
    """Shares of the machine's CPU time (elapsed time x CPUs) between two readings: idle,
    steal, and busy (the rest) - how crowded the machine was while a sample ran, which its
    latency tail follows."""
    capacity = (after.at - before.at) * CLK_TCK * after.cpus
    if capacity <= 0:
        return {"busy": 0.0, "idle": 0.0, "steal": 0.0}
    idle = min(1.0, max(0.0, (after.idle - before.idle) / capacity))
    steal = min(1.0 - idle, max(0.0, (after.steal - before.steal) / capacity))
    return {"busy": 1.0 - idle - steal, "idle": idle, "steal": steal}


def machine_busy_seconds(before: MachineReading, after: MachineReading) -> float:
    """CPU seconds the whole machine was busy between two readings (all CPUs)."""
    return machine_shares(before, after)["busy"] * (after.at - before.at) * after.cpus


def wait_tcp(host: str, port: int, timeout: float, alive: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise ProcError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def read_until(
    proc: subprocess.Popen[str],
    fd: int,
    done: Callable[[bytes], bool],
    timeout: float,
) -> bytes:
    """Read the pipe ``fd`` from ``proc`` (a tracer saying it is ready) until ``done`` holds
    for all read so far, and return that. Raises :class:`TimeoutError` when ``timeout``
    seconds pass or ``proc`` exits first, :class:`EOFError` when the pipe closes first."""
    deadline = time.monotonic() + timeout
    seen = b""
    while not done(seen):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise TimeoutError(f"not ready: {seen[-300:]!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"the pipe closed: {seen[-300:]!r}")
            seen += chunk
    return seen


class Proc:
    """One child process with its output in ``log_path``; ``stop`` signals only that pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C reaches the harness only; it stops us
            )
        return self

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ProcError(
                f"{self.name} exited with {self._proc.returncode}; log {self.log_path}:\n"
                + self.tail()
            )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is not None:
            stop_popen(self._proc, timeout)  # SIGTERM, then SIGKILL: the tests' helper


def sdk_python() -> Path:
    return SDK_VENV / "bin" / "python"


def ensure_sdk_venv(log: Path) -> Path:
    """Create ``bench/.venvs/sdk`` with envoy-extproc-sdk on first use (pip, from the
    registry); the Python of that venv."""
    python = sdk_python()
    stamp = SDK_VENV / ".bench-stamp"
    wanted = "\n".join(SDK_PACKAGES)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"creating {SDK_VENV} for envoy-extproc-sdk (once) ...", file=sys.stderr, flush=True)
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(SDK_VENV)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *SDK_PACKAGES],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise ProcError(f"pip install into {SDK_VENV} failed; see {log}")
    stamp.write_text(wanted)
    return python


def which_or_hint(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ProcError(f"{tool} is not installed: {hint}")
    return found


def kernel_facts(root: Path = Path("/")) -> dict[str, str]:
    """What of the kernel decides how long another task can hold a CPU the stack needs:
    its preemption model and its DAMON threads (``root``: a tree in place of ``/``, for
    tests). Found on 2026-12-07: a DAMON thread on a kernel without preemption held one of
    the two vCPUs for ~4 ms twice a second, and that was half the p99 at 1,000 req/s."""
    return {"kernel preemption": _preemption(root), "kernel DAMON": _damon(root)}


def _preemption(root: Path) -> str:
    with contextlib.suppress(OSError):  # debugfs, where mounted: "none (voluntary) full"
        text = (root / "sys/kernel/debug/sched/preempt").read_text()
        start, end = text.find("("), text.find(")")
        if 0 <= start < end:
            return text[start + 1 : end]
    try:
        import gzip

        with gzip.open(root / "proc/config.gz", "rt") as f:
            config = {line.strip() for line in f if line.endswith("=y\n")}
    except OSError:
        return "unknown"
    model = "unknown"
    for option, name in (
        ("CONFIG_PREEMPT_NONE=y", "none"),
        ("CONFIG_PREEMPT_VOLUNTARY=y", "voluntary"),
        ("CONFIG_PREEMPT=y", "full"),
        ("CONFIG_PREEMPT_LAZY=y", "lazy"),
        ("CONFIG_PREEMPT_RT=y", "rt"),
    ):
        if option in config:
            model = name
    if "CONFIG_PREEMPT_DYNAMIC=y" in config:
        with contextlib.suppress(OSError):
            for arg in (root / "proc/cmdline").read_text().split():
                if arg.startswith("preempt="):
                    return f"{arg.partition('=')[2]} (preempt= on the command line)"
        return f"{model} (the build's default)"
    return model


def _damon(root: Path) -> str:
    admin = root / "sys/kernel/mm/damon/admin/kdamonds"
    if not admin.is_dir():
        return "not in this kernel (or not exposed)"
    running = []
    for kdamond in sorted(p for p in admin.iterdir() if p.name.isdigit()):
        with contextlib.suppress(OSError, ValueError):
            if (kdamond / "state").read_text().strip() != "on":
                continue
            context = kdamond / "contexts/0"
            ops = (context / "operations").read_text().strip()
            sample = int((context / "monitoring_attrs/intervals/sample_us").read_text()) / 1000
            actions = sorted(
                (s / "action").read_text().strip()
                for s in (context / "schemes").iterdir()
                if s.name.isdigit()
            )
            running.append(
                f"{kdamond.name}: {ops}, sampling every {sample:g} ms"
                + (f", schemes {'/'.join(actions)}" if actions else "")
            )
    return "on (" + "; ".join(running) + ")" if running else "off"
