"""Rate-limit batching benchmark (not a test): Redis round trips per request and the latency each
decision adds, with adaptive batching on (max_batch 100) vs off (max_batch 1), side by side.

Starts its own redis-server on a free port. Each load level runs ``--requests`` decisions with
``concurrency`` requests outstanding at all times (closed loop), over 1000 distinct keys so that
nothing is denied or served from the over-limit cache.

    .venv/bin/python bench/ratelimit_batching.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from extproc.context import RequestContext
from extproc.observability.metrics import Registry
from extproc.plugin import Headers, HttpRequest, RequestHeaders
from extproc.services.redis import make_redis
from extproc.testing.context import make_plugin_context
from extproc.testing.redis_server import RedisServer
from plugins.rate_limit import RateLimitConfig, RateLimitPlugin

LOADS = (1, 10, 100, 500)


def make_config(max_batch: int, max_in_flight: int) -> RateLimitConfig:
    return RateLimitConfig.model_validate(
        {
            "rules": [
                {
                    "name": "bench",
                    "key": ["header:x-api-key"],
                    "limits": [{"requests": 10**9, "per": "day"}],
                    "fail": "open",
                }
            ],
            "redis_timeout_ms": 1000,
            "batch": {"max_batch": max_batch, "max_in_flight": max_in_flight},
        }
    )


async def run_level(
    server: RedisServer, concurrency: int, requests: int, max_batch: int, in_flight: int
) -> dict[str, float]:
    cfg = make_config(max_batch, in_flight)
    redis = make_redis(server.url, socket_timeout=2.0, max_connections=32)
    ctx = make_plugin_context("rate_limit", cfg, redis=redis, registry=Registry())
    plugin = RateLimitPlugin(cfg)
    await plugin.initialize(ctx)
    events = [
        RequestHeaders(
            HttpRequest(method="GET", path="/", headers=Headers.of({"x-api-key": f"k{i}"})),
            RequestContext(),
        )
        for i in range(1000)
    ]
    await plugin.on_request(events[0])  # load the script
    server.reset_stats()
    latencies: list[float] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            ev = events[issued % len(events)]
            issued += 1
            started = time.perf_counter()
            await plugin.on_request(ev)
            latencies.append(time.perf_counter() - started)

    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    trips = server.calls("evalsha") + server.calls("eval")
    await plugin.shutdown()
    await ctx.http.aclose()
    await redis.aclose()
    latencies.sort()
    return {
        "trips_per_req": trips / len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "rps": len(latencies) / wall,
    }


async def main(requests: int, in_flight: int) -> None:
    with RedisServer() as server:
        rows = []
        for concurrency in LOADS:
            on = await run_level(server, concurrency, requests, 100, in_flight)
            off = await run_level(server, concurrency, requests, 1, in_flight)
            rows.append((concurrency, on, off))
    print(f"requests per level: {requests}; max_in_flight: {in_flight}; one redis-server")
    head = (
        f"{'conc':>5} | {'trips/req on':>12} {'off':>6} | {'p50 ms on':>9} {'off':>6} | "
        f"{'p99 ms on':>9} {'off':>6} | {'req/s on':>8} {'off':>7}"
    )
    print(head)
    print("-" * len(head))
    for c, on, off in rows:
        print(
            f"{c:>5} | {on['trips_per_req']:>12.3f} {off['trips_per_req']:>6.3f} | "
            f"{on['p50_ms']:>9.3f} {off['p50_ms']:>6.3f} | "
            f"{on['p99_ms']:>9.3f} {off['p99_ms']:>6.3f} | "
            f"{on['rps']:>8.0f} {off['rps']:>7.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--max-in-flight", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.max_in_flight))
