"""Instructions per request, counted by callgrind: a cost figure the machine's mood cannot move.

On the shared 2-core machines the speed of the same code drifts several times over within an
hour, so timings of two versions are only comparable side by side in one run
(``bench.run --baseline``), and even then per-round ratios spread by +-20 %. An instruction
count does not drift: valgrind's callgrind counts the instructions the CPU executes, the same
for the same code and inputs whatever else the machine is doing. It is not time (a cache miss
costs more than an add; the kernel's work and the sockets are not in it), so it complements
the end-to-end benchmark rather than replacing it: it is the figure for "did this change make
our code do less", to the tenth of a percent.

What is counted, per configuration, in a child process run under callgrind:

* the sidecar's whole stream path on the **http2 transport, in memory**: HTTP/2 frames of one
  ext_proc stream (a gRPC HEADERS block as Envoy's client sends it, and a DATA frame with one
  ``ProcessingRequest``: the request headers of one HTTP request) handed to the connection's
  ``data_received``, through framing, HPACK, the gRPC message, protobuf, the state machine,
  the plugin chain, the reply's encoding and its frames, to the bytes given to the transport;
  one stream at a time (no batching or coalescing: the cost at a light load);
* configurations as the benchmark's scenarios: ``extproc-h2`` (no plugins), ``extproc-jwt``
  (jwt_auth, every token a cache hit), ``extproc-jwt-rl-h2`` with the rate limiter on its
  in-process store and on Redis (a redis-server this starts; one round trip per request);
* instrumentation is switched on (``callgrind_control -i on``) after the warm-up (every token
  seen, every cache filled) and off after N requests; the switching itself, measured once with
  no request between, is subtracted.

``--baseline REV`` counts commit REV the same way (``git archive`` into a temporary
directory, the same driver and inputs) and adds the ratio. Tokens, JWKS and request bytes are
made once, in this process, and handed to every child; hash randomization is off in them.

Run: ``python -m bench.instructions [--requests N] [--baseline REV] [--configs a,b]``.
Needs valgrind (``callgrind_control`` comes with it). About 2 minutes per tree here.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.http2 import (
    ACK,
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from extproc.server import SERVICE_NAME

#: (key, title, bench scenario whose sidecar config is used, Redis or not)
CONFIGS: tuple[tuple[str, str, str, bool], ...] = (
    ("none", "no plugins (`extproc-h2`)", "extproc-h2", False),
    ("jwt", "jwt_auth, cache hit (`extproc-jwt`)", "extproc-jwt", False),
    ("jwt-rl-local", "jwt_auth + rate_limit, in-process store", "extproc-jwt-rl-h2", False),
    ("jwt-rl-redis", "jwt_auth + rate_limit, Redis (a round trip per request)",
     "extproc-jwt-rl-h2", True),
)  # fmt: skip
WARM = 1000
TOKENS = 200
_COLLECTED = re.compile(r"Collected\s*:\s*([\d,]+)")
_HERE = Path(__file__).resolve()


@dataclass(frozen=True, slots=True)
class Count:
    config: str
    tree: str
    total: int  # instructions between the two switches, the switching included
    requests: int


def collected(stderr: str) -> int:
    """The instruction count callgrind prints at exit (``==pid== Collected : N``)."""
    found = _COLLECTED.findall(stderr)
    if not found:
        raise RuntimeError(f"callgrind printed no count:\n{stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def per_request(count: Count, switching: int) -> float:
    return (count.total - switching) / count.requests


# ---------------------------------------------------------------------------- the parent


def _spec(config: str, requests: int, redis_url: str | None, workdir: Path) -> Path:
    """Write the child's inputs: the sidecar config, the count, where the requests are."""
    from bench.stack import scenario, sidecar_config

    key, _, scen, redis = next(c for c in CONFIGS if c[0] == config)
    traffic = _traffic()
    doc = sidecar_config(scenario(scen), traffic, redis_url if redis else None)
    doc["server"]["transport"] = "http2"
    doc.pop("tracing", None)
    # under valgrind everything runs ~50x slower: deadlines far enough out that none fires
    # (a timeout or a fallback would count another path; the child checks that none happened)
    doc["server"]["message_timeout_ms"] = 60_000
    for p in doc["plugins"]:
        p["timeout_ms"] = 10_000
        if p["plugin"] == "rate_limit" and redis:
            p["config"]["redis_timeout_ms"] = 1_000
    if redis:
        doc["redis"]["timeout_ms"] = 10_000
    else:
        doc.pop("redis", None)
        for p in doc["plugins"]:
            if p["plugin"] == "rate_limit":  # the in-process store takes no batching options
                p["config"].pop("batch", None)
                p["config"].pop("redis_pipeline", None)
    path = workdir / f"{key}.json"
    spec = {"config": doc, "requests": requests, "requests_file": str(workdir / "requests.bin")}
    path.write_text(json.dumps(spec))
    return path


@functools.cache
def _traffic() -> Any:
    from bench.traffic import make_traffic

    return make_traffic(TOKENS)


def _child(spec: Path, tree: Path, *, switching_only: bool = False) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={spec.parent}/callgrind.%p",
        sys.executable, str(_HERE), "--child", str(spec),
    ]  # fmt: skip
    if switching_only:
        argv.append("--switching-only")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return collected(done.stderr)


def table(rows: Sequence[tuple[str, float, float | None]], base_name: str | None) -> str:
    head = "| configuration | instructions / request |"
    rule = "|---|---:|"
    if base_name is not None:
        head += f" at {base_name} | ratio |"
        rule += "---:|---:|"
    out = [head, rule]
    for title, here, base in rows:
        line = f"| {title} | {here:,.0f} |"
        if base_name is not None:
            line += f" {base:,.0f} | {here / base:.3f} |" if base else " - | - |"
        out.append(line)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--baseline", metavar="REV")
    parser.add_argument(
        "--configs", default=",".join(c[0] for c in CONFIGS),
        help=f"comma-separated, of: {', '.join(c[0] for c in CONFIGS)}",
    )  # fmt: skip
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--switching-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        import uvloop

        spec = json.loads(args.child.read_text())
        raw = Path(spec["requests_file"]).read_bytes()
        uvloop.run(_drive(spec, _unpack(raw), args.switching_only))
        return 0
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install valgrind")
    configs = list(dict.fromkeys(c for c in args.configs.split(",") if c))
    unknown = set(configs) - {c[0] for c in CONFIGS}
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")

    from bench.stack import REPO, baseline_tree

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="extproc-instr-") as tmp:
        workdir = Path(tmp)
        trees: list[tuple[str, Path]] = [("this tree", REPO)]
        if args.baseline:
            sha, tree = baseline_tree(args.baseline, workdir)
            trees.append((sha, tree))
        redis = None
        if any(c[3] for c in CONFIGS if c[0] in configs):
            from extproc.testing.redis_server import RedisServer

            redis = RedisServer()
        try:
            _requests(workdir, args.requests)
            url = redis.url if redis else None
            specs = {c: _spec(c, args.requests, url, workdir) for c in configs}
            jobs = [(c, name, tree) for c in configs for name, tree in trees]
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                switching = pool.submit(_child, specs[configs[0]], REPO, switching_only=True)
                futures = {job: pool.submit(_child, specs[job[0]], job[2]) for job in jobs}
                counts = {
                    (c, name): Count(c, name, f.result(), args.requests)
                    for (c, name, _), f in futures.items()
                }
                switch = switching.result()
        finally:
            if redis is not None:
                redis.close()
    titles = {c[0]: c[1] for c in CONFIGS}
    base_name = trees[1][0] if len(trees) > 1 else None
    rows = [
        (
            titles[c],
            per_request(counts[(c, "this tree")], switch),
            per_request(counts[(c, base_name)], switch) if base_name else None,
        )
        for c in configs
    ]
    print(
        f"\nInstructions per request (callgrind), {args.requests} requests after {WARM} "
        f"warm-up ones, one stream at a time over the http2 transport in memory; "
        f"switching ({switch:,} instructions) subtracted; {time.monotonic() - t0:.0f} s\n"
    )
    print(table(rows, base_name))
    return 0


def _requests(workdir: Path, n: int) -> None:
    """The ProcessingRequest bytes, one per stream, warm-up and measured (tokens in turn)."""
    from bench.hotpath import _request_bytes

    traffic = _traffic()
    out = bytearray()
    for i in range(WARM + n):
        data = _request_bytes(traffic.tokens[i % len(traffic.tokens)], i)
        out += len(data).to_bytes(4, "big") + data
    (workdir / "requests.bin").write_bytes(bytes(out))


# ---------------------------------------------------------------------------- the child

_PROCESS = f"/{SERVICE_NAME}/Process"
#: the gRPC request headers of Envoy's ext_proc client, as a constant block
_GRPC_HEADERS = (
    (":method", "POST"), (":scheme", "http"), (":path", _PROCESS),
    (":authority", "ext_proc"), ("content-type", "application/grpc"), ("te", "trailers"),
    ("grpc-timeout", "60S"),
)  # fmt: skip


def _streams(messages: Sequence[bytes]) -> list[bytes]:
    """One write per stream: HEADERS (END_HEADERS) then DATA with the gRPC message; Envoy
    leaves its side open until the server's trailers."""
    from hpack import Encoder

    encoder = Encoder()
    out = []
    for i, body in enumerate(messages):
        sid = 1 + 2 * i
        block = encoder.encode(_GRPC_HEADERS)
        grpc_message = b"\x00" + len(body).to_bytes(4, "big") + body
        out.append(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, 0, sid, grpc_message))
    return out


class _Sink:
    """The connection's transport: counts what the server writes."""

    def __init__(self) -> None:
        self.written = 0
        self.kept: bytearray | None = None  # a reply to check, while set

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.kept is not None:
            self.kept += data

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _failures(metrics: str) -> dict[str, float]:
    """Plugin failures and rate-limit fallbacks so far, from the Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name.endswith(("_plugin_errors_total", "_fallback_total")):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def _check_reply(data: bytes, stream: int = 1) -> None:
    """The stream was answered as the benchmark's are: a ProcessingResponse that lets
    the request headers through, and grpc-status 0 (a failing config must not be counted)."""
    from hpack import Decoder

    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    decoder = Decoder()
    headers: dict[bytes, bytes] = {}
    body = b""
    pos = 0
    while pos + 9 <= len(data):
        size = int.from_bytes(data[pos : pos + 3], "big")
        kind, sid = data[pos + 3], int.from_bytes(data[pos + 5 : pos + 9], "big")
        payload = data[pos + 9 : pos + 9 + size]
        pos += 9 + size
        if kind == HEADERS:  # every block goes through the decoder: its table must follow
            block = decoder.decode(payload, raw=True)
            if sid == stream:
                headers.update(block)
        elif sid == stream and kind == DATA:
            body += payload
    if headers.get(b"grpc-status") != b"0" or len(body) < 5:
        raise RuntimeError(f"stream {stream} failed: {headers!r}")
    reply = pb.ProcessingResponse.FromString(body[5:])
    if reply.WhichOneof("response") != "request_headers":
        raise RuntimeError(f"stream {stream} was not let through: {reply}")


def _switch(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True, capture_output=True,
    )  # fmt: skip


def _spare_cpu() -> None:
    """Make the worker's saturation meter read 0, as it does at the light load counted here.
    Under callgrind the loop's thread never waits (it is on a CPU all the time, slowed ~50x),
    so the real meter would read saturated, and every rule that reads it (the batcher's window,
    the reply coalescer, jwt_auth's L2 reads) would take its saturated path."""
    from extproc.observability import saturation

    saturation._PER_THREAD.meter = saturation.LoopSaturation(cpu_clock=lambda: 0.0)


def _unpack(raw: bytes) -> list[bytes]:
    messages = []
    pos = 0
    while pos < len(raw):
        size = int.from_bytes(raw[pos : pos + 4], "big")
        messages.append(raw[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return messages


async def _drive(spec: dict[str, Any], messages: list[bytes], switching_only: bool) -> None:
    import gc

    import yaml

    from extproc.config import parse_config
    from extproc.http2 import Http2Server, _Connection
    from extproc.runtime import Runtime, Services
    from extproc.server import ExtProcServicer

    if switching_only:
        _switch(True)
        _switch(False)
        return
    n = spec["requests"]
    assert len(messages) == WARM + n
    _spare_cpu()
    loaded = parse_config(yaml.safe_dump(spec["config"]))
    services = Services()
    if loaded.config.redis is not None:
        from extproc.services.redis import make_redis

        services.redis = make_redis(loaded.config.redis.url)
    runtime = Runtime(services)
    await runtime.start(loaded)
    servicer = ExtProcServicer(runtime, loaded.config, services.registry, None)
    server = Http2Server({_PROCESS: functools.partial(servicer.Process, None)})
    conn = _Connection(server)
    sink = _Sink()
    conn.connection_made(sink)  # type: ignore[arg-type]
    conn.data_received(
        PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0)
        + frame(WINDOW_UPDATE, 0, 0, (2**31 - 1 - 65_535).to_bytes(4, "big"))
    )  # fmt: skip
    streams = _streams(messages)
    loop = asyncio.get_running_loop()

    def run(first: int, stop: int) -> asyncio.Future[None]:
        """Streams first..stop-1, each fed when the one before has ended: one at a time,
        the driver's own cost one callback per stream."""
        done: asyncio.Future[None] = loop.create_future()

        def feed(i: int) -> None:
            if i == stop:
                done.set_result(None)
                return
            conn.data_received(streams[i])
            call = conn.calls.get(1 + 2 * i)
            if call is None or call.task is None:
                done.set_exception(RuntimeError(f"stream {i} started no call"))
                return
            # runs after the flush that the call's end scheduled: the reply has left
            call.task.add_done_callback(lambda _: feed(i + 1))

        feed(first)
        return done

    if loaded.config.redis is not None:
        await asyncio.sleep(1.0)  # the store's connection opens (slowly, under valgrind)
    await run(0, WARM - 1)
    sink.kept = bytearray()
    await run(WARM - 1, WARM)
    _check_reply(bytes(sink.kept), 1 + 2 * (WARM - 1))
    sink.kept = None
    failures = _failures(services.registry.render_prometheus())
    written = sink.written
    gc.collect()
    gc.freeze()  # as `extproc serve` does once serving
    _switch(True)
    await run(WARM, WARM + n)
    _switch(False)
    if sink.written - written < n * 20:
        raise RuntimeError("the server wrote less than a reply per stream")
    after = _failures(services.registry.render_prometheus())
    if after != failures:
        # a plugin timed out or a store fell back: another path than the one meant was counted
        changed = {k: v - failures.get(k, 0.0) for k, v in after.items() if v != failures.get(k)}
        raise RuntimeError(f"failures or fallbacks during the measured streams: {changed}")
    await runtime.shutdown(1.0)
    await services.aclose()


if __name__ == "__main__":
    sys.exit(main())
