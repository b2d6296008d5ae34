"""Where the CPU goes at saturation, thread by thread: which of a sidecar's threads run, how
long each waits for a core, and what Envoy, Redis and the rest of the machine take meanwhile.

It answers a question the main run cannot: why ``--workers 2`` gains on one transport and not on
the other on a 2-core machine. For each scenario, in interleaved rounds with its sidecar alone
(the others stopped, as one sidecar per Envoy is; the measured one started again and warmed
when it was stopped), ``wrk`` (closed loop, as in ``bench.run``'s throughput phase) runs for
``--duration`` seconds while every thread of the sidecar's processes, of Envoy and of Redis is
read from ``/proc/<pid>/task/<tid>/schedstat`` before and after: time on a CPU and time spent
runnable but waiting for one (the run-queue wait; the kernel's schedstats, no tracing, no
slow-down). Threads
are grouped by process role and name with digits dropped (``worker-1``'s ``grpc_global_tim``
...). Per request: CPU µs and run-queue wait µs of each group; "rest" is the machine's busy time
not in any of them (wrk, the harness, the kernel's soft interrupts).

With ``--rate R`` the load is the open-loop generator at R requests/s instead (as in
``bench.run``'s latency phase): where a request's CPU and wake-ups go below saturation, where
the latency target is measured.

Run: ``python -m bench.threads [--scenarios a,b] [--rounds 3] [--duration 8] [--rate R]``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadResult, open_loop, run_wrk
from bench.procs import CLK_TCK, machine_shares, machine_ticks
from bench.run import _requests
from bench.stack import Stack, scenario
from bench.traffic import make_traffic

__all__ = ["ThreadTime", "group_name", "main", "medians", "per_request", "read_threads", "table"]

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
    times it was put on a CPU (each wake-up from a wait is one)."""

    cpu_ns: int
    wait_ns: int
    runs: int


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
                    key = f"{group_name(role, comm)} [{task.name}]"
                    out[key] = ThreadTime(int(cpu), int(wait), int(runs))
    return out


Figures = tuple[float, float, float, int]


def per_request(
    before: Mapping[str, ThreadTime], after: Mapping[str, ThreadTime], requests: int
) -> dict[str, Figures]:
    """Per group, per request between two :func:`read_threads` readings: CPU µs, run-queue
    wait µs, times put on a CPU; and how many threads. A thread born in between counts from
    zero."""
    n = max(1, requests)
    groups: dict[str, list[float]] = {}
    for key, end in after.items():
        start = before.get(key, ThreadTime(0, 0, 0))
        acc = groups.setdefault(key.rpartition(" [")[0], [0.0, 0.0, 0.0, 0])
        acc[0] += (end.cpu_ns - start.cpu_ns) / 1e3 / n
        acc[1] += (end.wait_ns - start.wait_ns) / 1e3 / n
        acc[2] += (end.runs - start.runs) / n
        acc[3] += 1
    return {g: (cpu, wait, runs, int(count)) for g, (cpu, wait, runs, count) in groups.items()}


Row = tuple[str, float, float, float, Mapping[str, Figures]]


def table(rows: Sequence[Row]) -> str:
    """Markdown, one block per scenario (req/s, the machine's idle share, the rest's CPU),
    then each group with at least 1 µs of CPU or wait per request, largest CPU first."""
    out = [
        "| scenario | req/s | idle | group (threads) | CPU µs/req | run-queue wait µs/req "
        "| runs/req |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for key, rps, idle, rest_us, groups in rows:
        out.append(
            f"| `{key}` | {rps:,.0f} | {idle:.0%} | rest of the machine | {rest_us:.0f} | | |"
        )
        for name, (cpu, wait, runs, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            if cpu >= 1 or wait >= 1:
                out.append(f"| | | | {name} ({count}) | {cpu:.1f} | {wait:.1f} | {runs:.2f} |")
    return "\n".join(out)


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
) -> list[Row]:
    """Per scenario, medians over ``rounds``: req/s, the machine's idle share, the rest's
    µs/req, and each group's figures. ``rate``: open loop at that many requests/s instead of
    wrk's closed loop."""
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
                n = max(1, result.requests)
                busy_s = (ticks_after[0] - ticks[0]) / CLK_TCK
                rest = busy_s * 1e6 / n - sum(f[0] for f in groups.values())
                share = machine_shares(ticks, ticks_after)["idle"]
                samples.setdefault(s.key, []).append((s.key, result.rps, share, rest, groups))
                print(f"  round {round_no + 1} {s.key:<24} {result.rps:8,.0f} req/s", flush=True)
    return [medians(runs) for runs in samples.values()]


def medians(runs: Sequence[Row]) -> Row:
    """One scenario's rounds folded: the median of every figure (a group missing from a
    round counts 0 there), the most threads a group had."""
    none: Figures = (0.0, 0.0, 0.0, 0)

    def med(values: Iterable[float]) -> float:
        return statistics.median(values)

    groups = {
        g: (
            med(run[4].get(g, none)[0] for run in runs),
            med(run[4].get(g, none)[1] for run in runs),
            med(run[4].get(g, none)[2] for run in runs),
            max(run[4].get(g, none)[3] for run in runs),
        )
        for g in {g for run in runs for g in run[4]}
    }
    rps, idle, rest = med(r[1] for r in runs), med(r[2] for r in runs), med(r[3] for r in runs)
    return (runs[0][0], rps, idle, rest, groups)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, help="open loop at this many req/s (not wrk)")
    args = parser.parse_args(argv)
    keys = [k for k in args.scenarios.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="extproc-threads-") as tmp:
        rows = measure(
            keys, rounds=args.rounds, duration_s=args.duration,
            connections=args.connections, workdir=Path(tmp), rate=args.rate,
        )  # fmt: skip
    load = f"open loop at {args.rate:g} req/s" if args.rate else f"wrk -c {args.connections}"
    print(
        f"\nCPU and run-queue wait per request by thread group (schedstat), {load} for "
        f"{args.duration:g} s, medians of {args.rounds} interleaved rounds:\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
