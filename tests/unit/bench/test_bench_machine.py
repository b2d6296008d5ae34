"""How crowded the machine was while a sample ran: /proc/stat's cpu line read into busy, idle
and steal shares, their medians in the summary, and two columns of the latency table."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from bench import report
from bench.procs import (
    CLK_TCK,
    MachineReading,
    kernel_facts,
    machine_busy_seconds,
    machine_shares,
    machine_ticks,
)
from tests.support.bench_samples import closed_loop_sample

#           user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = (
    "cpu  1000 10 200 5000 40 0 50 100 0 0\n"
    "cpu0 500 5 100 2500 20 0 25 50 0 0\ncpu1 500 5 100 2500 20 0 25 50 0 0\nintr 1 2\n"
)
AFTER = (
    "cpu  1600 10 300 5300 60 0 90 140 0 0\n"
    "cpu0 800 5 150 2650 30 0 45 70 0 0\ncpu1 800 5 150 2650 30 0 45 70 0 0\nintr 3 4\n"
)
HZ = CLK_TCK


def test_idle_steal_and_the_cpus_are_read_from_the_machines_lines() -> None:
    assert machine_ticks(BEFORE, at=7.0) == MachineReading(5000 + 40, 100, 2, 7.0)
    assert machine_ticks("cpu  1 2 3 4\ncpu0 1 2 3 4\n", at=1.0) == (4, 0, 1, 1.0)  # old kernel
    idle, steal, cpus, at = machine_ticks()  # this machine's own
    assert idle > 0 and steal >= 0 and cpus == os.cpu_count() and at > 0


def test_shares_are_of_the_elapsed_time_busy_being_what_idle_and_steal_leave() -> None:
    """The tick-sampled user and system fields are not used: busy is the elapsed time (x the
    CPUs) less idle and steal, whatever the busy fields say."""
    seconds = 1100 / (2 * HZ)  # 1,100 ticks of capacity over the two CPUs
    before, after = machine_ticks(BEFORE, at=10.0), machine_ticks(AFTER, at=10.0 + seconds)
    # idle 300 + 20 = 320 ticks, steal 40
    shares = machine_shares(before, after)
    assert shares == pytest.approx({"busy": 740 / 1100, "idle": 320 / 1100, "steal": 40 / 1100})
    assert machine_busy_seconds(before, after) == pytest.approx(740 / HZ)
    lying = AFTER.replace("cpu  1600", "cpu  9600")  # the busy ticks over-counted: no matter
    assert machine_shares(before, machine_ticks(lying, at=10.0 + seconds)) == shares
    # more idle than elapsed (a reading's rounding): all idle, never a negative busy share
    late = machine_ticks(AFTER, at=10.0 + 320 / (2 * HZ) / 2)
    assert machine_shares(before, late) == {"busy": 0.0, "idle": 1.0, "steal": 0.0}
    assert machine_shares(before, before) == {"busy": 0.0, "idle": 0.0, "steal": 0.0}


def test_the_busy_share_agrees_with_a_process_that_spins_half_the_time() -> None:
    """This machine's own /proc/stat, while this process alternates 2 ms of spinning and 2 ms
    of sleep: about a quarter of two CPUs (the other processes add a little)."""
    before = machine_ticks()
    cpu0 = time.process_time()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        spin = time.perf_counter() + 0.002
        while time.perf_counter() < spin:
            pass
        time.sleep(0.002)
    after = machine_ticks()
    own = (time.process_time() - cpu0) / ((after.at - before.at) * after.cpus)
    busy = machine_shares(before, after)["busy"]
    assert own - 0.05 <= busy <= own + 0.5, (busy, own)


def _latency_row(p99: float, machine: dict[str, float] | None) -> dict[str, object]:
    row: dict[str, object] = {
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": p99, "p99.9": p99 + 1},
        "errors": 0,
        "extra": {"achieved_rps": 1000.0},
    }
    if machine is not None:
        row["machine"] = machine
    return row


def test_the_summary_takes_medians_and_the_table_shows_them() -> None:
    sample = closed_loop_sample()
    data = {
        "scenarios": [{"key": "passthrough"}, {"key": "extproc"}],
        "rounds": [{"passthrough": sample, "extproc": sample}],
        "latency_rounds": [
            {
                "passthrough": _latency_row(2.0, {"busy": 0.5, "idle": 0.48, "steal": 0.02}),
                "extproc": _latency_row(3.0, {"busy": 0.6, "idle": 0.36, "steal": 0.04}),
            },
            {
                "passthrough": _latency_row(2.0, {"busy": 0.7, "idle": 0.2, "steal": 0.10}),
                "extproc": _latency_row(4.0, None),  # a sample from before the field
            },
        ],
    }
    summary = report.summarize(data)
    assert summary["passthrough"]["open_loop"]["machine"] == pytest.approx(
        {"busy": 0.6, "steal": 0.06}
    )
    assert summary["extproc"]["open_loop"]["machine"] == pytest.approx({"busy": 0.6, "steal": 0.04})
    assert summary["extproc"]["open_loop"]["added_p99_ms_rounds"] == [1.0, 2.0]  # per round
    settings = {"latency_rate": 1000.0, "latency_connections": 32}
    settings |= {"latency_rounds": 2, "latency_duration_s": 6.0}
    rows = [ln for ln in report._latency_table(settings, summary) if ln.startswith("| `")]
    assert rows[0].endswith("| 60 | 6.0 | 0 |")
    assert rows[1].endswith("| 60 | 4.0 | 0 |")
    del summary["extproc"]["open_loop"]["machine"]
    rows = [ln for ln in report._latency_table(settings, summary) if ln.startswith("| `")]
    assert rows[1].endswith("| - | - | 0 |")  # runs without the field: no figure


def test_the_latency_table_shows_the_middle_half_of_the_rounds() -> None:
    summary = {
        "extproc": {
            "open_loop": {
                "achieved_rps": 1000.0, "p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0,
                "added_p99_ms": 2.0, "errors": 0,
                "added_p99_ms_rounds": [1.0, 2.0, 3.0, 4.0, 100.0],
            }
        }
    }  # fmt: skip
    settings = {"latency_rate": 1000.0, "latency_connections": 32}
    settings |= {"latency_rounds": 5, "latency_duration_s": 6.0}
    [row] = [ln for ln in report._latency_table(settings, summary) if ln.startswith("| `")]
    assert "| 2.00 | 2.00-4.00 |" in row  # a stalled round moves neither quartile
    summary["extproc"]["open_loop"]["added_p99_ms_rounds"] = [1.0, 2.0, 3.0]
    [row] = [ln for ln in report._latency_table(settings, summary) if ln.startswith("| `")]
    assert "| 2.00 | - |" in row  # too few rounds for quartiles


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _config(root: Path, *options: str) -> None:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "proc/config.gz", "wt") as f:
        f.write("# comment\nCONFIG_NO_HZ=y\n" + "".join(f"{o}=y\n" for o in options))


def test_the_kernel_s_damon_threads_and_preemption_are_read(tmp_path: Path) -> None:
    damon = "sys/kernel/mm/damon/admin/kdamonds"
    root = _tree(
        tmp_path,
        {
            f"{damon}/nr_kdamonds": "2\n",
            f"{damon}/0/state": "on\n",
            f"{damon}/0/contexts/0/operations": "paddr\n",
            f"{damon}/0/contexts/0/monitoring_attrs/intervals/sample_us": "500000\n",
            f"{damon}/0/contexts/0/schemes/0/action": "pageout\n",
            f"{damon}/1/state": "off\n",
            "proc/cmdline": "console=ttyS0 quiet\n",
        },
    )
    _config(root, "CONFIG_PREEMPT_NONE", "CONFIG_PREEMPT_DYNAMIC")
    assert kernel_facts(root) == {
        "kernel preemption": "none (the build's default)",
        "kernel DAMON": "on (0: paddr, sampling every 500 ms, schemes pageout)",
    }
    (root / "proc/cmdline").write_text("quiet preempt=full\n")
    assert kernel_facts(root)["kernel preemption"] == "full (preempt= on the command line)"
    _tree(root, {"sys/kernel/debug/sched/preempt": "none voluntary (lazy) full\n"})
    assert kernel_facts(root)["kernel preemption"] == "lazy"  # what debugfs says runs
    (root / f"{damon}/0/state").write_text("off\n")
    assert kernel_facts(root)["kernel DAMON"] == "off"


def test_a_kernel_without_damon_or_its_config_says_so(tmp_path: Path) -> None:
    assert kernel_facts(tmp_path) == {
        "kernel preemption": "unknown",
        "kernel DAMON": "not in this kernel (or not exposed)",
    }
    _config(tmp_path, "CONFIG_PREEMPT")
    assert kernel_facts(tmp_path)["kernel preemption"] == "full"
