"""``bench.threads``: reading threads' schedstat, grouping them, the per-request table."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from bench.threads import ThreadTime, group_name, medians, per_request, read_threads, table


def _task(root: Path, pid: int, tid: int, comm: str, schedstat: str) -> None:
    task = root / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    (task / "comm").write_text(comm + "\n")
    (task / "schedstat").write_text(schedstat + "\n")


def test_group_names_drop_digits_and_name_the_main_thread(tmp_path: Path) -> None:
    assert group_name("envoy", "wrk:worker_0\n") == "envoy: wrk:worker_N"
    assert group_name("worker-1", "grpc_global_tim") == "worker-1: grpc_global_tim"
    _task(tmp_path, 10, 10, "python", "5000 700 3")
    _task(tmp_path, 10, 11, "event_engine", "2000 100 9")
    _task(tmp_path, 10, 12, "event_engine", "1000 50 4")
    (tmp_path / "10" / "task" / "13").mkdir()  # gone half-way: no files
    assert read_threads({10: "sidecar", 99: "redis"}, root=tmp_path) == {
        "sidecar: main [10]": ThreadTime(5000, 700, 3),
        "sidecar: event_engine [11]": ThreadTime(2000, 100, 9),
        "sidecar: event_engine [12]": ThreadTime(1000, 50, 4),
    }


def test_reads_this_process_for_real() -> None:
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        seen = read_threads({os.getpid(): "me"})
    finally:
        stop.set()
        helper.join()
    assert f"me: main [{os.getpid()}]" in seen
    assert len(seen) >= 2
    assert seen[f"me: main [{os.getpid()}]"].cpu_ns > 0


def test_per_request_sums_a_group_and_counts_a_new_thread_from_zero() -> None:
    before = {
        "w: main [1]": ThreadTime(1_000_000, 0, 10),
        "w: event_engine [2]": ThreadTime(0, 0, 0),
    }
    after = {
        "w: main [1]": ThreadTime(3_000_000, 400_000, 210),
        "w: event_engine [2]": ThreadTime(100_000, 0, 20),
        "w: event_engine [3]": ThreadTime(300_000, 200_000, 20),  # born in between
    }
    assert per_request(before, after, 100) == {
        "w: main": (20.0, 4.0, 2.0, 1),
        "w: event_engine": (4.0, 2.0, 0.4, 2),
    }


def test_medians_and_the_table() -> None:
    rounds = [
        ("a", 1000.0, 0.2, 30.0, {"w: main": (100.0, 10.0, 1.0, 1)}),
        ("a", 1200.0, 0.1, 10.0, {"w: main": (300.0, 30.0, 3.0, 1), "w: x": (5.0, 0.0, 1.0, 2)}),
        ("a", 1100.0, 0.3, 20.0, {"w: main": (200.0, 20.0, 2.0, 1)}),
    ]
    row = medians(rounds)
    assert row == (
        "a",
        1100.0,
        0.2,
        20.0,
        {"w: main": (200.0, 20.0, 2.0, 1), "w: x": (0.0, 0.0, 0.0, 2)},
    )
    lines = table([row]).splitlines()
    assert lines[2] == "| `a` | 1,100 | 20% | rest of the machine | 20 | | |"
    assert lines[3] == "| | | | w: main (1) | 200.0 | 20.0 | 2.00 |"
    assert len(lines) == 4  # w: x is below 1 µs in both columns


class _FakeStack:
    """``bench.threads``' view of a stack: Envoy pid 1, sidecar pid 10 + its port; ``alone``
    says whether it had to start the sidecar again (another one ran alone before it)."""

    envoy = type("P", (), {"pid": 1})()
    redis = None
    ports: dict[str, int] = {}
    events: list[str] = []
    current: str | None = None

    def __init__(self, chosen: object, traffic: object, workdir: Path) -> None:
        pass

    def __enter__(self) -> _FakeStack:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def alone(self, key: str) -> bool:
        started = self.current is not None and self.current != key
        self.current = key
        self.events.append(f"alone {key}")
        return started

    def port(self, key: str) -> int:
        return self.ports[key]

    def sidecar_pids(self, key: str) -> list[int]:
        return [10 + self.ports[key]]


class _FakeTraffic:
    def write_wrk_script(self, workdir: Path) -> Path:
        return workdir / "mix.lua"


def _fake_harness(
    monkeypatch: pytest.MonkeyPatch, ports: dict[str, int], events: list[str]
) -> None:
    """Everything ``bench.threads.measure`` starts or reads, but the load and the threads."""
    from bench import threads as bench_threads

    stack = type("Stack", (_FakeStack,), {"ports": ports, "events": events})
    monkeypatch.setattr(bench_threads, "Stack", stack)
    monkeypatch.setattr(bench_threads, "make_traffic", lambda n: _FakeTraffic())
    monkeypatch.setattr(bench_threads, "scenario", lambda key: type("S", (), {"key": key})())
    monkeypatch.setattr(bench_threads, "machine_ticks", lambda: (0, 0))
    monkeypatch.setattr(bench_threads, "machine_shares", lambda a, b: {"idle": 0.5})


def test_each_sample_has_its_sidecar_alone_warmed_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The others stopped for every sample, as one sidecar per Envoy is; the measured one
    warmed before its first sample and again whenever it had to be started again."""
    from bench import threads as bench_threads
    from bench.load import LoadResult

    events: list[str] = []

    def fake_wrk(port: int, script: Path, *, duration_s: float, connections: int) -> LoadResult:
        kind = "warm" if duration_s == bench_threads.WARM_S else "measure"
        events.append(f"{kind} {'ab'[port - 1]}")
        return LoadResult(100, duration_s, {"200": 100}, 0, {})

    _fake_harness(monkeypatch, {"a": 1, "b": 2}, events)
    monkeypatch.setattr(bench_threads, "run_wrk", fake_wrk)
    monkeypatch.setattr(bench_threads, "read_threads", lambda roles: {})
    rows = bench_threads.measure(
        ["a", "b"], rounds=2, duration_s=8.0, connections=4, workdir=tmp_path
    )
    assert [row[0] for row in rows] == ["a", "b"]
    assert events == [
        "alone a", "warm a", "measure a",  # first round: each warmed before its sample
        "alone b", "warm b", "measure b",
        "alone a", "warm a", "measure a",  # started again (b ran alone): warmed again
        "alone b", "warm b", "measure b",
    ]  # fmt: skip
    events.clear()
    bench_threads.measure(["a"], rounds=2, duration_s=8.0, connections=4, workdir=tmp_path)
    # alone from the start: warmed once
    assert events == ["alone a", "warm a", "measure a", "alone a", "measure a"]


def test_with_a_rate_each_sample_is_the_open_loop_at_that_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--rate R``: wrk only warms; the measured load is the open-loop generator at R req/s
    for the duration, on the scenario's own requests, and the figures are per request it
    sent (a thread's CPU over the open loop's count, not wrk's)."""
    from bench import threads as bench_threads
    from bench.load import LoadResult

    calls: list[tuple[str, int, float, float]] = []
    cpu = {"n": 0}

    def fake_wrk(port: int, script: Path, *, duration_s: float, connections: int) -> LoadResult:
        calls.append(("wrk", port, duration_s, 0.0))
        return LoadResult(10_000, duration_s, {"200": 10_000}, 0, {})

    def fake_open_loop(
        port: int, requests: list[bytes], *, rate: float, duration_s: float
    ) -> LoadResult:
        assert requests == [b"GET /a"]
        calls.append(("open", port, duration_s, rate))
        return LoadResult(2_000, duration_s, {"200": 2_000}, 0, {})

    def fake_read_threads(roles: dict[int, str]) -> dict[str, ThreadTime]:
        assert roles == {1: "envoy", 17: "sidecar"}
        cpu["n"] += 1  # before: 0 ns; after: 1 s of the loop's CPU, 4,000 wake-ups
        spent = cpu["n"] % 2 == 0
        return {"sidecar/main [17]": ThreadTime(10**9 if spent else 0, 0, 4_000 if spent else 0)}

    _fake_harness(monkeypatch, {"a": 7}, [])
    monkeypatch.setattr(bench_threads, "run_wrk", fake_wrk)
    monkeypatch.setattr(bench_threads, "open_loop", fake_open_loop)
    monkeypatch.setattr(bench_threads, "_requests", lambda stack, s, traffic: [b"GET /a"])
    monkeypatch.setattr(bench_threads, "read_threads", fake_read_threads)
    [row] = bench_threads.measure(
        ["a"], rounds=1, duration_s=2.0, connections=4, workdir=tmp_path, rate=1_000.0
    )
    assert calls == [("wrk", 7, bench_threads.WARM_S, 0.0), ("open", 7, 2.0, 1_000.0)]
    key, rps, _, _, groups = row
    assert (key, rps) == ("a", 1_000.0)
    cpu_us, wait_us, runs, count = groups["sidecar/main"]
    assert (cpu_us, wait_us, runs, count) == (500.0, 0.0, 2.0, 1)  # per 2,000 sent, not 10,000
