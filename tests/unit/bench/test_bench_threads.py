"""``bench.threads``: reading threads' schedstat, grouping them, the per-request table."""

from __future__ import annotations

import os
import threading
from pathlib import Path

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
