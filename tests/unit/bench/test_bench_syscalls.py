"""``bench.syscalls``: reading ``strace -c`` output and the per-request table."""

from __future__ import annotations

import pytest

from bench.syscalls import parse_strace_summary, table

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 61.20    0.012345          12      1200           epoll_pwait
 20.01    0.004036           6       600       300 read
 10.00    0.002017           3       600           write
  5.00    0.001008           1      3600           getpid
  3.79    0.000764           7       100        12 futex
  0.00    0.000000           0         2           newfstatat
------ ----------- ----------- --------- --------- ----------------
100.00    0.020170           3      6102       312 total
"""


def test_calls_by_syscall_without_the_total() -> None:
    assert parse_strace_summary(SUMMARY) == {
        "epoll_pwait": 1200,
        "read": 600,
        "write": 600,
        "getpid": 3600,
        "futex": 100,
        "newfstatat": 2,
    }
    assert parse_strace_summary("strace: Process 12 attached\n") == {}


def test_per_request_table() -> None:
    out = table([("extproc-h2", 300.0, parse_strace_summary(SUMMARY))])
    head, _, row = out.splitlines()
    assert head.split(" | ")[2:4] == ["all calls / request", "epoll_pwait"]
    assert row == ("| `extproc-h2` | 300 | 20.34 | 4.00 | 2.00 | 2.00 | 12.00 | 0.33 | 0.01 |")


def test_the_count_starts_once_strace_has_attached_to_every_process() -> None:
    """``await_attached`` reads strace's "Process N attached" lines, two in one write
    included, and returns once every pid is named; a tracer that ends first is an error."""
    import subprocess
    import sys

    from bench.syscalls import await_attached

    script = (
        "import sys, time; sys.stderr.write('strace: Process 5 attached\\n"
        "strace: Process 6 attached with 3 threads\\n'); sys.stderr.flush(); time.sleep(2)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True
    ) as tracer:
        await_attached(tracer, [5, 6], timeout=10)
        assert tracer.poll() is None  # returned on the lines, not when the tracer ended
        tracer.kill()
    with (
        subprocess.Popen(
            [sys.executable, "-c", script.replace("time.sleep(2)", "pass")],
            stderr=subprocess.PIPE,
            text=True,
        ) as tracer,
        pytest.raises(RuntimeError, match=r"did not attach to \[7\]"),
    ):
        await_attached(tracer, [7], timeout=10)
