"""Load generators: ``wrk`` closed loop (throughput at fixed connections) and a small
open-loop generator (latency at a fixed request rate, measured from each request's
*scheduled* send time, so a stall is charged to every request it delays).
"""

from __future__ import annotations

import collections
import contextlib
import json
import select
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

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
    #: open loop: each answered request's scheduled send time and its reply's arrival, in
    #: send order (``time.perf_counter``, the monotonic clock): when in the run the slow ones were
    spans: list[tuple[float, float]] = field(default_factory=list, repr=False)

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
#
# Two threads, no event loop. The sender sleeps until each request's scheduled time
# (``time.sleep``: clock_nanosleep, tens of microseconds late here) and writes it on a free
# keep-alive connection, or queues it for the next one to come free; the receiver waits on
# every connection at once (epoll), reads the replies and takes each one's latency from its
# request's scheduled time. Both release the GIL while they wait, so neither delays the
# other by more than one reply's parsing. (The asyncio generator before this sent on uvloop
# timers, which count whole milliseconds: its own sends were up to 0.8 ms early and 1 ms
# late, about as much as the tail it was measuring.)

_REPLY_TIMEOUT_S: Final = 5.0


class _Conn:
    """One keep-alive HTTP/1.1 connection: at most one request in flight."""

    __slots__ = ("buf", "scheduled", "sent", "sock")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=_REPLY_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        #: the request in flight: its scheduled time and when it was written (None: idle)
        self.scheduled: float | None = None
        self.sent = 0.0

    def reply(self) -> tuple[str, bool] | None:
        """The status and ``Connection: close`` of the reply complete in ``buf`` (consumed),
        or ``None`` while it is still arriving. Raises ``ValueError`` on a malformed one."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = self.buf[:end].split(b"\r\n")
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
        if len(self.buf) < end + 4 + length:
            return None
        self.buf = self.buf[end + 4 + length :]
        return status, close


class _Target:
    """One listener's connections, requests and results."""

    def __init__(self, port: int, requests: list[bytes], connections: int) -> None:
        self.port = port
        self.requests = requests
        self.conns = [_Conn(port) for _ in range(connections)]
        self.free: collections.deque[_Conn] = collections.deque(self.conns)
        #: requests scheduled while every connection was busy: (scheduled time, index)
        self.backlog: collections.deque[tuple[float, int]] = collections.deque()
        #: (scheduled, replied) of each answered request: its latency is the difference
        self.spans: list[tuple[float, float]] = []
        #: per request, how late it was written (from its scheduled time): the sender's own
        #: lateness and any wait for a free connection, charged to the server like a slow reply
        self.late: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.socket_errors = 0
        self.last_reply = 0.0

    def send(self, conn: _Conn, scheduled: float, i: int, clock: Callable[[], float]) -> None:
        conn.scheduled = scheduled
        conn.sent = clock()
        self.late.append(conn.sent - scheduled)
        conn.sock.sendall(self.requests[i % len(self.requests)])

    def idle(self) -> bool:
        return not self.backlog and len(self.free) == len(self.conns)


def _run_open_loop(
    targets: list[tuple[int, list[bytes]]], rate: float, duration_s: float, connections: int
) -> list[LoadResult]:
    clock = time.perf_counter
    lock = threading.Lock()
    tgts = [_Target(port, reqs, connections) for port, reqs in targets]
    owner: dict[int, tuple[_Target, _Conn]] = {}
    poller = select.epoll()

    def watch(t: _Target, c: _Conn) -> None:
        """Read ``c``'s replies in the receiver."""
        owner[c.sock.fileno()] = (t, c)
        poller.register(c.sock.fileno(), select.EPOLLIN)

    for t in tgts:
        for c in t.conns:
            watch(t, c)
    sending = True

    def replace(t: _Target, c: _Conn) -> _Conn | None:
        """Close ``c``, open its successor (caller holds ``lock``); ``None`` when the server
        refuses it: the run goes on with one connection fewer."""
        fd = c.sock.fileno()
        poller.unregister(fd)
        del owner[fd]
        c.sock.close()
        try:
            n = _Conn(t.port)
        except OSError:
            t.conns.remove(c)
            return None
        t.conns[t.conns.index(c)] = n
        watch(t, n)
        return n

    def done_with(t: _Target, c: _Conn | None) -> None:
        """``c`` is free again: it takes the oldest queued request, or goes back to the pool
        (caller holds ``lock``)."""
        if c is None:
            return
        c.scheduled = None
        if t.backlog:
            write(t, c, *t.backlog.popleft())
        else:
            t.free.append(c)

    def write(t: _Target, c: _Conn, scheduled: float, i: int) -> None:
        """Send request ``i`` on ``c``; a connection that fails is replaced, the request is a
        socket error (caller holds ``lock``)."""
        try:
            t.send(c, scheduled, i, clock)
        except OSError:
            t.socket_errors += 1
            done_with(t, replace(t, c))

    def receive() -> None:
        while True:
            with lock:
                if not sending and all(t.idle() or not t.conns for t in tgts):
                    return
            events = poller.poll(0.05)
            now = clock()
            with lock:
                for fd, _ in events:
                    if fd not in owner:
                        continue
                    t, c = owner[fd]
                    try:
                        data = c.sock.recv(65536)
                        if not data:
                            raise ConnectionResetError("closed by the server")
                        c.buf += data
                        got = c.reply()
                    except (OSError, ValueError, IndexError):
                        if c.scheduled is not None:
                            t.socket_errors += 1
                        done_with(t, replace(t, c))
                        continue
                    if got is None or c.scheduled is None:
                        continue
                    status, close = got
                    t.spans.append((c.scheduled, now))
                    t.statuses[status] += 1
                    t.last_reply = now
                    done_with(t, replace(t, c) if close else c)
                for t in tgts:  # a reply that never comes: a socket error, as before
                    for c in list(t.conns):
                        if c.scheduled is not None and now - c.sent > _REPLY_TIMEOUT_S:
                            t.socket_errors += 1
                            done_with(t, replace(t, c))

    receiver = threading.Thread(target=receive, name="open-loop-receiver", daemon=True)
    receiver.start()
    total = int(rate * duration_s)
    interval = 1.0 / rate
    start = clock() + 0.01
    try:
        for i in range(total):
            scheduled = start + i * interval
            while (delay := scheduled - clock()) > 0:
                time.sleep(delay)
            with lock:
                for t in tgts:
                    if not t.conns:  # the server refused every new connection
                        t.socket_errors += 1
                    elif t.free:
                        write(t, t.free.popleft(), scheduled, i)
                    else:
                        t.backlog.append((scheduled, i))
    finally:
        with lock:
            sending = False
        receiver.join(timeout=_REPLY_TIMEOUT_S + 5)
        for t in tgts:
            # requests that never got a connection, or an answer: socket errors too
            t.socket_errors += len(t.backlog) + sum(c.scheduled is not None for c in t.conns)
            for c in t.conns:
                c.sock.close()
        poller.close()
    return [_result(t, rate, start, clock) for t in tgts]


def percentile_ms(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``ordered`` (seconds, sorted), in milliseconds: the value
    below which ``p`` % of them lie (NaN for none)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def _result(t: _Target, rate: float, start: float, clock: Callable[[], float]) -> LoadResult:
    elapsed = (t.last_reply if t.spans else clock()) - start
    latencies = sorted(done - sent for sent, done in t.spans)
    late = sorted(t.late)

    return LoadResult(
        requests=len(latencies),
        duration_s=elapsed,
        statuses=dict(t.statuses),
        socket_errors=t.socket_errors,
        latency_ms={
            "p50": percentile_ms(latencies, 50),
            "p90": percentile_ms(latencies, 90),
            "p95": percentile_ms(latencies, 95),
            "p98": percentile_ms(latencies, 98),
            "p99": percentile_ms(latencies, 99),
            "p99.9": percentile_ms(latencies, 99.9),
        },
        extra={
            "rate": rate,
            "achieved_rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "send_late_p50_ms": percentile_ms(late, 50),
            "send_late_p99_ms": percentile_ms(late, 99),
        },
        spans=sorted(t.spans),
    )


@contextlib.contextmanager
def _gc_pauses() -> Iterator[list[tuple[int, float]]]:
    """The generator's own collector pauses while the block runs: (generation, seconds)."""
    pauses: list[tuple[int, float]] = []
    with GcTimer(lambda generation, seconds: pauses.append((generation, seconds))):
        yield pauses


def open_loop(
    port: int, requests: list[bytes], *, rate: float, duration_s: float, connections: int = 32
) -> LoadResult:
    """Send ``rate`` requests/s for ``duration_s`` over ``connections`` keep-alive HTTP/1.1
    connections, whatever the server's pace (requests queue for a free connection)."""
    started = time.monotonic()
    with _gc_pauses() as pauses:
        (result,) = _run_open_loop([(port, requests)], rate, duration_s, connections)
    result.extra["wall_s"] = time.monotonic() - started
    # the generator's own collector, which would delay its sends and reads like a slow server
    result.extra["generator_gc_pauses"] = len(pauses)
    result.extra["generator_gc_ms"] = sum(d for _, d in pauses) * 1000
    result.extra["generator_gc_max_ms"] = max((d for _, d in pauses), default=0.0) * 1000
    return result


def open_loop_pair(
    targets: list[tuple[int, list[bytes]]], *, rate: float, duration_s: float, connections: int
) -> list[LoadResult]:
    """:func:`open_loop` against several listeners at once, ``rate`` requests/s each, sent at
    the same moments (in ``targets``' order within each one): every target sees the same
    moments of the machine (``--baseline`` pairs)."""
    return _run_open_loop(targets, rate, duration_s, connections)
