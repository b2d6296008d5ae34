"""How much of the tail at a fixed rate is the machine's, not the stack's: the CPU time that
tasks outside the benchmark take in runs long enough to hold a request up.

Found on 2026-12-07: on this project's VMs the kernel's DAMON thread (``kdamond.0``, physical
address monitoring with a ``pageout`` scheme, sampling every 500 ms) takes one of the two vCPUs
for 3-5 ms twice a second, and the kernel is built without preemption (``PREEMPT_NONE``), so a
task woken on that CPU waits until it is done. At 1,000 req/s those windows delay ~1 % of the
requests through a sidecar - the p99 itself. This tool measures that for any machine.

For each scenario (each sidecar alone, started again and warmed at the rate, as in
``bench.run``'s open-loop phase; ``passthrough`` always first, the reference for *added*): the
open-loop generator at ``--rate`` for ``--duration`` seconds while ``perf`` records every
context switch and fork on every CPU (``sched:sched_switch``, ``sched:sched_process_fork``, on
the monotonic clock the generator uses). A *foreign stall* is a run of at least
``--min-run-ms`` (0.5) by a task that is not the benchmark's (this process, every process
under it - Envoy, the sidecars, Redis, perf - and any process one of them forked) and not the
idle task. Each request is a span from its scheduled send time to its reply; the report
gives, per scenario, the p99 of all requests and of those that overlap no foreign stall, both
also less passthrough's (medians over rounds), the share of requests that overlapped one, and
who stalled. The *all requests* figure is the one the targets are judged on; the other says how
much of it the machine's own threads put there.

``perf`` costs every context switch a little. ``--perf-cost`` measures how much: each scenario
runs twice a round, once recorded and once not (which goes first alternates by round), and a
second table gives, per scenario, the p50 and p99 and the CPU per request (sidecar and Envoy)
of both, with the median of the rounds' differences.

Run: ``python -m bench.stalls [--scenarios a,b] [--rate 1000] [--duration 6] [--rounds 3]
[--perf-cost] [--out FILE.md]``. Needs ``perf`` (Debian: ``linux-perf``) and the right to trace
every CPU (root, or ``kernel.perf_event_paranoid`` -1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from bench.load import LoadResult, open_loop, percentile_ms
from bench.procs import process_tree, read_until
from bench.stack import Stack, scenario
from bench.traffic import make_traffic

__all__ = [
    "MIN_RUN_S", "Stall", "Switches", "figures", "main", "parse_switches", "perf_cost_table",
    "split_tail", "table",
]  # fmt: skip

DEFAULT_SCENARIOS = ("bare-http2-redis", "extproc-h2", "extproc-jwt-rl-h2", "extproc-jwt-rl")
REFERENCE = "passthrough"
#: the shortest run of a foreign task that counts as a stall, seconds: a request through a
#: sidecar takes ~0.5 ms at 1,000 req/s here, so a shorter run cannot hold one up by much
MIN_RUN_S = 0.0005

#: a ``perf script -F pid,tid,cpu,time,trace`` line of ``sched:sched_switch``
_SWITCH = re.compile(
    r"^\s*(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+prev_comm=(.*?) prev_pid=(\d+) .*"
    r"==> next_comm=(.*?) next_pid=(\d+) "
)
#: ... and of ``sched:sched_process_fork`` (a thread's creation too)
_FORK = re.compile(r"^\s*(\d+)/\d+\s+\[\d+\]\s+[\d.]+:\s+comm=.* child_pid=(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Stall:
    """A foreign task's run on one CPU, ``start`` to ``end`` on the monotonic clock."""

    start: float
    end: float
    cpu: int
    comm: str
    pid: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


def parse_switches(lines: Iterable[str], ours: set[int], min_run: float) -> list[Stall]:
    """The runs of at least ``min_run`` seconds by tasks whose process is not in ``ours`` (and
    not the idle task), from ``perf script`` lines of context switches and forks (a process
    forked by one of ``ours`` is ours: it may have exited before anyone could look it up).
    A run is known from the switch that put its task on the CPU to the one that took it off;
    the first run seen on each CPU has no start and is left out."""
    ours = set(ours)
    on_cpu: dict[int, float] = {}  # cpu -> when its current task was switched in
    stalls = []
    for line in lines:
        m = _SWITCH.match(line)
        if m is None:
            fork = _FORK.match(line)
            if fork is not None and int(fork.group(1)) in ours:
                ours.add(int(fork.group(2)))
            continue
        pid, tid, cpu, t = int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))
        began = on_cpu.get(cpu)
        on_cpu[cpu] = t
        if began is None or tid == 0 or pid in ours:
            continue
        if t - began >= min_run:
            stalls.append(Stall(began, t, cpu, m.group(5), pid))
    return stalls


def split_tail(
    spans: Sequence[tuple[float, float]], stalls: Sequence[Stall]
) -> tuple[list[float], list[float]]:
    """Latencies (seconds) of all requests, and of those whose span overlaps no stall."""
    windows = sorted((s.start, s.end) for s in stalls)
    every, clear = [], []
    i = 0
    for sent, done in sorted(spans):
        every.append(done - sent)
        while i < len(windows) and windows[i][1] <= sent:
            i += 1  # spans are in send order: a window over before this one is over for all
        # a window still open at ``sent``, or one that opens before ``done`` (a long span can
        # reach past the next ones)
        j = i
        hit = False
        while j < len(windows) and windows[j][0] < done:
            if windows[j][1] > sent:
                hit = True
                break
            j += 1
        if not hit:
            clear.append(done - sent)
    return every, clear


class Switches:
    """``perf`` recording every CPU's context switches and forks, from construction to
    :meth:`stop` (or the end of a ``with`` block); :meth:`stalls` then reads the foreign runs
    out of it (apart, so that a caller can stop the recording with its measurement and parse
    after it)."""

    def __init__(self, workdir: Path, *, start_timeout: float = 60.0) -> None:
        self._data = workdir / "switches.data"
        self._ours = set(process_tree(os.getpid()))
        # perf starts with its events off and turns them on when told, answering "ack" once
        # they are on: from then on every fork is recorded. (A fixed wait of 0.3 s failed
        # once on a slow machine, most likely because a child forked before perf was up went
        # unrecorded, so that its runs looked foreign.)
        ctl_r, ctl_w = os.pipe()
        ack_r, ack_w = os.pipe()
        try:
            self._recorder = subprocess.Popen(
                ["perf", "record", "-q", "-D", "-1", "--control", f"fd:{ctl_r},{ack_w}",
                 "-e", "sched:sched_switch", "-e", "sched:sched_process_fork",
                 "-k", "CLOCK_MONOTONIC", "-a", "-o", str(self._data)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                pass_fds=(ctl_r, ack_w),
            )  # fmt: skip
        except BaseException:
            os.close(ctl_w)
            os.close(ack_r)
            raise
        finally:
            os.close(ctl_r)
            os.close(ack_w)
        #: perf's ends of the control pipes: open until it has stopped (perf 6.1 exits when
        #: its control pipe closes)
        self._control: tuple[int, ...] = (ctl_w, ack_r)
        try:
            os.write(ctl_w, b"enable\n")
            self._await_ack(ack_r, start_timeout)
        except BaseException:
            self._recorder.kill()
            _, err = self._recorder.communicate(timeout=60)
            self._close_control()
            raise RuntimeError(f"perf record did not start: {err.strip()[-500:]}") from None

    def _close_control(self) -> None:
        for fd in self._control:
            os.close(fd)
        self._control = ()

    def _await_ack(self, ack: int, timeout: float) -> None:
        # perf 6.1 writes "ack\n\0"
        got = read_until(self._recorder, ack, lambda seen: b"\n" in seen, timeout)
        if got.partition(b"\n")[0].strip(b"\0 ") != b"ack":
            raise RuntimeError(f"perf answered {got!r} to 'enable'")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._ours |= set(process_tree(os.getpid()))
        self._recorder.send_signal(signal.SIGINT)
        _, err = self._recorder.communicate(timeout=60)
        self._close_control()
        if self._recorder.returncode not in (0, -signal.SIGINT) or not self._data.exists():
            raise RuntimeError(f"perf record failed: {err.strip()[-500:]}")

    def stalls(self, min_run: float) -> list[Stall]:
        """The runs of at least ``min_run`` seconds by foreign tasks (after :meth:`stop`; the
        recording is removed)."""
        with subprocess.Popen(
            ["perf", "script", "-i", str(self._data), "-F", "pid,tid,cpu,time,trace"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ) as script:  # fmt: skip
            assert script.stdout is not None
            found = parse_switches(script.stdout, self._ours, min_run)
        self._data.unlink()
        return found


def figures(result: LoadResult, stalls: Sequence[Stall]) -> dict[str, Any]:
    """One open-loop sample's split: p99 of all requests and of those clear of ``stalls``
    (ms), the share that overlapped one, the stalls per second, their CPU ms per second, the
    longest (ms), and each task name's share of the stalls' time."""
    every, clear = split_tail(result.spans, stalls)
    seconds = max(result.duration_s, 1e-9)
    total = sum(s.seconds for s in stalls)
    who: Counter[str] = Counter()
    for s in stalls:
        who[s.comm] += s.seconds
    return {
        "p99": percentile_ms(sorted(every), 99),
        "p99_clear": percentile_ms(sorted(clear), 99),
        "overlapped": 1 - len(clear) / max(1, len(every)),
        "stalls_per_s": len(stalls) / seconds,
        "stall_ms_per_s": total * 1000 / seconds,
        "longest_ms": max((s.seconds for s in stalls), default=0.0) * 1000,
        "who": {comm: t / total for comm, t in who.most_common(5)} if total else {},
    }


def measure(
    keys: Sequence[str],
    *,
    rate: float,
    duration_s: float,
    rounds: int,
    min_run: float,
    workdir: Path,
    perf_cost: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Per scenario (``passthrough`` first), its :func:`figures` of each round; with
    ``perf_cost``, each round's figures also hold ``unrecorded``: the same scenario run again
    without ``perf`` (after the recorded run in rounds 1, 3, 5 ..., before it in rounds 2, 4
    ...), and both hold ``p50`` and the CPU µs per request of the sidecar and of Envoy."""
    from bench.run import LATENCY_WARM_S, _cpu, _requests  # (bench.run imports this module)

    chosen = [scenario(k) for k in (REFERENCE, *[k for k in keys if k != REFERENCE])]
    traffic = make_traffic(1000)
    out: dict[str, list[dict[str, Any]]] = {s.key: [] for s in chosen}
    with Stack(chosen, traffic, workdir / "stack") as stack:

        def run(key: str, requests: list[bytes], recorded: bool) -> dict[str, Any]:
            before = _cpu(stack, key)
            with Switches(workdir) if recorded else contextlib.nullcontext() as recording:
                result = open_loop(stack.port(key), requests, rate=rate, duration_s=duration_s)
            cpu = {name: t - before[name] for name, t in _cpu(stack, key).items()}
            if result.errors(frozenset({"200"})):
                raise RuntimeError(f"{key}: errors: {result.statuses}")
            f: dict[str, Any] = (
                figures(result, recording.stalls(min_run))
                if recording is not None
                else {"p99": result.latency_ms["p99"]}  # as figures' p99 of all requests
            )
            f["p50"] = result.latency_ms["p50"]
            f["cpu_us"] = {name: t * 1e6 / max(1, result.requests) for name, t in cpu.items()}
            return f

        for n in range(rounds):
            print(f"round {n + 1}/{rounds}", flush=True)
            for s in chosen:
                requests = _requests(stack, s, traffic)
                stack.alone(s.key)
                open_loop(stack.port(s.key), requests, rate=rate, duration_s=LATENCY_WARM_S)
                plain = None
                if perf_cost and n % 2:
                    plain = run(s.key, requests, recorded=False)
                f = run(s.key, requests, recorded=True)
                if perf_cost and plain is None:
                    plain = run(s.key, requests, recorded=False)
                if plain is not None:
                    f["unrecorded"] = plain
                out[s.key].append(f)
                print(
                    f"  {s.key:<20} p99 {f['p99']:5.2f} ms, clear of stalls {f['p99_clear']:5.2f}"
                    f"  ({f['overlapped']:.1%} overlapped {f['stalls_per_s']:.1f} stalls/s)"
                    + (f"; unrecorded p99 {plain['p99']:5.2f}" if plain is not None else ""),
                    flush=True,
                )
    return out


def table(rounds: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown from each scenario's :func:`figures`, one per round: medians over rounds;
    *added* is less ``passthrough``'s figure of the same round (``-`` without it)."""
    ref = rounds.get(REFERENCE)
    head = (
        "| scenario | p99 ms | added p99 ms | p99 clear of stalls ms | added, clear ms | "
        "requests overlapping a stall | stalls/s | stall ms/s | longest ms | who |"
    )
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def added(figs: Sequence[Mapping[str, Any]], name: str) -> str:
        if not ref or len(ref) != len(figs):
            return "-"
        diffs = [f[name] - r[name] for f, r in zip(figs, ref, strict=True)]
        return f"{statistics.median(diffs):.2f}"

    for key, figs in rounds.items():

        def med(name: str, figs: Sequence[Mapping[str, Any]] = figs) -> float:
            return statistics.median(f[name] for f in figs)

        who: Counter[str] = Counter()  # each round's shares, weighted by its stall time
        for f in figs:
            for comm, share in f["who"].items():
                who[comm] += share * f["stall_ms_per_s"]
        total = sum(who.values()) or 1.0
        names = ", ".join(f"{c} {t / total:.0%}" for c, t in who.most_common(3))
        out.append(
            f"| `{key}` | {med('p99'):.2f} | {added(figs, 'p99')} | {med('p99_clear'):.2f} | "
            f"{added(figs, 'p99_clear')} | {med('overlapped'):.2%} | {med('stalls_per_s'):.1f} | "
            f"{med('stall_ms_per_s'):.1f} | {med('longest_ms'):.1f} | {names or '-'} |"
        )
    return "\n".join(out)


def perf_cost_table(rounds: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown: what recording cost, per scenario, from the rounds of a ``--perf-cost`` run
    (each round's figures with their ``unrecorded`` twin; ``""`` without them). Each cell is
    *recorded / unrecorded*, medians over rounds; *cost* columns are the median of the rounds'
    differences; *added* is less ``passthrough``'s figure of the same round and kind."""
    if not rounds or not all("unrecorded" in f for figs in rounds.values() for f in figs):
        return ""
    ref = rounds.get(REFERENCE)
    out = [
        "| scenario | p50 ms | p99 ms | p99 cost ms | added p99 ms | added p99 cost ms | "
        "sidecar CPU µs/req | Envoy CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def med(values: Iterable[float]) -> float:
        return float(statistics.median(values))

    for key, figs in rounds.items():
        plain = [f["unrecorded"] for f in figs]

        def pair(
            get: Any, digits: int = 2, figs: Sequence[Any] = figs, plain: Sequence[Any] = plain
        ) -> str:
            return f"{med(map(get, figs)):.{digits}f} / {med(map(get, plain)):.{digits}f}"

        cost = med(f["p99"] - u["p99"] for f, u in zip(figs, plain, strict=True))
        added = added_cost = "-"
        if ref and key != REFERENCE and len(ref) == len(figs):
            on = [f["p99"] - r["p99"] for f, r in zip(figs, ref, strict=True)]
            off = [
                f["unrecorded"]["p99"] - r["unrecorded"]["p99"]
                for f, r in zip(figs, ref, strict=True)
            ]
            added = f"{med(on):.2f} / {med(off):.2f}"
            added_cost = f"{med(a - b for a, b in zip(on, off, strict=True)):+.2f}"
        out.append(
            f"| `{key}` | {pair(lambda f: f['p50'])} | {pair(lambda f: f['p99'])} | {cost:+.2f} | "
            f"{added} | {added_cost} | {pair(lambda f: f['cpu_us']['sidecar'], 0)} | "
            f"{pair(lambda f: f['cpu_us']['envoy'], 0)} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-ms", type=float, default=MIN_RUN_S * 1000)
    parser.add_argument(
        "--perf-cost", action="store_true",
        help="run each scenario a second time each round, unrecorded, and report the difference",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("perf is missing: apt-get install linux-perf")
    keys = [k for k in args.scenarios.split(",") if k]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="extproc-stalls-") as tmp:
        samples = measure(
            keys, rate=args.rate, duration_s=args.duration, rounds=args.rounds,
            min_run=args.min_run_ms / 1000, workdir=Path(tmp), perf_cost=args.perf_cost,
        )  # fmt: skip
    report = (
        f"# Foreign CPU stalls in the tail ({started})\n\n"
        f"`python -m bench.stalls {' '.join(argv if argv is not None else sys.argv[1:])}`: "
        f"{args.rate:g} req/s open loop for {args.duration:g} s per scenario and round, "
        f"{args.rounds} rounds, each sidecar alone; a stall is a run of at least "
        f"{args.min_run_ms:g} ms on a CPU by a task outside the benchmark. Medians over rounds.\n\n"
        + table(samples)
        + "\n"
    )
    if cost := perf_cost_table(samples):
        report += (
            "\n## What recording cost\n\nEach scenario also ran unrecorded in every round (after "
            "the recorded run in rounds 1, 3, 5 ..., before it in rounds 2, 4 ...). Each cell: "
            "recorded / unrecorded, medians over rounds; *cost*: the median of the rounds' "
            "differences.\n\n" + cost + "\n"
        )
    print("\n" + report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
