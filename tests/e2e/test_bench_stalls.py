"""bench.stalls against the real perf: a busy process outside the benchmark's tree is seen
as stalls under its own name; a busy child of ours is not, even after it exited. Needs perf
and the right to trace every CPU (root here); fails loudly without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.stalls import Switches

REPO = Path(__file__).resolve().parents[2]

_BURN = (
    "import time; open('/proc/self/comm', 'w').write({name!r}); time.sleep({delay}); "
    "end = time.monotonic() + {seconds}; "
    "exec('while time.monotonic() < end: pass')"
)


def _burn(name: str, seconds: float, delay: float = 0.0) -> str:
    return _BURN.format(name=name, seconds=seconds, delay=delay)


def test_a_foreign_busy_process_is_seen_and_ours_is_not(tmp_path: Path) -> None:
    assert shutil.which("perf"), "perf is missing: apt-get install linux-perf"
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    assert os.geteuid() == 0 or paranoid == "-1", "perf cannot trace every CPU here"
    # started before the recording by a shell that exits at once: by the time perf looks,
    # the outsider belongs to init, as a machine's own daemons do
    code = _burn("stall-outsider", 0.6, delay=0.6)
    subprocess.run(["sh", "-c", f'{sys.executable} -c "{code}" >/dev/null 2>&1 &'], check=True)
    with Switches(tmp_path) as recording:
        subprocess.run([sys.executable, "-c", _burn("stall-ours", 0.3)], check=True)
        time.sleep(1.2)  # the outsider's delay and burn are over
    stalls = recording.stalls(0.0005)
    names = {s.comm for s in stalls}
    assert "stall-outsider" in names
    assert "stall-ours" not in names  # exited before the end: known by its fork
    burned = sum(s.seconds for s in stalls if s.comm == "stall-outsider")
    assert 0.2 < burned <= 0.7  # most of its 0.6 s, in runs of at least 0.5 ms each
    assert not list(tmp_path.glob("*.data"))  # the recording is removed


def test_perf_cost_runs_each_scenario_recorded_and_not(tmp_path: Path) -> None:
    """``--perf-cost`` for real, two rounds (both orders): the second table has a row per
    scenario with recorded / unrecorded figures, and the sidecar's CPU is read in both."""
    assert shutil.which("perf"), "perf is missing: apt-get install linux-perf"
    out = tmp_path / "stalls.md"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.stalls", "--scenarios", "extproc-h2", "--rate", "200",
            "--duration", "1", "--rounds", "2", "--perf-cost", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    cost = report.split("## What recording cost", 1)[1]
    rows = {ln.split("|")[1].strip(): ln for ln in cost.splitlines() if ln.startswith("| `")}
    assert set(rows) == {"`passthrough`", "`extproc-h2`"}
    cells = [c.strip() for c in rows["`extproc-h2`"].strip("|").split("|")]
    p99_on, p99_off = (float(v) for v in cells[2].split(" / "))
    assert 0 < p99_on < 1000 and 0 < p99_off < 1000
    sidecar_on, sidecar_off = (float(v) for v in cells[6].split(" / "))
    assert sidecar_on > 0 and sidecar_off > 0  # the sidecar's own CPU, in both runs
