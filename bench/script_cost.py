"""The rate limiter's script in Redis (not a test): what a decision costs Redis itself, beside
``INCR`` and an empty script, one at a time and in batches.

Starts its own redis-server on a free port. Each case is ``--calls`` calls from a synchronous
client, one at a time, and reads two figures: Redis's own time in the command (``INFO
commandstats``' ``usec_per_call``, the script's nested ``redis.call``s included) and its
process CPU (utime + stime from ``/proc``: the socket work as well). The cases run in turn,
``--repeats`` times; medians. The script's cases are the rate limiter's ``EVALSHA`` for a batch
of N requests of one hit each on distinct keys (fixed window, a limit never reached), as
``RedisStore`` sends it; per request is per call divided by N.

    .venv/bin/python -m bench.script_cost [--calls 10000] [--repeats 3] [--batches 1,10,100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import redis

from bench.procs import cpu_seconds
from extproc.testing.redis_server import RedisServer
from plugins.rate_limit.keys import Hit
from plugins.rate_limit.store import SCRIPT, SCRIPT_SHA, _script_args

#: how many keys the script's cases spread their hits over (a key per user, as in bench.run)
KEYS = 1_000


def script_calls(prefix: str, batch: int, limit: int = 10**9) -> list[tuple[str | int, ...]]:
    """The rate limiter's ``EVALSHA`` arguments for :data:`KEYS` calls in turn, each a batch
    of ``batch`` requests of one hit (fixed window, ``limit`` a second) on distinct keys
    ``<prefix>:<n>``, packed by the store's own ``_script_args`` as ``RedisStore`` sends
    them. Also the round trips of the benchmark's ``--redis-script`` floors."""
    calls: list[tuple[str | int, ...]] = []
    for j in range(KEYS):
        requests = [
            [Hit(f"{prefix}:{(j * batch + k) % KEYS}", False, limit, 1_000)] for k in range(batch)
        ]
        keys, specs, hits = _script_args(requests)
        calls.append(("EVALSHA", SCRIPT_SHA, len(keys), *keys, specs, hits))
    return calls


def _cases(
    client: redis.Redis, batches: Sequence[int]
) -> dict[str, tuple[int, Callable[[int], object]]]:
    """Name -> (requests per call, the call for its i-th time)."""
    client.script_load(SCRIPT)
    empty = client.script_load("return 1")
    cases: dict[str, tuple[int, Callable[[int], object]]] = {
        "INCR": (1, lambda i: client.execute_command("INCR", f"bench:incr:{i % KEYS}")),
        "empty script": (
            1,
            lambda i: client.execute_command("EVALSHA", empty, 1, "bench:empty", "0", "0"),
        ),
    }
    for n in batches:
        calls = script_calls(f"bench:rl{n}", n)
        cases[f"rate limiter, batch of {n}"] = (
            n,
            lambda i, calls=calls: client.execute_command(*calls[i % KEYS]),
        )
    return cases


def measure(
    server: RedisServer, calls: int, repeats: int, batches: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Per case: ``in_command_us`` and ``process_us`` per call, ``requests`` per call (medians
    over the repeats)."""
    assert server.pid is not None
    client = redis.Redis(port=server.port)
    try:
        cases = _cases(client, batches)
        seen: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, (_, call) in cases.items():
                client.config_resetstat()
                cpu = cpu_seconds([server.pid])
                for i in range(calls):
                    call(i)
                cpu = cpu_seconds([server.pid]) - cpu
                stats = client.info("commandstats")
                command = "cmdstat_incr" if name == "INCR" else "cmdstat_evalsha"
                seen[name].append((stats[command]["usec_per_call"], cpu / calls * 1e6))
    finally:
        client.close()
    return {
        name: {
            "requests": cases[name][0],
            "in_command_us": statistics.median(a for a, _ in runs),
            "process_us": statistics.median(b for _, b in runs),
        }
        for name, runs in seen.items()
    }


def table(results: dict[str, dict[str, float]]) -> str:
    out = [
        "| case | requests per call | in the command µs per call | per request "
        "| Redis process CPU µs per call | per request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        n = r["requests"]
        out.append(
            f"| {name} | {n:g} | {r['in_command_us']:.1f} | {r['in_command_us'] / n:.1f} "
            f"| {r['process_us']:.0f} | {r['process_us'] / n:.1f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,10,100")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if not all(1 <= b <= KEYS for b in batches):
        parser.error(f"--batches: each from 1 to {KEYS} (a batch's keys are distinct)")
    with RedisServer() as server:
        results = measure(server, args.calls, args.repeats, batches)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
