"""Token-cache writes to Redis (not a test): how many round trips the validated-token cache's
background writes take for a given write window (``token_cache.redis_write_window_ms``) and
rate of new or refreshed entries.

Starts its own redis-server on a free port. For each rate and window: ``--seconds`` of
``TieredCache.set_background`` calls of distinct keys at Poisson-spread times (as refreshes
come when tokens in use reach the end of their entries), then the server's count of SETs and
of round trips (``total_writes_processed``, as ``bench.run`` counts them). The rate made is
reported beside the rate asked: above a few hundred a second, the loop's sleeps fall short.

    .venv/bin/python -m bench.cache_writes [--seconds 4] [--windows 5,20,50] [--rates 100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence

from extproc.services.cache import MemoryCache, TieredCache
from extproc.services.redis import make_redis
from extproc.testing.redis_server import RedisServer


async def one(
    server: RedisServer, rate: float, window_ms: float, seconds: float
) -> dict[str, float]:
    redis = make_redis(server.url, socket_timeout=2.0, max_connections=16)
    cache: TieredCache[bytes] = TieredCache(
        MemoryCache(1_000_000), redis, encode=bytes, decode=bytes, write_window=window_ms / 1000
    )
    await redis.ping()  # the connection is made before counting
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    stats, writes = server.counters()
    sets = stats.get("set", {}).get("calls", 0)
    end = loop.time() + seconds
    n = 0
    while loop.time() < end:
        await asyncio.sleep(rng.expovariate(rate))
        cache.set_background(f"k{window_ms}-{rate}-{n}", b"x" * 300, 60)
        n += 1
    await cache.aclose()
    await redis.aclose()
    stats2, writes2 = server.counters()
    made = stats2.get("set", {}).get("calls", 0) - sets
    trips = writes2 - writes - 1  # less the first reading's own reply
    return {
        "writes": n, "rate": n / seconds, "sets": int(made), "round_trips": trips,
        "errors": cache.l2_errors,
    }  # fmt: skip


async def main_async(seconds: float, windows: Sequence[float], rates: Sequence[float]) -> str:
    out = [
        "| entries/s asked | made | window ms | entries | SETs | round trips "
        "| SETs per round trip | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with RedisServer() as server:
        for rate in rates:
            for window in windows:
                r = await one(server, rate, window, seconds)
                out.append(
                    f"| {rate:g} | {r['rate']:.0f} | {window:g} | {r['writes']} | {r['sets']} "
                    f"| {r['round_trips']} | {r['sets'] / max(1, r['round_trips']):.1f} "
                    f"| {r['errors']} |"
                )
                print(out[-1], flush=True)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--windows", default="5,20,50")
    parser.add_argument("--rates", default="100,1000")
    args = parser.parse_args(argv)
    table = asyncio.run(
        main_async(
            args.seconds,
            [float(w) for w in args.windows.split(",")],
            [float(r) for r in args.rates.split(",")],
        )
    )
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
