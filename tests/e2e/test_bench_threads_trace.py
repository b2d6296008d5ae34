"""bench.threads' wake-up trace against the real perf: a thread that wakes another through a
pipe is named as its waker, by the group ``read_threads`` gives it. Needs perf and the right to
trace every CPU (root here); fails loudly without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.threads import WOKEN, LoopTrace, _names, read_threads

#: the main thread blocks on a pipe; a thread named "waker" writes to it 40 times, 20 ms
#: apart, once told to go (on stdin: the trace is on by then)
_CHILD = """
import os, sys, threading, time
r, w = os.pipe()
def wake():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write("waker")
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(40):
        os.write(w, b"x")
        time.sleep(0.02)
    os.write(w, b"q")
threading.Thread(target=wake).start()
while os.read(r, 1) != b"q":
    pass
"""


def test_the_thread_that_wakes_the_loop_is_named(tmp_path: Path) -> None:
    assert shutil.which("perf"), "perf is missing: apt-get install linux-perf"
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    assert os.geteuid() == 0 or paranoid == "-1", "perf cannot trace every CPU here"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        trace = LoopTrace(tmp_path / "w.data", [child.pid], delay_s=0.0, span_s=5.0)
        trace.start()  # returns once perf's events are on (delay 0)
        names = _names(read_threads({child.pid: "me"}))
        assert "me: waker" in names.values()
        child.stdin.write("go\n")
        child.stdin.flush()
        counts = trace.finish(names)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == 0
    # each write wakes the reader, in the writer's context (a write while the reader is
    # still awake wakes nobody); other wakers (a timer, an interrupt) are rare for a read
    woken = {who: n for (kind, who), n in counts.items() if kind == WOKEN}
    assert 35 <= woken.get("me: waker", 0) <= 41, counts
    assert sum(woken.values()) - woken["me: waker"] <= 5, counts
