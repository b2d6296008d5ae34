"""System calls per request of a sidecar at a fixed light load: the kernel's share of a request,
which ``bench.instructions`` (user-space instructions only) does not see.

At a light load every event-loop turn is an ``epoll_pwait``, every reply a ``write`` that wakes
the process reading it; on these VMs (Firecracker, guest halt-polling off) such calls and the
wake-ups behind them are a large part of a request's CPU. So a change that saves a loop turn
shows here (and in the paired CPU figures of ``bench.run``) while its instruction count stays
the same. For each scenario, one at a time, with its sidecar alone (the others stopped, as one
sidecar per Envoy is; the measured one started again if it was stopped): a 2 s wrk warm-up,
then ``strace -c -f`` attached to the sidecar's processes while the open-loop generator sends
``--rate`` requests/s for ``--duration`` seconds. strace slows every call it sees, so only the
counts mean something here, not the times.

Run: ``python -m bench.syscalls [--scenarios a,b] [--rate 300] [--duration 8] [--baseline REV]``
(``--baseline``: each extproc scenario is followed by its twin from commit REV). Needs strace
(``apt-get install strace``) and the right to trace our own children (root, or
``kernel.yama.ptrace_scope`` 0 or 1).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.load import open_loop, run_wrk
from bench.procs import read_until
from bench.run import _requests
from bench.stack import Stack, baseline_tree, scenario, with_baseline
from bench.traffic import make_traffic

__all__ = ["count_syscalls", "main", "parse_strace_summary", "table"]

DEFAULT_SCENARIOS = ("bare-http2", "bare-http2-redis", "extproc-h2", "extproc-jwt-rl-h2")
#: the calls shown in a column of their own (the rest are summed in "other")
SHOWN = ("epoll_pwait", "read", "write", "getpid", "futex")

#: a row of ``strace -c``: % time, seconds, usecs/call, calls, [errors,] syscall
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_0-9]+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """Calls by system call from ``strace -c`` output (the ``total`` row left out)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m.group(2) != "total":
            out[m.group(2)] = out.get(m.group(2), 0) + int(m.group(1))
    return out


def table(rows: Sequence[tuple[str, float, Mapping[str, int]]]) -> str:
    """Markdown: per scenario, calls per request in all and for each of :data:`SHOWN`."""
    head = "| scenario | requests | all calls / request | " + " | ".join(SHOWN) + " | other |"
    rule = "|---|---:|---:|" + "---:|" * (len(SHOWN) + 1)
    out = [head, rule]
    for key, requests, calls in rows:
        per = {name: n / requests for name, n in calls.items()}
        other = sum(v for name, v in per.items() if name not in SHOWN)
        cells = " | ".join(f"{per.get(name, 0.0):.2f}" for name in SHOWN)
        out.append(
            f"| `{key}` | {requests:,.0f} | {sum(per.values()):.2f} | {cells} | {other:.2f} |"
        )
    return "\n".join(out)


def count_syscalls(
    keys: Sequence[str],
    *,
    rate: float,
    duration_s: float,
    workdir: Path,
    baseline: str | None = None,
) -> list[tuple[str, float, dict[str, int]]]:
    """For each scenario: the requests answered while traced, and the calls counted; with
    ``baseline``, each extproc scenario's twin from that commit follows it."""
    chosen = [scenario(k) for k in keys]
    if baseline is not None:
        chosen = with_baseline(chosen, *baseline_tree(baseline, workdir))
    for s in chosen:
        if not s.sidecar:
            raise SystemExit(f"{s.key} has no sidecar to trace")
    traffic = make_traffic(1000)
    script = traffic.write_wrk_script(workdir)
    rows = []
    with Stack(chosen, traffic, workdir / "stack") as stack:
        for s in chosen:
            port = stack.port(s.key)
            stack.alone(s.key)  # as one sidecar per Envoy is: the others stopped
            run_wrk(port, script, duration_s=2, connections=16)  # caches, connections
            pids = stack.sidecar_pids(s.key)
            out = workdir / f"strace-{s.key}.txt"
            argv = ["strace", "-c", "-f", "-o", str(out)]
            for pid in pids:
                argv += ["-p", str(pid)]
            tracer = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
            try:
                await_attached(tracer, pids)
                requests = _requests(stack, s, traffic)
                result = open_loop(port, requests, rate=rate, duration_s=duration_s)
            finally:
                tracer.send_signal(signal.SIGINT)  # detach: strace writes its summary
                _, err = tracer.communicate(timeout=30)
            if not out.exists() or tracer.returncode not in (0, -signal.SIGINT):
                raise RuntimeError(f"strace failed on {s.key}: {err.strip()[-500:]}")
            if result.errors(frozenset({"200"})):
                raise RuntimeError(f"{s.key}: errors under strace: {result.statuses}")
            answered = sum(result.statuses.values())
            rows.append((s.key, float(answered), parse_strace_summary(out.read_text())))
    return rows


_ATTACHED = re.compile(rb"^strace: Process (\d+) attached", re.MULTILINE)


def await_attached(
    tracer: subprocess.Popen[str], pids: Sequence[int], timeout: float = 30.0
) -> None:
    """Return once strace says it has attached to every one of ``pids`` (its "Process N
    attached" lines on stderr, read from the pipe's descriptor: what is read here is not in
    ``communicate``'s later). A fixed wait of 0.5 s was not always enough on a slow machine,
    most likely: the calls of the first requests went uncounted (0.99 writes per request,
    once)."""
    assert tracer.stderr is not None

    def named(seen: bytes) -> bool:
        return set(pids) <= {int(m) for m in _ATTACHED.findall(seen)}

    try:
        read_until(tracer, tracer.stderr.fileno(), named, timeout)
    except (TimeoutError, EOFError) as exc:
        raise RuntimeError(f"strace did not attach to {list(pids)}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--baseline", help="also trace each extproc scenario at this commit")
    args = parser.parse_args(argv)
    if shutil.which("strace") is None:
        raise SystemExit("strace is missing: apt-get install strace")
    keys = [k for k in args.scenarios.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="extproc-syscalls-") as tmp:
        rows = count_syscalls(
            keys, rate=args.rate, duration_s=args.duration, workdir=Path(tmp),
            baseline=args.baseline,
        )  # fmt: skip
    print(
        f"\nSystem calls per request (strace -c -f on the sidecar's processes), "
        f"{args.rate:g} req/s open loop for {args.duration:g} s, one scenario at a time:\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
