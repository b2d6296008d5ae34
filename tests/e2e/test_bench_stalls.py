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
