"""What extproc adds per request on top of gRPC, measured in process (no sockets).

The end-to-end harness (``bench.run``) measures the whole system, where Envoy, wrk and the
sidecar share two cores and the CPU per request of each depends on the others' load. This one
isolates *our* code: for each configuration it feeds serialized ``ProcessingRequest`` bytes of
one HTTP request (request headers, as Envoy sends them) through exactly what the server does
per message - protobuf parse, decode, state machine, the plugin chain, reply encoding and
serialization - and reports CPU µs per request, side by side in one process:

* ``protocol only``: the chain has no plugins (the floor of our framework);
* ``headers``: the header-rules plugin;
* ``jwt (cache hit)``: jwt_auth over 1,000 RS256 tokens, warmed (the steady state);
* ``jwt + rate_limit (local)``: plus the rate limiter on its in-process store;
* ``jwt + rate_limit (redis ..., batched)``: plus Redis (a redis-server this starts), N
  requests concurrently so batches form, over the pipelined connection and over redis-py's
  pool (``redis_pipeline: false``);
* ``... one request at a time``: the same with no company, a round trip per request.

Run: ``python -m bench.hotpath [--requests N] [--concurrency C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

import yaml

from bench.stack import AUDIENCE, ISSUER
from bench.traffic import make_traffic
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.config import parse_config
from extproc.protocol import codec
from extproc.runtime import Services, build_generation
from extproc.stream import StreamMetrics, StreamProcessor


def _request_bytes(token: str, i: int) -> bytes:
    req = pb.ProcessingRequest()
    headers = (
        (":method", "GET"), (":path", f"/api/items/{i % 97}"), (":authority", "bench"),
        (":scheme", "http"), ("authorization", f"Bearer {token}"), ("user-agent", "wrk"),
        ("x-request-id", f"{i:032x}"), ("x-forwarded-proto", "http"),
    )  # fmt: skip
    for key, value in headers:
        h = req.request_headers.headers.headers.add()
        h.key = key
        h.raw_value = value.encode()
    req.request_headers.end_of_stream = True
    req.protocol_config.SetInParent()
    data: bytes = req.SerializeToString()
    return data


def _config(
    plugins: Sequence[str], jwks: dict[str, Any], redis_url: str | None, pipeline: bool = True
) -> str:
    entries: list[dict[str, Any]] = []
    if "headers" in plugins:
        entries.append({"plugin": "headers", "config": {"rules": [{"request_set": {"x-a": "1"}}]}})
    if "jwt" in plugins:
        entries.append({
            "plugin": "jwt_auth",
            "config": {"providers": {"idp": {
                "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"inline": jwks},
                "claim_to_headers": [{"claim": "sub", "header": "x-user"}],
            }}},
        })  # fmt: skip
    if "rl" in plugins:
        entries.append({
            "plugin": "rate_limit", "timeout_ms": 150,
            "config": {"redis_pipeline": pipeline,
                       "rules": [{"name": "per_user", "key": ["claim:sub"],
                                  "limits": [{"requests": 10**9, "per": "second"}]}]},
        })  # fmt: skip
    doc: dict[str, Any] = {"server": {"admin": None}, "plugins": entries}
    if redis_url:
        doc["redis"] = {"url": redis_url, "timeout_ms": 200}
    return yaml.safe_dump(doc)


async def _measure(
    name: str, plugins: Sequence[str], requests: list[bytes], concurrency: int,
    jwks: dict[str, Any], redis_url: str | None = None, pipeline: bool = True,
) -> tuple[str, float]:  # fmt: skip
    loaded = parse_config(_config(plugins, jwks, redis_url, pipeline))
    services = Services()
    if redis_url:
        from extproc.services.redis import make_redis

        services.redis = make_redis(redis_url, socket_timeout=1.0, connect_timeout=1.0)
    gen = await build_generation(loaded, 1, services)
    metrics = StreamMetrics(services.registry)
    chain = gen.chain

    async def one(data: bytes) -> None:
        msg = codec.decode(pb.ProcessingRequest.FromString(data))
        stream = StreamProcessor(chain, metrics)
        reply = await stream.handle(msg, None)
        assert reply is not None
        codec.encode_bytes(msg.phase, reply)

    async def run_all(batch: list[bytes]) -> None:
        if concurrency == 1:
            for data in batch:
                await one(data)
            return
        for i in range(0, len(batch), concurrency):
            await asyncio.gather(*(one(d) for d in batch[i : i + concurrency]))

    await run_all(requests)  # warm: caches, JIT-free but allocator and branch state
    t0 = time.process_time()
    await run_all(requests)
    cpu = time.process_time() - t0
    await gen.shutdown(1.0)
    await services.aclose()
    return name, cpu / len(requests) * 1e6


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    traffic = make_traffic(1000)
    requests = [_request_bytes(traffic.tokens[i % 1000], i) for i in range(args.requests)]
    rows = []
    for name, plugins in (
        ("protocol only (no plugins)", ()),
        ("headers", ("headers",)),
        ("jwt (cache hit)", ("jwt",)),
        ("jwt + rate_limit (local store)", ("jwt", "rl")),
    ):
        rows.append(await _measure(name, plugins, requests, 1, traffic.jwks))
    from extproc.testing.redis_server import RedisServer

    redis = await asyncio.to_thread(RedisServer)
    try:
        for transport, pipeline in (("pipelined", True), ("redis-py pool", False)):
            rows.append(await _measure(
                f"jwt + rate_limit (redis {transport}, batched, {args.concurrency} at once)",
                ("jwt", "rl"), requests, args.concurrency, traffic.jwks, redis.url, pipeline,
            ))  # fmt: skip
        for transport, pipeline in (("pipelined", True), ("redis-py pool", False)):
            rows.append(await _measure(
                f"jwt + rate_limit (redis {transport}, one request at a time)",
                ("jwt", "rl"), requests[: len(requests) // 4], 1, traffic.jwks, redis.url,
                pipeline,
            ))  # fmt: skip
    finally:
        await asyncio.to_thread(redis.close)
    base = rows[0][1]
    print(f"\n{args.requests} requests (request headers), CPU us per request, one process\n")
    print("| configuration | CPU µs/request | added over protocol only |")
    print("|---|---:|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} | {us - base:+.1f} |")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
