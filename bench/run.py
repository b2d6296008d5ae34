"""``python -m bench.run --quick | --full | --smoke | --profile SCENARIO``

Starts Envoy (``--concurrency 1``, one listener per scenario, ``direct_response`` upstream),
the sidecars and servicers, and Redis when a scenario needs it, all on 127.0.0.1; runs the
scenarios interleaved round by round (A B C ..., A B C ...); writes ``latest.md``,
``latest.json`` and ``latest.png`` to ``bench/results/`` (or ``--out``). Every process it
started is stopped by pid when it ends, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench import report
from bench.load import WRK_HINT, LoadResult, open_loop, open_loop_pair, run_wrk, wrk_binary
from bench.procs import (
    ProcError,
    cpu_seconds,
    kernel_facts,
    machine_shares,
    machine_ticks,
    sdk_python,
)
from bench.report import BASE_SUFFIX
from bench.stack import (
    SCENARIOS,
    TRACE_RATIO,
    Scenario,
    Stack,
    baseline_tree,
    scenario,
    with_baseline,
)
from bench.stalls import MIN_RUN_S, Switches, figures
from bench.traffic import Traffic, make_traffic
from extproc.observability.metrics import BoundHistogram

RESULTS = Path(__file__).resolve().parent / "results"
#: Redis commands that are the harness's own, not the sidecar's
_OWN_REDIS_COMMANDS = ("info", "ping", "config", "client", "hello", "command")
_SCRIPT_CALLS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


def _script_commands() -> frozenset[str]:
    """Commands the rate-limit Lua script runs inside Redis (``redis.call('X', ...)``)."""
    try:
        from plugins.rate_limit.store import SCRIPT
    except ImportError:
        return frozenset()
    return frozenset(m.lower() for m in re.findall(r"redis\.call\('(\w+)'", SCRIPT))


_IN_SCRIPT = _script_commands()


def _client_commands(commands: dict[str, int]) -> int:
    """Commands clients sent. INFO commandstats also counts every ``redis.call`` a script
    makes; while scripts ran, the commands the rate-limit script uses are taken as those (an
    approximation: the same command sent by a client in the same window is not counted)."""
    if not any(commands.get(name) for name in _SCRIPT_CALLS):
        return sum(commands.values())
    return sum(n for name, n in commands.items() if name not in _IN_SCRIPT)


@dataclass(frozen=True)
class Mode:
    name: str
    scenarios: tuple[str, ...]
    rounds: int
    duration_s: float
    warmup_s: float
    connections: int
    latency_rounds: int
    latency_duration_s: float
    latency_rate: float = 1000.0
    latency_connections: int = 32
    #: scenarios of the latency phase (None: all but the mostly-denied ones)
    latency_scenarios: tuple[str, ...] | None = None
    subjects: int = 1000
    threads: int = 1
    #: paired fixed-rate rounds of every sidecar scenario against this one (None: none)
    paired_with: str | None = None
    #: warm every sidecar at the same time (one ``warmup_s`` in all) instead of one after
    #: another: what keeps the quick mode under a minute (each sidecar gets a share of the
    #: machine, so ``subjects`` must be few enough for it to see every token)
    warmup_together: bool = False
    #: each open-loop measurement with the other sidecars stopped and the measured one
    #: started again and warmed (``_alone``); False: the others paused (SIGSTOP), quicker
    #: but a longer tail
    latency_alone: bool = True
    #: record every CPU's context switches with perf during each open-loop sample and split
    #: its requests by whether a foreign task's long run overlapped them (``bench.stalls``)
    stalls: bool = False


ALL = tuple(s.key for s in SCENARIOS if not s.optional)
OPTIONAL = tuple(s.key for s in SCENARIOS if s.optional)
MODES = {
    "smoke": Mode(
        "smoke",
        ("passthrough", "bare-fast", "extproc"),
        rounds=1,
        duration_s=2,
        warmup_s=1,
        connections=32,
        latency_rounds=1,
        latency_duration_s=1,
        latency_rate=300,
        latency_connections=8,
        subjects=100,
        latency_alone=False,
    ),
    "quick": Mode(
        "quick",
        # the Redis floor is a reference of the latency target, and grant_ahead an opt-in
        # variant: --full (or --scenarios) has them
        tuple(k for k in ALL if k not in ("bare-http2-redis", "extproc-jwt-rl-ahead-h2")),
        rounds=2,
        duration_s=1,
        warmup_s=3,
        connections=64,
        latency_rounds=1,
        latency_duration_s=1,
        latency_scenarios=(
            "passthrough",
            "bare-http2",
            "extproc",
            "extproc-jwt-rl",
            "extproc-h2",
            "extproc-jwt-rl-h2",
        ),
        warmup_together=True,
        # restarting a sidecar per measurement would not fit in the minute
        latency_alone=False,
        # what a warm-up together reaches: every sidecar sees every token before round 1
        subjects=300,
    ),
    "full": Mode(
        "full",
        ALL,
        rounds=5,
        duration_s=8,
        warmup_s=3,
        connections=64,
        # five interleaved rounds here too: a p99 moves by milliseconds from one 8 s round to
        # the next on a shared machine, so a median of two is no median
        latency_rounds=5,
        latency_duration_s=6,
        paired_with="bare-fast",
    ),
}


# ---------------------------------------------------------------------------- measuring


def _redis_calls(stack: Stack) -> tuple[dict[str, int], int]:
    """Calls per Redis command so far, less the harness's and clients' own (INFO, PING,
    connection set-up ...), and the round trips of those calls: the server's reply writes
    (one per client per batch of commands one read brought in) less one per own call."""
    if stack.redis is None:
        return {}, 0
    stats, writes = stack.redis.counters()
    calls, own = {}, 0
    for name, v in stats.items():
        if name.split("|")[0].startswith(_OWN_REDIS_COMMANDS):
            own += int(v.get("calls", 0))
        else:
            calls[name] = int(v.get("calls", 0))
    return calls, writes - own


_HOOK_FAMILY = "extproc_plugin_duration_seconds"
_ERRORS_FAMILY = "extproc_plugin_errors_total"
_GC_FAMILY = "extproc_gc_pause_seconds"
_SCRAPED_FAMILIES = (
    "extproc_rate_limit_batch_wait_seconds",
    "extproc_rate_limit_batch_size",
    "extproc_rate_limit_granted_ahead",
    _HOOK_FAMILY,
    _ERRORS_FAMILY,
    _GC_FAMILY,
)


def _sidecar_metrics(stack: Stack, key: str) -> dict[str, float]:
    """The rate limiter's batching histograms and the plugin hooks' durations (cumulative)
    from the sidecar's /metrics; empty when the scenario has no admin port."""
    admin = stack.running[key].admin
    if not admin:
        return {}
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        return _scraped(response.read().decode())


def _scraped(text: str) -> dict[str, float]:
    """The samples of :data:`_SCRAPED_FAMILIES` in a Prometheus text page, by full name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(_SCRAPED_FAMILIES):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """What adaptive batching chose during a sample: batches, mean batch size, and each
    request's wait before its round trip was sent (mean, and p50/p99 interpolated within
    the histogram's buckets as Prometheus' histogram_quantile does)."""
    if not after:
        return None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    wait = "extproc_rate_limit_batch_wait_seconds"
    size = "extproc_rate_limit_batch_size"
    requests = delta.get(f"{wait}_count", 0.0)
    batches = delta.get(f"{size}_count", 0.0)
    if not requests or not batches:
        return None
    histogram = _histogram(
        [
            (float(name.split('le="')[1].rstrip('"}')), n)
            for name, n in delta.items()
            if name.startswith(f"{wait}_bucket") and "+Inf" not in name
        ],
        requests,
    )
    ahead = "extproc_rate_limit_granted_ahead_total{"
    over = "extproc_rate_limit_granted_ahead_over_limit_total{"
    return {
        "batches": batches,
        # grant_ahead: the requests allowed before Redis answered (0 without it), and those
        # of them Redis then refused: allowed past the limit
        "ahead": sum(v for k, v in delta.items() if k.startswith(ahead)),
        "over": sum(v for k, v in delta.items() if k.startswith(over)),
        "mean_batch": delta.get(f"{size}_sum", 0.0) / batches,
        "wait_mean_us": delta.get(f"{wait}_sum", 0.0) / requests * 1e6,
        "wait_p50_us": histogram.quantile(0.5) * 1e6,
        "wait_p99_us": histogram.quantile(0.99) * 1e6,
    }


def _histogram(cumulative: list[tuple[float, float]], count: float) -> BoundHistogram:
    """The deltas of a Prometheus histogram's cumulative buckets (``le`` bound, count; without
    +Inf) and its total, back into a histogram of our own to interpolate quantiles in (as
    ``histogram_quantile`` does)."""
    cumulative = sorted(cumulative)
    histogram = BoundHistogram(tuple(le for le, _ in cumulative))
    below = 0.0
    for i, (_, n) in enumerate(cumulative):
        histogram.counts[i], below = int(n - below), n
    histogram.counts[-1] = int(count - below)
    histogram.count = int(count)
    return histogram


_LABELS = re.compile(r'(\w+)="([^"]*)"')


def _plugin_errors(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The sidecar's plugin failures during a sample, ``"<plugin> <kind>"`` (timeout,
    exception ...) -> count: the cause of the errors the load generator saw, when a plugin's
    failure policy answered them (an error with no count here came from elsewhere)."""
    out: dict[str, int] = {}
    for name, value in after.items():
        if name.startswith(_ERRORS_FAMILY):
            delta = int(value - before.get(name, 0.0))
            if delta:
                labels = dict(_LABELS.findall(name))
                out[f"{labels.get('plugin', '?')} {labels.get('kind', '?')}"] = delta
    return out


def _hooks(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each plugin's request-headers hook time during a sample, from the sidecar's own
    histogram: mean, p50 and p99 in µs (interpolated within buckets). The hook's time
    includes what it awaits (the rate limiter's Redis round trip), not the server's own."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for name, value in after.items():
        if not name.startswith(_HOOK_FAMILY):
            continue
        labels = dict(_LABELS.findall(name))
        if labels.get("phase") != "request_headers" or "plugin" not in labels:
            continue
        delta = value - before.get(name, 0.0)
        if name.startswith(f"{_HOOK_FAMILY}_bucket"):
            bound = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            buckets.setdefault(labels["plugin"], []).append((bound, delta))
        elif name.startswith(f"{_HOOK_FAMILY}_sum"):
            sums[labels["plugin"]] = delta
    out: dict[str, dict[str, float]] = {}
    for plugin, cumulative in buckets.items():
        count = max(n for _, n in cumulative)  # the +Inf bucket's
        if not count:
            continue
        histogram = _histogram([(le, n) for le, n in cumulative if le != math.inf], count)
        out[plugin] = {
            "mean_us": sums.get(plugin, 0.0) / count * 1e6,
            "p50_us": histogram.quantile(0.5) * 1e6,
            "p99_us": histogram.quantile(0.99) * 1e6,
        }
    return out


def _gc(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """The cyclic collector's pauses during a sample, all generations (the sidecar's
    ``extproc_gc_pause_seconds``): per second, the share of the wall time the event loop
    stood still in them (about the share of requests that arrive during one), and how many
    a second lasted 1 ms or more. Empty without an admin port or a pause."""
    count = total = long = 0.0
    for name, value in after.items():
        if not name.startswith(_GC_FAMILY):
            continue
        delta = value - before.get(name, 0.0)
        if name.startswith(f"{_GC_FAMILY}_count"):
            count += delta
        elif name.startswith(f"{_GC_FAMILY}_sum"):
            total += delta
        elif name.startswith(f"{_GC_FAMILY}_bucket"):
            labels = dict(_LABELS.findall(name))
            if labels.get("le") == "+Inf":
                long += delta
            elif labels.get("le") == "0.001":
                long -= delta  # + Inf minus "under 1 ms": the pauses of 1 ms or more
    if not count or seconds <= 0:
        return {}
    return {
        "pauses_per_s": count / seconds,
        "share": total / seconds,
        "long_per_s": long / seconds,
    }


def _allowed(s: Scenario) -> frozenset[str]:
    return frozenset({"200", "429"} if s.denies else {"200"})


def _cpu(stack: Stack, key: str) -> dict[str, float]:
    assert stack.envoy is not None and stack.envoy.pid is not None
    redis_pid = stack.redis.pid if stack.redis else None
    return {
        "envoy": cpu_seconds([stack.envoy.pid]),
        "sidecar": cpu_seconds(stack.sidecar_pids(key)),
        "redis": cpu_seconds([redis_pid]) if redis_pid else 0.0,
    }


def _sample(stack: Stack, s: Scenario, load: Any) -> dict[str, Any]:
    metrics = _sidecar_metrics(stack, s.key)
    before, (calls, trips) = _cpu(stack, s.key), _redis_calls(stack)
    machine_before = machine_ticks()
    result: LoadResult = load()
    machine = machine_shares(machine_before, machine_ticks())
    after, (calls_after, trips_after) = _cpu(stack, s.key), _redis_calls(stack)
    metrics_after = _sidecar_metrics(stack, s.key)
    batching = _batching(metrics, metrics_after)
    n = max(1, result.requests)
    if batching is not None:
        # the rate limiter's own round trips (the Redis totals also count the token cache's)
        batching["round_trips_per_req"] = batching["batches"] / n
        batching["ahead_share"] = batching["ahead"] / n
    commands = {
        name: calls_after[name] - calls.get(name, 0)
        for name in calls_after
        if calls_after[name] != calls.get(name, 0)
    }
    return {
        "requests": result.requests,
        "duration_s": result.duration_s,
        "rps": result.rps,
        "latency_ms": result.latency_ms,
        "statuses": result.statuses,
        "socket_errors": result.socket_errors,
        "errors": result.errors(_allowed(s)),
        "client_errors": result.client_errors(),
        "cpu_us": {k: (after[k] - before[k]) / n * 1e6 for k in before},
        "redis_round_trips_per_req": (trips_after - trips) / n,
        "redis_client_cmds_per_req": _client_commands(commands) / n,
        "redis_cmds_per_req": sum(commands.values()) / n,
        "redis_commands": commands,
        "batching": batching,
        "hooks": _hooks(metrics, metrics_after),
        "gc": _gc(metrics, metrics_after, result.duration_s),
        "plugin_errors": _plugin_errors(metrics, metrics_after),
        "machine": machine,
        "extra": result.extra,
    }


def _throughput(
    stack: Stack, s: Scenario, script: Path, mode: Mode, seconds: float
) -> dict[str, Any]:
    port = stack.port(s.key)
    return _sample(
        stack,
        s,
        lambda: run_wrk(
            port, script, duration_s=seconds, connections=mode.connections, threads=mode.threads
        ),
    )


def _warm(stack: Stack, chosen: list[Scenario], script: Path, mode: Mode) -> None:
    """Warm-up load, unmeasured: connections, caches, Redis scripts."""
    if not mode.warmup_together:
        for s in chosen:
            _throughput(stack, s, script, mode, mode.warmup_s)
        return
    # only sidecars have caches to fill; Envoy alone would take most of the CPU
    warm = [s for s in chosen if s.sidecar]
    connections = max(4, mode.connections // 4)  # ~1,000 connections to Envoy at most
    with ThreadPoolExecutor(max_workers=max(1, len(warm))) as pool:
        runs = [
            pool.submit(
                run_wrk,
                stack.port(s.key),
                script,
                duration_s=mode.warmup_s,
                connections=connections,
            )
            for s in warm
        ]
        for s, run in zip(warm, runs, strict=True):
            print(f"  warm {s.key:<20} {run.result().requests:>7,} requests", flush=True)


T = TypeVar("T")


def paired_order(ref: T, s: T, round_no: int) -> tuple[T, T]:
    """The pair in the order its round sends: the generator sends to the first of a pair
    first in each tick, and the second sidecar paid ~5 % more CPU per request in an A/A run;
    so the order swaps every round, and an even number of rounds cancels it."""
    return (ref, s) if round_no % 2 == 0 else (s, ref)


def _paired(
    stack: Stack, pair: tuple[Scenario, Scenario], traffic: Traffic, rate: float, seconds: float
) -> dict[str, Any]:
    """Both scenarios under the same fixed load at the same time: neither is saturated, so
    each pays its own CPU per request, in the same moments of a machine whose speed drifts."""
    targets = [(stack.port(s.key), _requests(stack, s, traffic)) for s in pair]
    before = {s.key: cpu_seconds(stack.sidecar_pids(s.key)) for s in pair}
    results = open_loop_pair(targets, rate=rate, duration_s=seconds, connections=16)
    out: dict[str, Any] = {}
    for s, result in zip(pair, results, strict=True):
        n = max(1, result.requests)
        cpu = cpu_seconds(stack.sidecar_pids(s.key)) - before[s.key]
        out[s.key] = {
            "requests": result.requests,
            "achieved_rps": result.extra["achieved_rps"],
            "sidecar_us": cpu / n * 1e6,
            "p99_ms": result.latency_ms["p99"],
            "errors": result.errors(_allowed(s)),
        }
    return out


def _requests(stack: Stack, s: Scenario, traffic: Traffic) -> list[bytes]:
    """The open-loop generator's requests for ``s``'s listener: one per token."""
    host = f"127.0.0.1:{stack.port(s.key)}"
    return [traffic.raw_request(i, host) for i in range(len(traffic.tokens))]


@contextlib.contextmanager
def others_paused(stack: Stack, key: str) -> Iterator[list[int]]:
    """SIGSTOP every other scenario's sidecar processes (ours, by pid) for the duration, then
    SIGCONT them. An idle sidecar still wakes ~140 times a second (its loop-lag heartbeat,
    the watchdog thread, exporters); fifteen of them on two cores are a load a deployment
    with one sidecar per Envoy does not have, and it shows in a p99 at a fixed rate."""
    paused: list[int] = []
    try:
        for other in stack.running:
            if other == key:
                continue
            for pid in stack.sidecar_pids(other):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    paused.append(pid)
        yield paused
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


#: seconds of unmeasured load at the open-loop rate on a sidecar just started again: its
#: connections, the token cache (1,000 tokens, each seen at least twice), the Redis script
LATENCY_WARM_S = 3.0


def _fixed_rate(
    stack: Stack, s: Scenario, traffic: Traffic, mode: Mode, seconds: float
) -> LoadResult:
    """``seconds`` of the open-loop load (the mode's rate and connections) on ``s``."""
    return open_loop(
        stack.port(s.key),
        _requests(stack, s, traffic),
        rate=mode.latency_rate,
        duration_s=seconds,
        connections=mode.latency_connections,
    )


def _alone(stack: Stack, s: Scenario, traffic: Traffic, mode: Mode) -> None:
    """``s``'s sidecar alone (:meth:`Stack.alone`; with the others paused instead, the same
    stack measured a 0.8 ms longer p99 for extproc-jwt-rl-h2 than with them gone,
    2026-12-06), warmed at the open-loop rate if it was started again."""
    if stack.alone(s.key):
        _fixed_rate(stack, s, traffic, mode, min(LATENCY_WARM_S, mode.latency_duration_s))


def _latency(
    stack: Stack, s: Scenario, traffic: Traffic, mode: Mode, workdir: Path
) -> dict[str, Any]:
    recorded: list[tuple[Switches, LoadResult]] = []

    def load() -> LoadResult:
        if not mode.stalls:
            return _fixed_rate(stack, s, traffic, mode, mode.latency_duration_s)
        with Switches(workdir) as recording:
            result = _fixed_rate(stack, s, traffic, mode, mode.latency_duration_s)
        recorded.append((recording, result))
        return result

    if mode.latency_alone:
        _alone(stack, s, traffic, mode)
        sample = _sample(stack, s, load)
    else:
        with others_paused(stack, s.key):
            sample = _sample(stack, s, load)
    if recorded:  # read after the sample, so that perf's parsing is in none of its figures
        recording, result = recorded[0]
        sample["stalls"] = figures(result, recording.stalls(MIN_RUN_S))
    return sample


def _line(s: Scenario, sample: dict[str, Any]) -> str:
    cpu = sample["cpu_us"]
    return (
        f"  {s.key:<20} {sample['rps']:>8,.0f} req/s  p99 {sample['latency_ms']['p99']:6.2f} ms  "
        f"sidecar {cpu['sidecar']:5.0f} µs  envoy {cpu['envoy']:4.0f} µs  "
        f"redis {sample['redis_round_trips_per_req']:.3f} rt/req  4xx {sample['client_errors']}  "
        f"errors {sample['errors']}"
    )


# ---------------------------------------------------------------------------- environment


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (done.stdout or done.stderr).strip()


def speed_probe() -> float:
    """Milliseconds this Python takes for a fixed CPU-bound loop (best of 5): how fast the
    machine is right now. Shared machines drift by several times over a day; compare runs
    only with this in view."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        sum(range(2_000_000))
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **kernel_facts(),
    }


def versions(with_sdk: bool) -> dict[str, str]:
    from importlib.metadata import version

    from extproc.testing.processes import envoy_binary

    out: dict[str, str] = {}
    envoy = _output([envoy_binary(), "--version"])
    match = re.search(r"version: (\S+)", envoy)
    out["envoy"] = match.group(1) if match else envoy[:80]
    for package in ("grpcio", "protobuf", "uvloop", "redis", "pyjwt", "cryptography"):
        try:
            out[package] = version(package)
        except Exception:
            out[package] = "not installed"
    out["wrk"] = _output([wrk_binary(), "-v"]).splitlines()[0]
    out["redis-server"] = _output(["redis-server", "--version"])
    commit = _output(["git", "-C", str(RESULTS.parent.parent), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(RESULTS.parent.parent), "status", "--porcelain"])
    out["extproc"] = f"{commit}{' + uncommitted changes' if dirty.strip() else ''}"
    if with_sdk and sdk_python().exists():
        listing = _output([str(sdk_python()), "-m", "pip", "list", "--format=freeze"])
        wanted = ("envoy-extproc-sdk", "grpcio", "protobuf", "xds-protos", "ddtrace")
        pins = [ln for ln in listing.splitlines() if ln.split("==")[0].lower() in wanted]
        out["sdk venv"] = ", ".join(pins)
    return out


def _workers_note() -> str:
    helptext = _output([sys.executable, "-m", "extproc", "serve", "--help"])
    if "--workers" in helptext:
        return "`extproc-jwt-rl-w2` runs `extproc serve --workers 2` (Envoy lists both workers)"
    return "`extproc serve` has no --workers option at the time of this run: not measured"


# ---------------------------------------------------------------------------- the run


def run(
    mode: Mode,
    keys: tuple[str, ...],
    out: Path,
    raw: Path,
    command: str,
    baseline: str | None = None,
    paired_rounds: int = 6,
    paired_rate: float = 300.0,
    paired_s: float = 4.0,
    paired_with: str | None = None,
) -> dict[str, Any]:
    chosen = [scenario(k) for k in keys]
    if paired_with is not None and paired_with not in keys:
        raise SystemExit(f"--paired-with {paired_with}: select it in --scenarios too")
    base_sha = None
    if baseline is not None:
        base_sha, tree = baseline_tree(baseline, raw)
        chosen = with_baseline(chosen, base_sha, tree)
    keys = tuple(s.key for s in chosen)
    for needed in ("passthrough", "bare-fast"):
        if needed not in keys:
            print(f"note: {needed} not selected: ratios to it are left empty", file=sys.stderr)
    wrk_binary()
    print(f"minting {mode.subjects} RS256 tokens ...", flush=True)
    traffic = make_traffic(mode.subjects)
    script = traffic.write_wrk_script(raw)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    data: dict[str, Any] = {
        "mode": mode.name,
        "started": started,
        "command": command,
        "settings": {
            "rounds": mode.rounds,
            "duration_s": mode.duration_s,
            "warmup_s": mode.warmup_s,
            "connections": mode.connections,
            "threads": mode.threads,
            "latency_rate": mode.latency_rate,
            "latency_connections": mode.latency_connections,
            "latency_rounds": mode.latency_rounds,
            "latency_duration_s": mode.latency_duration_s,
            "subjects": mode.subjects,
        },
        "scenarios": [
            {"key": s.key, "title": s.title, **({"hot_limit": s.hot_limit} if s.hot_limit else {})}
            for s in chosen
        ],
        "rounds": [],
        "latency_rounds": [],
        "notes": {
            "workers": _workers_note(),
            "paused": (
                "during each open-loop (fixed-rate) measurement the other scenarios' "
                "sidecars are stopped, as one sidecar per Envoy is alone (the measured one is "
                f"started again and warmed for {LATENCY_WARM_S:g} s at the open-loop rate "
                "first); "
                if mode.latency_alone
                else "during each open-loop (fixed-rate) measurement the other scenarios' "
                "sidecars are paused (SIGSTOP/SIGCONT); "
            )
            + "the closed-loop and paired rounds run with all of them alive",
            **(
                {
                    "stalls": "every open-loop sample ran with perf recording every CPU's "
                    "context switches (`--stalls`): each request is also judged clear of, "
                    f"or overlapping, a run of {MIN_RUN_S * 1000:g} ms or more by a "
                    "task outside the benchmark"
                }
                if mode.stalls
                else {}
            ),
        },
    }
    if base_sha is not None:
        data["baseline"] = base_sha
        data["notes"]["baseline"] = (
            f"`*{BASE_SUFFIX}` rows run the same sidecar config from commit `{base_sha}` "
            "(`--baseline`), in the same rounds"
        )
    t0 = time.monotonic()
    # the code measured is the checkout as it is now (a commit made during the run is not)
    checkout = versions(False)["extproc"]
    probe_before = speed_probe()
    with Stack(chosen, traffic, raw / "stack") as stack:
        print(f"stack up in {time.monotonic() - t0:.1f}s; warming up ...", flush=True)
        _warm(stack, chosen, script, mode)
        for n in range(mode.rounds):
            print(f"round {n + 1}/{mode.rounds}", flush=True)
            results = {}
            for s in chosen:
                results[s.key] = _throughput(stack, s, script, mode, mode.duration_s)
                print(_line(s, results[s.key]), flush=True)
            data["rounds"].append(results)
        latency_keys = [
            s
            for s in chosen
            if not s.denies and (mode.latency_scenarios is None or s.key in mode.latency_scenarios)
        ]
        for n in range(mode.latency_rounds):
            print(
                f"latency round {n + 1}/{mode.latency_rounds} at {mode.latency_rate:g} req/s",
                flush=True,
            )
            results = {}
            for s in latency_keys:
                results[s.key] = _latency(stack, s, traffic, mode, raw)
                print(_line(s, results[s.key]), flush=True)
            data["latency_rounds"].append(results)
        if stack.stopped:  # the latency phase left one sidecar running: all of them again
            stack.start_stopped()
            print("sidecars started again; warming up ...", flush=True)
            _warm(stack, chosen, script, mode)
        # (reference, scenario): each version against its baseline twin, or every sidecar
        # scenario against --paired-with
        by_key = {s.key: s for s in chosen}
        pairs = [
            (by_key[s.key + BASE_SUFFIX], s)
            for s in chosen
            if s.key + BASE_SUFFIX in by_key and not s.denies
        ]
        if paired_with is not None:
            ref = scenario(paired_with)
            pairs += [(ref, s) for s in chosen if s.sidecar and s.key != ref.key and not s.denies]
        if pairs:
            data["paired"] = {
                "rate": paired_rate,
                "duration_s": paired_s,
                "pairs": [[ref.key, s.key] for ref, s in pairs],
                "rounds": [],
            }
        for n in range(paired_rounds if pairs else 0):
            print(f"paired round {n + 1}/{paired_rounds} at {paired_rate:g} req/s each", flush=True)
            results = {}
            for ref, s in pairs:
                both = _paired(stack, paired_order(ref, s, n), traffic, paired_rate, paired_s)
                results[f"{ref.key}|{s.key}"] = both
                for key, r in both.items():
                    line = f"  {key:<22} {r['sidecar_us']:6.0f} µs/req  p99 {r['p99_ms']:7.2f} ms"
                    print(f"{line}  errors {r['errors']}", flush=True)
            data["paired"]["rounds"].append(results)
        data["commands"] = [
            *stack.commands,
            f"wrk -t {mode.threads} -c {mode.connections} -d {mode.duration_s:g}s --timeout 5s "
            f"-s {script.name} http://127.0.0.1:<listener port>/",
        ]
    if stack.otlp is not None:  # counted after the sidecars stopped (and flushed their spans)
        untraced = [s.key for s in chosen if s.backend == "extproc" and s.trace_ratio == 0]
        data["notes"]["tracing"] = (
            "every extproc sidecar"
            + (f" but {', '.join(f'`{k}`' for k in untraced)}" if untraced else "")
            + f" traced {TRACE_RATIO:.0%} of its streams, exported over "
            f"OTLP/gRPC to a receiver in the harness: {len(stack.otlp.spans()):,} spans "
            "received during the run"
        )
    data["machine"] = machine()
    data["versions"] = versions(any(s.backend == "sdk" for s in chosen))
    data["versions"]["extproc"] = checkout
    data["machine"]["speed probe"] = (
        f"{probe_before:.0f} ms before, {speed_probe():.0f} ms after the run "
        "(sum(range(2_000_000)), best of 5: lower is faster)"
    )
    data["summary"] = report.summarize(data)
    data["targets"] = report.targets(data["summary"], data["notes"])
    paths = report.write_all(data, out)
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}  ({time.monotonic() - t0:.0f}s)")
    return data


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_true", help="all scenarios, short (< ~1 min)")
    which.add_argument("--full", action="store_true", help="all scenarios, 5 rounds: the numbers")
    which.add_argument(
        "--smoke", action="store_true", help="passthrough, bare-fast, extproc; 1 round"
    )
    which.add_argument(
        "--profile", metavar="SCENARIO", help="py-spy the sidecar of SCENARIO under load"
    )
    parser.add_argument(
        "--native", action="store_true", help="with --profile: C and Cython frames too"
    )
    parser.add_argument("--scenarios", help=f"comma-separated, of: {','.join(ALL + OPTIONAL)}")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=float, help="seconds per scenario per round")
    parser.add_argument("--connections", type=int)
    parser.add_argument("--latency-rate", type=float, help="req/s of the open-loop phase")
    parser.add_argument("--latency-rounds", type=int, help="rounds of the open-loop phase")
    parser.add_argument("--latency-duration", type=float, help="seconds per open-loop round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.* go")
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="record context switches with perf in each open-loop sample: how much of the "
        "tail foreign tasks (the kernel's, other processes') put there (bench.stalls)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run every selected extproc scenario from commit REV (rows *-base), "
        "side by side in the same rounds: what a change did",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=6,
        help="with --baseline or --paired-with: rounds of two sidecars at once under the same "
        "fixed rate, the pair's order swapped every round (so an even number is best)",
    )
    parser.add_argument(
        "--paired-rate", type=float, default=300.0, help="req/s each, of the paired rounds"
    )
    parser.add_argument(
        "--paired-with",
        metavar="SCENARIO",
        help="paired rounds of every selected sidecar scenario against SCENARIO (e.g. "
        "bare-fast; --full does this with bare-fast)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        if args.profile:
            from bench.profile import profile

            profile(
                scenario(args.profile),
                args.out,
                duration_s=args.duration or 10.0,
                connections=args.connections or 64,
                native=args.native,
                rate=args.latency_rate,
            )
            return 0
        mode = MODES["quick" if args.quick else "full" if args.full else "smoke"]
        overrides = {
            k: v
            for k, v in (
                ("rounds", args.rounds),
                ("duration_s", args.duration),
                ("connections", args.connections),
                ("latency_rate", args.latency_rate),
                ("latency_rounds", args.latency_rounds),
                ("latency_duration_s", args.latency_duration),
            )
            if v is not None
        }
        if args.scenarios:  # scenarios asked for by name all get the open-loop phase too
            overrides["latency_scenarios"] = None
        if args.stalls:
            if shutil.which("perf") is None:
                raise SystemExit("--stalls needs perf: apt-get install linux-perf")
            overrides["stalls"] = True
        if overrides:
            mode = Mode(**{**mode.__dict__, **overrides})
        keys = tuple(args.scenarios.split(",")) if args.scenarios else mode.scenarios
        args.out.mkdir(parents=True, exist_ok=True)
        raw_root = args.out / "raw"
        raw_root.mkdir(parents=True, exist_ok=True)
        raw = Path(tempfile.mkdtemp(prefix=f"{mode.name}-", dir=raw_root))
        # the mode's paired reference only when selected; one asked for by name must be
        paired_with = args.paired_with or (mode.paired_with if mode.paired_with in keys else None)
        run(
            mode, keys, args.out, raw, command, args.baseline,
            paired_rounds=args.paired_rounds, paired_rate=args.paired_rate,
            paired_with=paired_with,
        )  # fmt: skip
    except ProcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if "wrk" in str(exc):
            print(f"install wrk: {WRK_HINT}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
