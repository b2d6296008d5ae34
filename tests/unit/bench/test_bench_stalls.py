"""bench.stalls: foreign CPU runs read from perf's context switches, and requests split by
whether their span overlapped one."""

from __future__ import annotations

import pytest

from bench import report, stalls
from bench.stalls import Stall, parse_switches, split_tail
from tests.support.bench_samples import closed_loop_sample


def _switch(pid: int, cpu: int, t: float, prev: str, nxt: str, next_pid: int) -> str:
    return (
        f"{pid:>6}/{pid:<6} [{cpu:03d}] {t:.6f}: prev_comm={prev} prev_pid={pid} prev_prio=120 "
        f"prev_state=S ==> next_comm={nxt} next_pid={next_pid} next_prio=120"
    )


def test_a_foreign_run_is_a_stall_from_its_switch_in_to_its_switch_out() -> None:
    lines = [
        _switch(0, 0, 10.000000, "swapper/0", "kdamond.0", 107),  # idle -> kdamond
        _switch(107, 0, 10.004000, "kdamond.0", "python", 500),  # kdamond ran 4 ms
        _switch(500, 0, 10.004100, "python", "swapper/0", 0),  # ours: never a stall
        _switch(0, 1, 10.001000, "swapper/1", "1_scheduler", 77),  # first seen on cpu 1
        _switch(77, 1, 10.001200, "1_scheduler", "df", 88),  # 0.2 ms: under the minimum
        _switch(88, 1, 10.002000, "df", "swapper/1", 0),  # 0.8 ms
        "garbage line that perf would not print",
    ]
    stalls = parse_switches(lines, ours={500}, min_run=0.0005)
    assert stalls == [
        Stall(10.0, 10.004, 0, "kdamond.0", 107),
        Stall(10.0012, 10.002, 1, "df", 88),
    ]
    assert stalls[0].seconds == pytest.approx(0.004)


def test_the_first_switch_on_a_cpu_has_no_start_and_the_idle_task_is_not_foreign() -> None:
    lines = [
        _switch(107, 0, 10.004, "kdamond.0", "swapper/0", 0),  # its start was before the trace
        _switch(0, 0, 11.000, "swapper/0", "python", 500),  # idle for a second: not a stall
    ]
    assert parse_switches(lines, ours={500}, min_run=0.0005) == []


def test_a_command_name_with_spaces_is_read_whole() -> None:
    lines = [
        _switch(0, 0, 1.0, "swapper/0", "x", 9),
        _switch(9, 0, 1.01, "Web Content", "swapper/0", 0),
    ]
    (stall,) = parse_switches(lines, ours=set(), min_run=0.0005)
    assert stall.comm == "Web Content"


def test_requests_that_overlap_a_stall_are_left_out_of_the_clear_ones() -> None:
    stalls = [Stall(1.000, 1.004, 0, "kdamond.0", 107), Stall(2.000, 2.003, 1, "k", 2)]
    spans = [
        (0.990, 0.9905),  # before the first window
        (0.999, 1.0045),  # runs into it
        (1.002, 1.0050),  # sent during it
        (1.5, 2.5),  # a long one reaching over the second window, sent before later ones
        (1.6, 1.6004),  # after the first window, before the second: clear
        (2.0035, 2.004),  # after the second window closed
    ]
    every, clear = split_tail(spans, stalls)
    assert len(every) == 6
    assert sorted(clear) == pytest.approx(sorted([0.0005, 0.0004, 0.0005]))


def test_no_stalls_leaves_every_request_clear() -> None:
    every, clear = split_tail([(1.0, 1.001), (1.1, 1.102)], [])
    assert every == clear


def test_a_process_forked_by_one_of_ours_is_ours() -> None:
    lines = [
        "   500/500    [000] 1.000000: comm=python pid=500 child_comm=python child_pid=600",
        "   900/900    [000] 1.000100: comm=cron pid=900 child_comm=sh child_pid=901",
        _switch(0, 0, 1.001, "swapper/0", "python", 600),
        _switch(600, 0, 1.005, "python", "sh", 901),  # 4 ms of our child: not a stall
        _switch(901, 0, 1.009, "sh", "swapper/0", 0),  # 4 ms of cron's: a stall
    ]
    (stall,) = parse_switches(lines, ours={500}, min_run=0.0005)
    assert (stall.comm, stall.pid) == ("sh", 901)


def _stalled(p99: float, clear: float, who: dict[str, float]) -> dict[str, object]:
    figures = {"p99": p99, "p99_clear": clear, "overlapped": 0.01, "stalls_per_s": 2.0}
    figures |= {"stall_ms_per_s": 8.0, "longest_ms": 4.0, "who": who}
    return {
        "latency_ms": {"p50": 0.5, "p90": 0.6, "p99": p99, "p99.9": p99 + 2},
        "errors": 0,
        "extra": {"achieved_rps": 1000.0},
        "stalls": figures,
    }


def test_a_run_with_stalls_reports_the_clear_tail_and_whose_the_stalls_were() -> None:
    sample = closed_loop_sample()
    data = {
        "scenarios": [{"key": "passthrough"}, {"key": "extproc-jwt-rl-h2"}],
        "rounds": [{"passthrough": sample, "extproc-jwt-rl-h2": sample}],
        "latency_rounds": [
            {
                "passthrough": _stalled(0.3, 0.3, {"kdamond.0": 1.0}),
                "extproc-jwt-rl-h2": _stalled(2.6, 1.5, {"kdamond.0": 0.75, "df": 0.25}),
            },
            {
                "passthrough": _stalled(0.4, 0.3, {"kdamond.0": 1.0}),
                "extproc-jwt-rl-h2": _stalled(2.2, 1.1, {"kdamond.0": 1.0}),
            },
        ],
    }
    summary = report.summarize(data)
    ol = summary["extproc-jwt-rl-h2"]["open_loop"]
    assert ol["added_p99_clear_ms_rounds"] == pytest.approx([1.2, 0.8])  # less passthrough's
    assert ol["added_p99_clear_ms"] == pytest.approx(1.0)
    targets = {row["target"]: row["value"] for row in report.targets(summary, {})}
    clear_row = (
        "`extproc-jwt-rl-h2`: the same, requests clear of foreign CPU stalls (`--stalls`, ms)"
    )
    assert targets[clear_row] == pytest.approx(1.0)
    rows = [ln for ln in report._stalls_section(data) if ln.startswith("| `")]
    assert rows[0].startswith("| `passthrough` | 0.35 | 0.00 | 0.30 | 0.00 | 1.00% |")
    assert rows[1] == (
        "| `extproc-jwt-rl-h2` | 2.40 | 2.05 | 1.30 | 1.00 | 1.00% | 2.0 | 8.0 | 4.0 "
        "| kdamond.0 88%, df 12% |"
    )


def test_a_run_without_stalls_has_no_such_section_or_target() -> None:
    assert report._stalls_section({"latency_rounds": [{"passthrough": {"errors": 0}}]}) == []


def _costed(p50: float, p99: float, sidecar: float, plain: tuple[float, float, float]) -> dict:
    def one(p50: float, p99: float, sidecar: float) -> dict[str, object]:
        return {"p50": p50, "p99": p99, "cpu_us": {"sidecar": sidecar, "envoy": 50.0}}

    return one(p50, p99, sidecar) | {"unrecorded": one(*plain)}


def test_the_perf_cost_table_gives_recorded_and_unrecorded_and_the_rounds_differences() -> None:
    rounds = {
        "passthrough": [
            _costed(0.2, 0.4, 0.0, (0.2, 0.3, 0.0)),
            _costed(0.2, 0.5, 0.0, (0.2, 0.3, 0.0)),
        ],
        "extproc-h2": [
            _costed(0.5, 1.4, 110.0, (0.45, 1.0, 100.0)),
            _costed(0.6, 1.8, 130.0, (0.55, 1.6, 120.0)),
        ],
    }
    rows = [ln for ln in stalls.perf_cost_table(rounds).splitlines() if ln.startswith("| `")]
    # passthrough: p99 0.45 / 0.30 (medians), cost the median of 0.1 and 0.2
    assert (
        rows[0] == "| `passthrough` | 0.20 / 0.20 | 0.45 / 0.30 | +0.15 | - | - | 0 / 0 | 50 / 50 |"
    )
    # extproc-h2 added: recorded 1.0 and 1.3 (median 1.15), unrecorded 0.7 and 1.3 (1.0);
    # the added cost is the median of the rounds' own differences, 0.3 and 0.0
    assert rows[1] == (
        "| `extproc-h2` | 0.55 / 0.50 | 1.60 / 1.30 | +0.30 | 1.15 / 1.00 | +0.15 "
        "| 120 / 110 | 50 / 50 |"
    )


def test_without_unrecorded_twins_there_is_no_perf_cost_table() -> None:
    assert stalls.perf_cost_table({"passthrough": [{"p99": 0.3, "p50": 0.2}]}) == ""
    assert stalls.perf_cost_table({}) == ""


def test_the_recording_starts_on_perfs_ack_and_refuses_any_other_answer() -> None:
    """``Switches`` waits for perf's answer to ``enable`` on the acknowledgement pipe: "ack"
    (perf 6.1 adds a NUL after the newline) starts it; another answer, a closed pipe, or a
    perf that exited are errors, not a recording that silently misses the first forks."""
    import os

    from bench.stalls import Switches

    class Running:
        def poll(self) -> int | None:
            return None

    class Exited:
        def poll(self) -> int | None:
            return 1

    def answer(data: bytes | None, recorder: object = None) -> None:
        read, write = os.pipe()
        try:
            if data is not None:
                os.write(write, data)
            else:
                os.close(write)
                write = -1
            switches = Switches.__new__(Switches)
            switches._recorder = recorder or Running()  # type: ignore[assignment]
            switches._await_ack(read, timeout=0.2)
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)

    answer(b"ack\n\0")
    answer(b"ack\n")
    with pytest.raises(RuntimeError, match="nope"):
        answer(b"nope\n")
    with pytest.raises(EOFError):
        answer(None)
    with pytest.raises(TimeoutError):
        answer(b"ac")  # no newline within the timeout
    with pytest.raises(TimeoutError):
        answer(b"", Exited())
