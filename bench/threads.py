"""Where the CPU goes at saturation, thread by thread: which of a sidecar's threads run, how
long each waits for a core, and what Envoy, Redis and the rest of the machine take meanwhile.

It answers a question the main run cannot: why ``--workers 2`` gains on one transport and not on
the other on a 2-core machine. For each scenario, in interleaved rounds with its sidecar alone
(the others stopped, as one sidecar per Envoy is; the measured one started again and warmed
when it was stopped), ``wrk`` (closed loop, as in ``bench.run``'s throughput phase) runs for
``--duration`` seconds while every thread of the sidecar's processes, of Envoy and of Redis is
read from ``/proc/<pid>/task/<tid>/schedstat`` and ``status`` before and after: time on a CPU,
time spent runnable but waiting for one (the run-queue wait), and how often it went on a CPU,
split into the times it had slept (``voluntary_ctxt_switches``: it blocked, and something woke
it) and the times it had been preempted (``nonvoluntary_ctxt_switches``: it was still runnable
when the scheduler put another task on its CPU). The kernel's own counters: no tracing, no
slow-down. Threads
are grouped by process role and name with digits dropped (``worker-1``'s ``grpc_global_tim``
...). Per request: CPU µs and run-queue wait µs of each group; "rest" is the machine's busy time
not in any of them (wrk, the harness, the kernel's soft interrupts).

With ``--rate R`` the load is the open-loop generator at R requests/s instead (as in
``bench.run``'s latency phase): where a request's CPU and wake-ups go below saturation, where
the latency target is measured.

With ``--trace``, ``perf record`` also traces every ``sched:sched_waking`` of the sidecar's
event-loop threads (a process's main thread) and every ``sched:sched_switch`` that takes one
off its CPU, in the middle of the measured load, and a second table says per request who woke
them - a thread of the sidecar (grpc's poller hands completions to the loop through a socket),
Envoy or Redis (a write on a socket the loop waits on wakes it in the writer's context), or an
interrupt on an idle CPU (a timer expiring, or a packet delivered there) - and which task took
the CPU when a loop was preempted. ``sched_waking``, not ``sched_wakeup``: the first fires in
the waker's context; the second, for a wake-up of a task on another CPU, often fires on that
CPU once an inter-processor interrupt delivers it, in its idle task's context, which would
name the idle CPU for wake-ups that Envoy, Redis or a sidecar thread raised. Tracing these
few events costs little, but it is tracing: compare scenarios measured the same way. Needs
``perf`` (``linux-perf``) and root or ``kernel.perf_event_paranoid`` <= -1.

Run: ``python -m bench.threads [--scenarios a,b] [--rounds 3] [--duration 8] [--rate R]
[--trace]``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadResult, open_loop, run_wrk
from bench.procs import machine_busy_seconds, machine_shares, machine_ticks, process_tree
from bench.run import _requests
from bench.stack import Stack, scenario
from bench.traffic import make_traffic

__all__ = [
    "ThreadTime",
    "group_name",
    "main",
    "medians",
    "parse_trace",
    "per_request",
    "read_threads",
    "table",
    "trace_table",
]

DEFAULT_SCENARIOS = (
    "extproc-jwt-rl",
    "extproc-jwt-rl-w2",
    "extproc-jwt-rl-h2",
    "extproc-jwt-rl-w2-h2",
)
_DIGITS = re.compile(r"\d+")
#: seconds of closed-loop load on a sidecar before it is measured, when it has just started
WARM_S = 3.0


@dataclass(frozen=True, slots=True)
class ThreadTime:
    """One thread's schedstat: ns on a CPU, ns runnable but waiting for one, and how many
    times it was put on a CPU (each wake-up from a wait is one); and from its status, how many
    times it left the CPU asleep (each is a wake-up later) and how many times preempted."""

    cpu_ns: int
    wait_ns: int
    runs: int
    sleeps: int = 0
    preempted: int = 0


def group_name(role: str, comm: str) -> str:
    """``role: comm`` with runs of digits replaced by ``N`` (thread pools name by index); a
    process's main thread is ``comm`` "main" (other Python threads share its name)."""
    return f"{role}: {_DIGITS.sub('N', comm.strip())}"


def read_threads(roles: Mapping[int, str], root: Path = Path("/proc")) -> dict[str, ThreadTime]:
    """Every thread of the processes in ``roles`` (pid -> role), keyed ``role: comm [tid]``.
    A process or thread gone meanwhile is left out."""
    out: dict[str, ThreadTime] = {}
    for pid, role in roles.items():
        with contextlib.suppress(OSError):
            tids = [t for t in (root / str(pid) / "task").iterdir() if t.name.isdigit()]
            for task in tids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    comm = "main" if task.name == str(pid) else (task / "comm").read_text()
                    cpu, wait, runs = (task / "schedstat").read_text().split()[:3]
                    switches = _switches(task / "status")
                    key = f"{group_name(role, comm)} [{task.name}]"
                    out[key] = ThreadTime(int(cpu), int(wait), int(runs), *switches)
    return out


def _switches(status: Path) -> tuple[int, int]:
    """``voluntary_ctxt_switches`` and ``nonvoluntary_ctxt_switches`` from a task's status
    (0 where a line is missing)."""
    found = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    with contextlib.suppress(OSError):
        for line in status.read_text().splitlines():
            name, _, value = line.partition(":")
            if name in found:
                found[name] = int(value)
    return found["voluntary_ctxt_switches"], found["nonvoluntary_ctxt_switches"]


#: per request: CPU µs, run-queue wait µs, times on a CPU, of them after a sleep and after a
#: preemption; and how many threads
Figures = tuple[float, float, float, float, float, int]


def per_request(
    before: Mapping[str, ThreadTime], after: Mapping[str, ThreadTime], requests: int
) -> dict[str, Figures]:
    """Per group, per request between two :func:`read_threads` readings: CPU µs, run-queue
    wait µs, times put on a CPU, sleeps, preemptions; and how many threads. A thread born in
    between counts from zero."""
    n = max(1, requests)
    groups: dict[str, list[float]] = {}
    for key, end in after.items():
        start = before.get(key, ThreadTime(0, 0, 0))
        acc = groups.setdefault(key.rpartition(" [")[0], [0.0, 0.0, 0.0, 0.0, 0.0, 0])
        acc[0] += (end.cpu_ns - start.cpu_ns) / 1e3 / n
        acc[1] += (end.wait_ns - start.wait_ns) / 1e3 / n
        acc[2] += (end.runs - start.runs) / n
        acc[3] += (end.sleeps - start.sleeps) / n
        acc[4] += (end.preempted - start.preempted) / n
        acc[5] += 1
    return {g: (f[0], f[1], f[2], f[3], f[4], int(f[5])) for g, f in groups.items()}


#: what ``--trace`` counts: a loop thread woken, or preempted (taken off its CPU runnable)
WOKEN, PREEMPTED = "woken by", "preempted by"
#: per (:data:`WOKEN` or :data:`PREEMPTED`, who), events per request
Traced = Mapping[tuple[str, str], float]
#: a scenario's req/s, the machine's idle share, the rest's µs/req, its thread groups; and with
#: ``--trace``, who woke and who preempted its event loops, per request
Row = tuple[str, float, float, float, Mapping[str, Figures], Traced]

#: the waker of a wake-up raised in interrupt context on an idle CPU (perf's ``swapper``, tid 0)
IDLE_CPU = "an interrupt on an idle CPU (a timer, or a packet)"
#: a ``perf script -F comm,tid,trace`` line of ``sched:sched_waking``: the waker's comm and tid,
#: then the woken task's pid (a thread id)
_WAKEUP = re.compile(r"^\s*(.*?)\s+(\d+)\s+comm=.*? pid=(\d+) prio=")
#: ... of ``sched:sched_switch``: the task leaving the CPU and its state (``R``, ``R+``:
#: still runnable, so preempted), then the task taking it
_SWITCH = re.compile(r"prev_pid=(\d+) .*?prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+) ")


def table(rows: Sequence[Row]) -> str:
    """Markdown, one block per scenario (req/s, the machine's idle share, the rest's CPU),
    then each group with at least 1 µs of CPU or wait per request, largest CPU first."""
    out = [
        "| scenario | req/s | idle | group (threads) | CPU µs/req | run-queue wait µs/req "
        "| runs/req | after a sleep | after a preemption |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key, rps, idle, rest_us, groups, _ in rows:
        out.append(
            f"| `{key}` | {rps:,.0f} | {idle:.0%} | rest of the machine | {rest_us:.0f} | | | | |"
        )
        for name, figures in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            cpu, wait, runs, sleeps, preempted, count = figures
            if cpu >= 1 or wait >= 1:
                out.append(
                    f"| | | | {name} ({count}) | {cpu:.1f} | {wait:.1f} | {runs:.2f} "
                    f"| {sleeps:.2f} | {preempted:.2f} |"
                )
    return "\n".join(out)


def parse_trace(
    text: str, loops: Iterable[int], names: Mapping[int, str]
) -> dict[tuple[str, str], int]:
    """Counts by (:data:`WOKEN`, waker) and (:data:`PREEMPTED`, the task that took the CPU)
    for the threads ``loops``, from ``perf script -F comm,tid,trace`` of ``sched:sched_waking``
    and ``sched:sched_switch``. A thread in ``names`` (tid -> group, as :func:`read_threads`
    names them) counts by its group; a waker of tid 0 as :data:`IDLE_CPU`; any other as
    ``other: comm`` (digits dropped). A switch away from a loop that slept is not counted (its
    wake-up is)."""
    targets = set(loops)
    out: dict[tuple[str, str], int] = {}

    def who(tid: int, comm: str) -> str:
        return names.get(tid) or group_name("other", comm)

    for line in text.splitlines():
        if (m := _SWITCH.search(line)) is not None:
            if int(m.group(1)) not in targets or not m.group(2).startswith("R"):
                continue
            key = (PREEMPTED, who(int(m.group(4)), m.group(3)))
        elif (m := _WAKEUP.match(line)) is not None:
            if int(m.group(3)) not in targets:
                continue
            tid = int(m.group(2))
            key = (WOKEN, IDLE_CPU if tid == 0 else who(tid, m.group(1)))
        else:
            continue
        out[key] = out.get(key, 0) + 1
    return out


def trace_table(rows: Sequence[Row]) -> str:
    """Markdown: per scenario, its event loops' wake-ups and preemptions per request, in all
    and by whom (those at 0.01 per request or more, most first)."""
    out = ["| scenario | the loop was | by | per request |", "|---|---|---|---:|"]
    for key, _, _, _, _, traced in rows:
        first = f" `{key}` "
        for kind in (WOKEN, PREEMPTED):
            mine = {who: n for (k, who), n in traced.items() if k == kind}
            out.append(f"|{first}| {kind} | all | {sum(mine.values()):.2f} |")
            first = " "
            for name, n in sorted(mine.items(), key=lambda kv: -kv[1]):
                if n >= 0.01:
                    out.append(f"| | | {name} | {n:.2f} |")
    return "\n".join(out)


def _loops(roles: Mapping[int, str]) -> list[int]:
    """The event-loop threads: each serving process's main thread (not a supervisor's)."""
    return [pid for pid, role in roles.items() if role == "sidecar" or role.startswith("worker-")]


def _names(threads: Iterable[str]) -> dict[int, str]:
    """tid -> group from :func:`read_threads` keys (``group [tid]``)."""
    out = {}
    for key in threads:
        group, _, tid = key.rpartition(" [")
        out[int(tid.rstrip("]"))] = group
    return out


class LoopTrace:
    """``perf record`` of the sidecar's loops' ``sched:sched_waking`` and of their
    ``sched:sched_switch`` away from a CPU, from ``delay_s`` after :meth:`start` returns for
    ``span_s`` seconds (inside the measured load, started right after it, away from its
    edges). perf's ``--delay`` counts from its workload's start, and :meth:`start` returns
    once that has begun, so a slow start-up of perf does not move the window."""

    def __init__(self, out: Path, loops: Sequence[int], *, delay_s: float, span_s: float) -> None:
        perf = shutil.which("perf")
        if perf is None:
            raise RuntimeError("--trace needs perf (apt-get install linux-perf)")
        self.out, self.loops, self.span_s, self._perf = out, list(loops), span_s, perf
        woken = " || ".join(f"pid == {tid}" for tid in self.loops)
        leaving = " || ".join(f"prev_pid == {tid}" for tid in self.loops)
        delay_ms = round(delay_s * 1000)  # perf refuses a delay of 0
        self._cmd = [
            perf, "record", "-q", "-a", *(["--delay", str(delay_ms)] if delay_ms > 0 else []),
            "-e", "sched:sched_waking", "--filter", woken,
            "-e", "sched:sched_switch", "--filter", leaving,
            "-o", str(out), "--", "sleep", f"{delay_s + span_s:g}",
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start perf; return once its workload runs (its events go on ``delay_s`` later)."""
        self._proc = subprocess.Popen(self._cmd, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not _has_child(self._proc.pid, "sleep"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._proc.kill()
                _, err = self._proc.communicate()
                raise RuntimeError(f"perf record did not start: {err.decode(errors='replace')}")
            time.sleep(0.02)

    def finish(self, names: Mapping[int, str]) -> dict[tuple[str, str], int]:
        """Wait for the record to end (it ends by itself), then count (:func:`parse_trace`)."""
        assert self._proc is not None
        try:
            _, err = self._proc.communicate(timeout=self.span_s + 30)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(signal.SIGINT)
            _, err = self._proc.communicate(timeout=10)
        if self._proc.returncode != 0:
            raise RuntimeError(f"perf record failed: {err.decode(errors='replace')[-500:]}")
        text = subprocess.run(
            [self._perf, "script", "-i", str(self.out), "-F", "comm,tid,trace"],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
        return parse_trace(text, self.loops, names)


def _has_child(pid: int, comm: str) -> bool:
    """Whether a descendant of ``pid`` named ``comm`` runs now (perf's workload has been
    exec'd: before that, perf's fork of itself waits, named ``perf``)."""
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                return True
    return False


def _roles(stack: Stack, key: str) -> dict[int, str]:
    assert stack.envoy is not None and stack.envoy.pid is not None
    roles = {stack.envoy.pid: "envoy"}
    if stack.redis is not None and stack.redis.pid:
        roles[stack.redis.pid] = "redis"
    pids = stack.sidecar_pids(key)
    if len(pids) == 1:
        roles[pids[0]] = "sidecar"
    else:  # the supervisor first, then its workers in pid order
        roles[pids[0]] = "supervisor"
        for i, pid in enumerate(sorted(pids[1:])):
            roles[pid] = f"worker-{i}"
    return roles


def measure(
    keys: Sequence[str],
    *,
    rounds: int,
    duration_s: float,
    connections: int,
    workdir: Path,
    rate: float | None = None,
    trace: bool = False,
) -> list[Row]:
    """Per scenario, medians over ``rounds``: req/s, the machine's idle share, the rest's
    µs/req, and each group's figures. ``rate``: open loop at that many requests/s instead of
    wrk's closed loop. ``trace``: trace who wakes and who preempts the event loops (the
    middle of the load: from 1 s in to 1 s before its end; ``duration_s`` at least 4)."""
    if trace and duration_s < 4:
        raise ValueError("--trace needs a duration of 4 s or more")
    chosen = [scenario(k) for k in keys]
    traffic = make_traffic(1000)
    script = traffic.write_wrk_script(workdir)
    samples: dict[str, list[Row]] = {}
    with Stack(chosen, traffic, workdir / "stack") as stack:
        for round_no in range(rounds):
            for s in chosen:
                # alone, as one sidecar per Envoy is; warmed (connections, caches, every
                # token seen) in the first round and whenever it was started again
                if stack.alone(s.key) or round_no == 0:
                    run_wrk(stack.port(s.key), script, duration_s=WARM_S, connections=connections)
                roles = _roles(stack, s.key)
                requests = _requests(stack, s, traffic) if rate else []
                before, ticks = read_threads(roles), machine_ticks()
                tracing = None
                if trace:
                    tracing = LoopTrace(
                        workdir / "loops.data", _loops(roles), delay_s=1.0, span_s=duration_s - 2
                    )
                    tracing.start()
                result: LoadResult
                if rate:
                    result = open_loop(
                        stack.port(s.key), requests, rate=rate, duration_s=duration_s
                    )
                else:
                    result = run_wrk(
                        stack.port(s.key), script, duration_s=duration_s, connections=connections
                    )
                after, ticks_after = read_threads(roles), machine_ticks()
                if result.errors(frozenset({"200"})):
                    raise RuntimeError(f"{s.key}: errors: {result.statuses}")
                groups = per_request(before, after, result.requests)
                traced: dict[tuple[str, str], float] = {}
                if tracing is not None:  # per request at the load's rate, over the traced span
                    counts = tracing.finish(_names([*before, *after]))
                    per = max(1.0, result.rps * (duration_s - 2))
                    traced = {key: n / per for key, n in counts.items()}
                n = max(1, result.requests)
                busy_s = machine_busy_seconds(ticks, ticks_after)
                rest = busy_s * 1e6 / n - sum(f[0] for f in groups.values())
                share = machine_shares(ticks, ticks_after)["idle"]
                row = (s.key, result.rps, share, rest, groups, traced)
                samples.setdefault(s.key, []).append(row)
                print(f"  round {round_no + 1} {s.key:<24} {result.rps:8,.0f} req/s", flush=True)
    return [medians(runs) for runs in samples.values()]


def medians(runs: Sequence[Row]) -> Row:
    """One scenario's rounds folded: the median of every figure (a group or a traced count
    missing from a round counts 0 there), the most threads a group had."""
    none: Figures = (0.0, 0.0, 0.0, 0.0, 0.0, 0)

    def med(values: Iterable[float]) -> float:
        return statistics.median(values)

    groups: dict[str, Figures] = {}
    for g in {g for run in runs for g in run[4]}:
        figures = [run[4].get(g, none) for run in runs]
        cpu, wait, on, sleeps, preempted = (med(f[i] for f in figures) for i in range(5))
        groups[g] = (cpu, wait, on, sleeps, preempted, max(f[5] for f in figures))
    traced = {k: med(run[5].get(k, 0.0) for run in runs) for k in {k for r in runs for k in r[5]}}
    rps, idle, rest = med(r[1] for r in runs), med(r[2] for r in runs), med(r[3] for r in runs)
    return (runs[0][0], rps, idle, rest, groups, traced)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, help="open loop at this many req/s (not wrk)")
    parser.add_argument(
        "--trace", action="store_true", help="trace who wakes and preempts the loops (perf)"
    )
    args = parser.parse_args(argv)
    keys = [k for k in args.scenarios.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="extproc-threads-") as tmp:
        rows = measure(
            keys, rounds=args.rounds, duration_s=args.duration,
            connections=args.connections, workdir=Path(tmp), rate=args.rate,
            trace=args.trace,
        )  # fmt: skip
    load = f"open loop at {args.rate:g} req/s" if args.rate else f"wrk -c {args.connections}"
    print(
        f"\nCPU and run-queue wait per request by thread group (schedstat), {load} for "
        f"{args.duration:g} s, medians of {args.rounds} interleaved rounds:\n"
    )
    print(table(rows))
    if args.trace:
        print(
            f"\nWake-ups and preemptions of the sidecar's event loops (perf: sched_waking, "
            f"sched_switch) per request, {args.duration - 2:g} s from 1 s into each load, "
            f"medians of {args.rounds} rounds:\n"
        )
        print(trace_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
