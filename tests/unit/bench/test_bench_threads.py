"""``bench.threads``: reading threads' schedstat, grouping them, the per-request table."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bench.threads import (
    IDLE_CPU,
    PREEMPTED,
    WOKEN,
    ThreadTime,
    group_name,
    medians,
    parse_trace,
    per_request,
    read_threads,
    table,
    trace_table,
)


def _task(
    root: Path, pid: int, tid: int, comm: str, schedstat: str, switches: tuple[int, int] = (0, 0)
) -> None:
    task = root / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    (task / "comm").write_text(comm + "\n")
    (task / "schedstat").write_text(schedstat + "\n")
    (task / "status").write_text(
        f"Name:\t{comm}\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t{switches[0]}\n"
        f"nonvoluntary_ctxt_switches:\t{switches[1]}\n"
    )


def test_group_names_drop_digits_and_name_the_main_thread(tmp_path: Path) -> None:
    assert group_name("envoy", "wrk:worker_0\n") == "envoy: wrk:worker_N"
    assert group_name("worker-1", "grpc_global_tim") == "worker-1: grpc_global_tim"
    _task(tmp_path, 10, 10, "python", "5000 700 3", (2, 1))
    _task(tmp_path, 10, 11, "event_engine", "2000 100 9", (9, 0))
    _task(tmp_path, 10, 12, "event_engine", "1000 50 4")
    (tmp_path / "10" / "task" / "12" / "status").unlink()  # gone between two reads
    (tmp_path / "10" / "task" / "13").mkdir()  # gone half-way: no files
    assert read_threads({10: "sidecar", 99: "redis"}, root=tmp_path) == {
        "sidecar: main [10]": ThreadTime(5000, 700, 3, 2, 1),
        "sidecar: event_engine [11]": ThreadTime(2000, 100, 9, 9, 0),
        "sidecar: event_engine [12]": ThreadTime(1000, 50, 4, 0, 0),
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
    me = seen[f"me: main [{os.getpid()}]"]
    assert me.cpu_ns > 0
    assert me.sleeps > 0  # the kernel's own counters, read from status
    assert me.sleeps + me.preempted <= me.runs + 1  # each went back on a CPU (or is on one)


def test_per_request_sums_a_group_and_counts_a_new_thread_from_zero() -> None:
    before = {
        "w: main [1]": ThreadTime(1_000_000, 0, 10, 8, 2),
        "w: event_engine [2]": ThreadTime(0, 0, 0),
    }
    after = {
        "w: main [1]": ThreadTime(3_000_000, 400_000, 210, 158, 52),
        "w: event_engine [2]": ThreadTime(100_000, 0, 20, 20, 0),
        "w: event_engine [3]": ThreadTime(300_000, 200_000, 20, 10, 10),  # born in between
    }
    assert per_request(before, after, 100) == {
        "w: main": (20.0, 4.0, 2.0, 1.5, 0.5, 1),
        "w: event_engine": (4.0, 2.0, 0.4, pytest.approx(0.3), 0.1, 2),
    }


def test_medians_and_the_table() -> None:
    python = (WOKEN, "w: python")
    rounds = [
        ("a", 1000.0, 0.2, 30.0, {"w: main": (100.0, 10.0, 1.0, 0.8, 0.2, 1)}, {python: 2.0}),
        (
            "a",
            1200.0,
            0.1,
            10.0,
            {"w: main": (300.0, 30.0, 3.0, 2.0, 1.0, 1), "w: x": (5.0, 0.0, 1.0, 1.0, 0.0, 2)},
            {(WOKEN, "w: python"): 4.0, (WOKEN, IDLE_CPU): 0.3, (PREEMPTED, "envoy"): 0.6},
        ),
        ("a", 1100.0, 0.3, 20.0, {"w: main": (200.0, 20.0, 2.0, 1.5, 0.5, 1)}, {python: 3.0}),
    ]
    row = medians(rounds)
    assert row == (
        "a",
        1100.0,
        0.2,
        20.0,
        {"w: main": (200.0, 20.0, 2.0, 1.5, 0.5, 1), "w: x": (0.0, 0.0, 0.0, 0.0, 0.0, 2)},
        # a count missing from a round counts 0 there
        {(WOKEN, "w: python"): 3.0, (WOKEN, IDLE_CPU): 0.0, (PREEMPTED, "envoy"): 0.0},
    )
    lines = table([row]).splitlines()
    assert lines[2] == "| `a` | 1,100 | 20% | rest of the machine | 20 | | | | |"
    assert lines[3] == "| | | | w: main (1) | 200.0 | 20.0 | 2.00 | 1.50 | 0.50 |"
    assert len(lines) == 4  # w: x is below 1 µs in both columns
    assert trace_table([row]).splitlines()[2:] == [
        "| `a` | woken by | all | 3.00 |",
        "| | | w: python | 3.00 |",  # the idle CPU's 0 is left out
        "| | preempted by | all | 0.00 |",
    ]


def test_wakeups_and_preemptions_are_counted_for_the_loops_by_whom() -> None:
    """``perf script -F comm,tid,trace`` lines. A wake-up: the woken thread is the event's
    ``pid=``, the waker the context the event ran in (tid 0: an interrupt on an idle CPU). A
    switch: counted when the loop left its CPU still runnable (``R``, ``R+``), by the task
    that took it; a loop that went to sleep is not preempted."""
    text = "\n".join(
        [
            "          python  4102 comm=python pid=4100 prio=120 target_cpu=001",
            "    wrk:worker_0  3000 comm=python pid=4100 prio=120 target_cpu=000",
            "         swapper     0 comm=python pid=4100 prio=120 target_cpu=001",
            "    redis-server  3100 comm=python pid=4100 prio=120 target_cpu=001",
            "          python  4102 comm=python pid=4100 prio=120 target_cpu=001",
            "     kworker/1:2    77 comm=python pid=4100 prio=120 target_cpu=001",
            # the loop waking another thread: not counted
            "          python  4100 comm=event_engine pid=4103 prio=120 target_cpu=000",
            "  some comm with spaces  88 comm=python pid=4100 prio=120 target_cpu=000",
            "garbage",
            "  python 4100 prev_comm=python prev_pid=4100 prev_prio=120 prev_state=R+ ==> "
            "next_comm=wrk:worker_0 next_pid=3000 next_prio=120",
            "  python 4100 prev_comm=python prev_pid=4100 prev_prio=120 prev_state=R ==> "
            "next_comm=kworker/0:1 next_pid=66 next_prio=120",
            "  python 4100 prev_comm=python prev_pid=4100 prev_prio=120 prev_state=S ==> "
            "next_comm=swapper/0 next_pid=0 next_prio=120",  # slept: not a preemption
            "  python 4102 prev_comm=python prev_pid=4102 prev_prio=120 prev_state=R ==> "
            "next_comm=python next_pid=4100 next_prio=120",  # another thread preempted
        ]
    )
    names = {4102: "sidecar: python", 3000: "envoy: wrk:worker_N", 3100: "redis: main"}
    assert parse_trace(text, [4100], names) == {
        (WOKEN, "sidecar: python"): 2,
        (WOKEN, "envoy: wrk:worker_N"): 1,
        (WOKEN, IDLE_CPU): 1,
        (WOKEN, "redis: main"): 1,
        (WOKEN, "other: kworker/N:N"): 1,
        (WOKEN, "other: some comm with spaces"): 1,
        (PREEMPTED, "envoy: wrk:worker_N"): 1,
        (PREEMPTED, "other: kworker/N:N"): 1,
    }
    assert parse_trace(text, [9999], names) == {}


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
    monkeypatch.setattr(bench_threads, "machine_busy_seconds", lambda a, b: 1.0)


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
    key, rps, _, _, groups, wakers = row
    assert wakers == {}  # not traced without --trace
    assert (key, rps) == ("a", 1_000.0)
    assert groups["sidecar/main"] == (500.0, 0.0, 2.0, 0.0, 0.0, 1)  # per 2,000 sent, not 10,000


def test_trace_of_each_sample_is_inside_its_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--trace``: a trace of the loop threads (a lone sidecar's own pid; with workers,
    theirs, not the supervisor's) from 1 s into each measured load to 1 s before its end, its
    counts per request at the load's rate over that span."""
    from bench import threads as bench_threads
    from bench.load import LoadResult

    traces: list[tuple[list[int], float, float]] = []

    class FakeTrace:
        def __init__(self, out: Path, loops: list[int], *, delay_s: float, span_s: float) -> None:
            traces.append((loops, delay_s, span_s))

        def start(self) -> None:
            pass

        def finish(self, names: dict[int, str]) -> dict[tuple[str, str], int]:
            assert names == {17: "sidecar: main"}
            return {(WOKEN, "sidecar: python"): 4_000, (PREEMPTED, "envoy"): 200}

    def fake_open_loop(
        port: int, requests: list[bytes], *, rate: float, duration_s: float
    ) -> LoadResult:
        return LoadResult(6_000, duration_s, {"200": 6_000}, 0, {})  # 1,000 req/s

    _fake_harness(monkeypatch, {"a": 7}, [])
    monkeypatch.setattr(bench_threads, "LoopTrace", FakeTrace)
    monkeypatch.setattr(bench_threads, "run_wrk", lambda *a, **k: LoadResult(1, 1, {}, 0, {}))
    monkeypatch.setattr(bench_threads, "open_loop", fake_open_loop)
    monkeypatch.setattr(bench_threads, "_requests", lambda stack, s, traffic: [b"GET /a"])
    monkeypatch.setattr(
        bench_threads, "read_threads", lambda roles: {"sidecar: main [17]": ThreadTime(0, 0, 0)}
    )
    [row] = bench_threads.measure(
        ["a"], rounds=1, duration_s=6.0, connections=4, workdir=tmp_path, rate=1_000.0,
        trace=True,
    )  # fmt: skip
    assert traces == [([17], 1.0, 4.0)]
    # per 4,000 requests traced
    assert row[5] == {(WOKEN, "sidecar: python"): 1.0, (PREEMPTED, "envoy"): 0.05}
    with pytest.raises(ValueError, match="4 s"):
        bench_threads.measure(
            ["a"], rounds=1, duration_s=3.0, connections=4, workdir=tmp_path, rate=1_000.0,
            trace=True,
        )  # fmt: skip


def test_the_loops_are_the_serving_processes_main_threads() -> None:
    from bench.threads import _loops

    assert _loops({1: "envoy", 2: "redis", 10: "sidecar"}) == [10]
    assert _loops({1: "envoy", 10: "supervisor", 11: "worker-0", 12: "worker-1"}) == [11, 12]


def test_a_child_is_found_by_its_parent_and_name() -> None:
    """How ``LoopTrace.start`` knows perf has started its workload: a ``sleep`` below perf."""
    import subprocess
    import sys

    from bench.threads import _has_child

    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not _has_child(os.getpid(), "sleep"):  # found once exec'd
            assert time.monotonic() < deadline, "the sleep child was never seen"
            time.sleep(0.01)
        assert not _has_child(os.getpid(), "perf")
        assert not _has_child(child.pid, "sleep")  # its own process is not its child
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert not _has_child(other.pid, "sleep")
        finally:
            other.kill()
            other.wait()
    finally:
        child.kill()
        child.wait()
