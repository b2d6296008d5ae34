"""Load generators: ``wrk`` closed loop (throughput at fixed connections) and a small
open-loop generator (latency at a fixed request rate, measured from each request's
*scheduled* send time, so a stall is charged to every request it delays).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import which_or_hint
from extproc.observability.gcpause import GcTimer

__all__ = ["WRK_HINT", "LoadResult", "open_loop", "run_wrk", "wrk_binary"]

WRK_HINT = "apt-get update && apt-get install -y wrk  (Debian/Ubuntu package 'wrk')"


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    statuses: dict[str, int]
    socket_errors: int
    #: latency percentiles in milliseconds: p50, p90, p99 (and p95, p98, p99.9 for the open
    #: loop: the shape of its tail)
    latency_ms: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def errors(self, allowed: frozenset[str]) -> int:
        """Socket errors, 5xx, and any status outside ``allowed`` that is not a 4xx."""
        bad = sum(
            n
            for code, n in self.statuses.items()
            if code not in allowed and not code.startswith("4")
        )
        return self.socket_errors + bad

    def client_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code.startswith("4"))


def wrk_binary() -> str:
    return which_or_hint("wrk", WRK_HINT)


def run_wrk(
    port: int,
    script: Path,
    *,
    duration_s: float,
    connections: int,
    threads: int = 1,
    timeout_s: float = 5.0,
) -> LoadResult:
    """``wrk`` against ``http://127.0.0.1:<port>``; stops by itself after ``duration_s``."""
    argv = [
        wrk_binary(),
        "-t", str(threads),
        "-c", str(connections),
        "-d", f"{max(1, round(duration_s))}s",
        "--timeout", f"{timeout_s:g}s",
        "-s", str(script),
        f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        raise RuntimeError(
            f"wrk gave no result (rc {done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return LoadResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        statuses={str(k): int(v) for k, v in data["statuses"].items()},
        socket_errors=sum(int(data[k]) for k in ("connect", "read", "write", "timeout")),
        latency_ms={p: data[p] / 1000 for p in ("p50", "p90", "p99")},
    )


# ---------------------------------------------------------------------------- open loop


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)[1].decode()
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


@contextlib.contextmanager
def _gc_pauses() -> Iterator[list[tuple[int, float]]]:
    """The generator's own collector pauses while the block runs: (generation, seconds)."""
    pauses: list[tuple[int, float]] = []
    with GcTimer(lambda generation, seconds: pauses.append((generation, seconds))):
        yield pauses


async def _open_loop(
    port: int, requests: list[bytes], rate: float, duration_s: float, connections: int
) -> LoadResult:
    # uvloop's loop.time() ticks in whole milliseconds: measure with perf_counter
    clock = time.perf_counter
    total = int(rate * duration_s)
    queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    socket_errors = 0

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    conns = [await connect() for _ in range(connections)]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal socket_errors
        while (item := await queue.get()) is not None:
            scheduled, i = item
            try:
                writer.write(requests[i % len(requests)])
                status, close = await asyncio.wait_for(_read_response(reader), 5.0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                socket_errors += 1
                writer.close()
                reader, writer = await connect()
                continue
            latencies.append(clock() - scheduled)
            statuses[status] += 1
            if close:
                writer.close()
                reader, writer = await connect()
        writer.close()

    workers = [asyncio.ensure_future(worker(r, w)) for r, w in conns]
    start = clock() + 0.01
    interval = 1.0 / rate
    for i in range(total):
        scheduled = start + i * interval
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((scheduled, i))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers, return_exceptions=True)
    elapsed = clock() - start
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return LoadResult(
        requests=len(latencies),
        duration_s=elapsed,
        statuses=dict(statuses),
        socket_errors=socket_errors,
        latency_ms={
            "p50": pct(50),
            "p90": pct(90),
            "p95": pct(95),
            "p98": pct(98),
            "p99": pct(99),
            "p99.9": pct(99.9),
        },
        extra={"rate": rate, "achieved_rps": len(latencies) / elapsed if elapsed else 0.0},
    )


def open_loop(
    port: int, requests: list[bytes], *, rate: float, duration_s: float, connections: int = 32
) -> LoadResult:
    """Send ``rate`` requests/s for ``duration_s`` over ``connections`` keep-alive HTTP/1.1
    connections, whatever the server's pace (requests queue for a free connection)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    started = time.monotonic()
    with _gc_pauses() as pauses:
        result = runner(_open_loop(port, requests, rate, duration_s, connections))
    result.extra["wall_s"] = time.monotonic() - started
    # the generator's own collector, which would delay its sends and reads like a slow server
    result.extra["generator_gc_pauses"] = len(pauses)
    result.extra["generator_gc_ms"] = sum(d for _, d in pauses) * 1000
    result.extra["generator_gc_max_ms"] = max((d for _, d in pauses), default=0.0) * 1000
    return result


def open_loop_pair(
    targets: list[tuple[int, list[bytes]]], *, rate: float, duration_s: float, connections: int
) -> list[LoadResult]:
    """:func:`open_loop` against several listeners at once, ``rate`` requests/s each, from one
    event loop: every target sees the same moments of the machine (``--baseline`` pairs)."""
    import uvloop

    async def both() -> list[LoadResult]:
        return list(
            await asyncio.gather(
                *(_open_loop(port, reqs, rate, duration_s, connections) for port, reqs in targets)
            )
        )

    return uvloop.run(both())
