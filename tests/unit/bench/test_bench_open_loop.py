"""The open-loop generator against a small HTTP/1.1 server of the test's own: latency taken
from each request's scheduled time (a queue for a busy connection is charged), never sent
early, statuses and socket errors counted apart, connections replaced when the server closes
them."""

from __future__ import annotations

import itertools
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from bench.load import open_loop, open_loop_pair


class _Handler(socketserver.BaseRequestHandler):
    """Keep-alive HTTP/1.1: ``/slow`` answers after 20 ms, ``/500`` with a 500, ``/close``
    with ``Connection: close`` (then closes), ``/drop`` closes without an answer."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path == b"/drop":
                return
            if path == b"/slow":
                time.sleep(0.02)
            status = b"500 Internal Server Error" if path == b"/500" else b"200 OK"
            close = path == b"/close"
            sock.sendall(
                b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n"
                + (b"connection: close\r\n" if close else b"") + b"\r\nok"
            )  # fmt: skip
            if close:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def port() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode()


def test_answers_are_counted_and_never_sent_early(port: int) -> None:
    result = open_loop(port, [_get("/")], rate=500, duration_s=0.4, connections=4)
    assert result.requests == 200 and result.statuses == {"200": 200}
    assert result.socket_errors == 0 and result.errors(frozenset({"200"})) == 0
    # each request is written at or after its scheduled time, never before
    assert result.extra["send_late_p50_ms"] >= 0.0
    assert result.extra["send_late_p99_ms"] >= result.extra["send_late_p50_ms"]
    assert 0.0 < result.latency_ms["p50"] <= result.latency_ms["p99"]
    assert result.extra["achieved_rps"] > 0 and result.extra["wall_s"] >= 0.4


def test_a_queue_for_a_busy_connection_is_charged_as_latency(port: int) -> None:
    # 100 requests over 0.5 s, one connection, 20 ms each: the server manages ~50/s, so the
    # last ones wait ~1.5 s behind the others - latency from their scheduled time
    result = open_loop(port, [_get("/slow")], rate=200, duration_s=0.5, connections=1)
    assert result.requests == 100 and result.statuses == {"200": 100}
    assert result.latency_ms["p50"] >= 20.0
    assert result.latency_ms["p99"] >= 1000.0  # measured from the send time it would be 20
    assert result.extra["send_late_p99_ms"] >= 1000.0  # written late: queued for the connection


def test_each_answer_keeps_its_scheduled_time_and_its_arrival(port: int) -> None:
    # 20 requests 10 ms apart on one connection, each 20 ms: the queue grows, and the spans
    # say when each was due and when it came back, in send order
    result = open_loop(port, [_get("/slow")], rate=100, duration_s=0.2, connections=1)
    assert len(result.spans) == result.requests == 20
    due = [s for s, _ in result.spans]
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert all(g == pytest.approx(0.01, abs=1e-6) for g in gaps)  # the schedule, not sends
    waits = [done - sent for sent, done in result.spans]
    assert min(waits) >= 0.02
    assert waits[-1] > waits[0] + 0.1  # the last waited behind the other nineteen
    assert result.latency_ms["p50"] == pytest.approx(sorted(waits)[10] * 1000)


def test_errors_and_closed_connections(port: int) -> None:
    mix = [_get("/"), _get("/500"), _get("/close"), _get("/drop")]
    result = open_loop(port, mix, rate=200, duration_s=0.2, connections=2)
    # 40 requests: a 200 and a 200 with Connection: close, a 500, a drop, ten times each;
    # the closed connections are replaced, so every later request still gets through
    assert result.statuses == {"200": 20, "500": 10}
    assert result.socket_errors == 10
    assert result.errors(frozenset({"200"})) == 20  # the 500s and the drops


def test_a_server_that_goes_away_gives_errors_not_a_crash() -> None:
    server = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()  # new connections are refused from here on

    threading.Timer(0.1, stop).start()
    # every answer closes its connection, so each request after the stop needs a new one
    result = open_loop(server.server_address[1], [_get("/close")], rate=200, duration_s=0.4,
                       connections=2)  # fmt: skip
    assert 0 < result.requests < 80
    assert result.requests + result.socket_errors == 80  # every request accounted for
    assert set(result.statuses) == {"200"}


def test_a_pair_gets_the_same_moments(port: int) -> None:
    first, second = open_loop_pair(
        [(port, [_get("/")]), (port, [_get("/500")])], rate=200, duration_s=0.2, connections=2
    )
    assert first.statuses == {"200": 40} and second.statuses == {"500": 40}
