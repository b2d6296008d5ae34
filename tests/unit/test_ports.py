"""Ports for the processes tests and the benchmark start: below the ephemeral range, so that
no outgoing connection (a sidecar to Redis, an exporter to its collector) can be given one
between its choice and the server's bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from extproc.testing import ports
from extproc.testing.ports import free_port


def test_ports_are_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen = [free_port() for _ in range(200)]
    assert len(set(chosen)) == len(chosen)
    assert all(20_000 <= port < low for port in chosen)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", chosen[-1]))


def test_a_port_in_use_is_not_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    spare = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        candidates = iter([busy, busy, spare])
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: 60_000)
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(candidates))
        monkeypatch.setattr(ports, "_given", set())
        assert free_port() == spare


def test_without_room_below_the_range_the_os_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral_start", lambda: 20_500)
    port = free_port()
    assert port > 0
