"""``python -m bench.run --baseline REV``: each extproc scenario gets a twin run from commit REV
in the same rounds, and the report compares the two round by round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import report
from bench.stack import REPO, baseline_tree, scenario, with_baseline
from extproc.testing.processes import SidecarProcess


def test_twins_follow_their_scenario_and_run_from_the_tree(tmp_path: Path) -> None:
    chosen = [scenario(k) for k in ("passthrough", "bare-fast", "extproc-jwt", "extproc-jwt-rl")]
    out = with_baseline(chosen, "abc1234", tmp_path)
    assert [s.key for s in out] == [
        "passthrough", "bare-fast",
        "extproc-jwt", "extproc-jwt-base",
        "extproc-jwt-rl", "extproc-jwt-rl-base",
    ]  # fmt: skip
    twin = out[-1]
    assert twin.source == tmp_path and twin.plugins == ("jwt", "rl") and "abc1234" in twin.title
    assert out[-2].source is None


def test_the_sidecar_imports_extproc_from_the_given_tree(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path / "c.yaml", source_root=tmp_path)
    assert sidecar.env["PYTHONPATH"].split(":")[0] == str(tmp_path)
    default = SidecarProcess(tmp_path / "c.yaml")
    assert default.env["PYTHONPATH"].split(":")[0] == str(REPO)


def test_the_baseline_tree_is_that_commit(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    sha, tree = baseline_tree("HEAD", tmp_path)
    assert sha == head
    committed = subprocess.run(
        ["git", "-C", str(REPO), "show", "HEAD:extproc/chain.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert (tree / "extproc" / "chain.py").read_text() == committed
    # and a sidecar given that tree imports extproc from it, not from this checkout
    env = SidecarProcess(tmp_path / "c.yaml", source_root=tree).env
    where = subprocess.run(
        [sys.executable, "-c", "import extproc.chain; print(extproc.chain.__file__)"],
        env=env, cwd="/", check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(tree), where


def _sample(rps: float, sidecar: float) -> dict[str, Any]:
    return {"rps": rps, "cpu_us": {"sidecar": sidecar}}


def test_the_report_compares_within_each_round() -> None:
    rounds = [
        {"extproc": _sample(1100, 500), "extproc-base": _sample(1000, 550)},
        {"extproc": _sample(500, 900), "extproc-base": _sample(400, 1000)},  # a slow round
        {"extproc": _sample(1050, 520), "extproc-base": _sample(1000, 540)},
    ]
    data = {
        "baseline": "abc1234",
        "rounds": rounds,
        "summary": {
            "extproc": {"rps": 1050, "cpu_us": {"sidecar": 520}},
            "extproc-base": {"rps": 1000, "cpu_us": {"sidecar": 550}},
        },
    }
    lines = report._baseline_table(data)
    assert any("`abc1234`" in line for line in lines)
    row = next(line for line in lines if line.startswith("| `extproc` "))
    # per-round ratios 1.10, 1.25, 1.05: the median, not the ratio of the medians (1.05)
    assert "| 1.100 |" in row and "1.10 1.25 1.05" in row
    assert report._baseline_table({**data, "baseline": None}) == []


def test_the_paired_table_compares_cpu_per_request_round_by_round() -> None:
    def p(us: float, errors: int = 0) -> dict[str, Any]:
        return {"sidecar_us": us, "errors": errors}

    def pair(key: str, us: float, ref: str, ref_us: float, ref_errors: int = 0) -> dict[str, Any]:
        return {f"{ref}|{key}": {key: p(us), ref: p(ref_us, ref_errors)}}

    data = {
        "baseline": "abc1234",
        "rounds": [],
        "summary": {},
        "paired": {
            "rate": 300.0,
            "duration_s": 4.0,
            "pairs": [["extproc-base", "extproc"], ["bare-fast", "extproc"]],
            "rounds": [
                {
                    **pair("extproc", 900, "extproc-base", 1000),
                    **pair("extproc", 900, "bare-fast", 800),
                },
                # a slow moment: both sides of each pair alike
                {
                    **pair("extproc", 1800, "extproc-base", 2000, 1),
                    **pair("extproc", 1900, "bare-fast", 1600),
                },
                {
                    **pair("extproc", 950, "extproc-base", 1000),
                    **pair("extproc", 880, "bare-fast", 800),
                },
            ],
        },
    }
    lines = report._paired_table(data)
    base = next(line for line in lines if line.startswith("| `extproc` | `extproc-base` "))
    assert "| 0.900 |" in base and "0.90 0.90 0.95" in base  # median of the per-round ratios
    assert base.endswith("| 1 |")  # errors of both sides
    bare = next(line for line in lines if line.startswith("| `extproc` | `bare-fast` "))
    assert "| 1.125 |" in bare and "1.12 1.19 1.10" in bare
    assert any("300 req/s each" in line for line in lines)
    assert report._paired_table({**data, "paired": None}) == []


def test_the_report_compares_the_open_loop_p99_round_by_round() -> None:
    def p99(ms: float) -> dict[str, Any]:
        return {"latency_ms": {"p99": ms}}

    data = {
        "baseline": "abc1234",
        "rounds": [],
        "summary": {"extproc": {"rps": 1.0, "cpu_us": {"sidecar": 1.0}}}
        | {"extproc-base": {"rps": 1.0, "cpu_us": {"sidecar": 1.0}}},
        "latency_rounds": [
            {"extproc": p99(2.5), "extproc-base": p99(3.0)},
            {"extproc": p99(9.0), "extproc-base": p99(3.2)},  # a stall in one round
            {"extproc": p99(2.9), "extproc-base": p99(3.1)},
        ],
    }
    lines = report._baseline_table(data)
    row = next(line for line in lines if line.startswith("| `extproc` | 2.90 "))
    # medians 2.90 / 3.10; differences -0.50, +5.80, -0.20: their median, and 2 of 3 lower
    assert row == "| `extproc` | 2.90 | 3.10 | -0.20 | 2 of 3 | -0.50 +5.80 -0.20 |"
    assert report._baseline_latency({**data, "latency_rounds": []}) == []


def test_the_pair_sends_in_swapped_order_every_other_round() -> None:
    from bench.run import paired_order

    orders = [paired_order("base", "new", n) for n in range(6)]
    assert orders[0] == ("base", "new") and orders[1] == ("new", "base")
    assert sum(o[0] == "new" for o in orders) == 3  # even rounds: each side first as often
