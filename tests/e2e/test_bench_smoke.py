"""The benchmark harness end to end, in its tiny mode: real Envoy, the bare fast servicer and
an extproc sidecar, wrk and the open-loop generator; a table with no errors comes out.

wrk missing is a failure with the install hint, never a skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_produces_a_table_without_errors(tmp_path: Path) -> None:
    assert shutil.which("wrk"), (
        "wrk is needed by the benchmark: apt-get update && apt-get install -y wrk"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed < 60, f"smoke mode took {elapsed:.0f}s"

    table = (tmp_path / "latest.md").read_text()
    for key in ("passthrough", "bare-fast", "extproc"):
        assert f"(`{key}`)" in table
    assert (tmp_path / "latest.png").stat().st_size > 0

    data = json.loads((tmp_path / "latest.json").read_text())
    for key, row in data["summary"].items():
        assert row["errors"] == 0, (key, row)
        assert row["client_errors"] == 0, (key, row)
        assert row["rps"] > 0, (key, row)
        assert row["open_loop"]["errors"] == 0, (key, row)
    # the extproc sidecar ran as in production: sampled traces left it over OTLP
    spans = re.search(r"([\d,]+) spans received", data["notes"]["tracing"])
    assert spans and int(spans.group(1).replace(",", "")) > 0, data["notes"]
    # ratios within the round: the passthrough is the reference of itself
    assert data["summary"]["passthrough"]["vs_passthrough"] == pytest.approx(1.0)
    # every process the harness started is gone (their command lines name the run's folder)
    assert not _processes_mentioning(str(tmp_path))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found
