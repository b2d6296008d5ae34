"""``python -m bench.run --profile SCENARIO``: py-spy on the scenario's sidecar under wrk load.

Writes ``profile-<scenario>.svg`` (flamegraph) and ``profile-<scenario>-top.txt`` (the
functions with the most samples, self and inclusive) to the results directory. py-spy samples
only while the process is busy (idle epoll waits are not counted), so the percentages are
shares of the sidecar's CPU time.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.load import open_loop, run_wrk
from bench.procs import ProcError
from bench.stack import Scenario, Stack
from bench.traffic import make_traffic

__all__ = ["profile", "top_functions"]

PY_SPY_HINT = ".venv/bin/pip install py-spy"


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which("py-spy")
    if not found:
        raise ProcError(f"py-spy is not installed: {PY_SPY_HINT}")
    return found


_LINE = re.compile(r":\d+\)$")


def top_functions(collapsed: str, limit: int = 40) -> str:
    """Self and inclusive sample shares per function from py-spy's ``--format raw`` output
    (``frame;frame;frame count`` lines; frames are ``function (file:line)``)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_LINE.sub(")", f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples (busy time only)", "", "self %   function (file)"]
    out += [f"{n / total:6.1%}  {f}" for f, n in own.most_common(limit)]
    out += ["", "inclusive %   function (file)"]
    out += [f"{n / total:6.1%}  {f}" for f, n in inclusive.most_common(limit)]
    return "\n".join(out) + "\n"


def profile(
    s: Scenario,
    out: Path,
    *,
    duration_s: float = 10.0,
    connections: int = 64,
    native: bool = False,
    rate: float | None = None,
) -> None:
    """Profile under wrk (saturation) or, with ``rate``, under the open-loop generator at
    ``rate`` requests/s (in a thread of this process: py-spy looks at the sidecar only)."""
    if not s.sidecar:
        raise SystemExit(f"{s.key} has no sidecar to profile")
    py_spy = _py_spy()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"profile-{s.key}-", dir=out))
    traffic = make_traffic(1000)
    script = traffic.write_wrk_script(work)
    with Stack([s], traffic, work / "stack") as stack:
        port = stack.port(s.key)
        run_wrk(port, script, duration_s=2, connections=connections)  # warm up
        pid = stack.sidecar_pids(s.key)[0]
        load_s = 2 * duration_s + 6
        if rate is None:
            load: Any = subprocess.Popen(
                [
                    "wrk", "-t", "1", "-c", str(connections), "-d", f"{round(load_s)}s",
                    "-s", str(script), f"http://127.0.0.1:{port}/",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        else:
            requests = [traffic.raw_request(i, f"127.0.0.1:{port}") for i in range(1000)]
            load = threading.Thread(
                target=open_loop,
                args=(port, requests),
                kwargs={"rate": rate, "duration_s": load_s, "connections": 32},
                daemon=True,
            )
            load.start()
        try:
            time.sleep(1)
            svg = out / f"profile-{s.key}.svg"
            raw = work / "profile.collapsed"
            common = ["record", "--pid", str(pid), "--duration", str(round(duration_s)),
                      "--rate", "250", "--subprocesses"]  # fmt: skip
            # --native walks C/Cython frames too (grpc's core, uvloop); it must pause the
            # process to do so, so it cannot be --nonblocking
            common += ["--native"] if native else ["--nonblocking"]
            for fmt, path in (("flamegraph", svg), ("raw", raw)):
                subprocess.run(
                    [py_spy, *common, "--format", fmt, "--output", str(path)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=duration_s + 30,
                )
        finally:
            if isinstance(load, subprocess.Popen):
                load.terminate()
                load.wait(10)
            else:
                load.join(load_s + 10)
    top = out / f"profile-{s.key}-top.txt"
    top.write_text(
        f"py-spy of {s.title} (`{s.key}`) under "
        + (f"wrk -c {connections}" if rate is None else f"an open loop at {rate:g} req/s")
        + "\n\n"
        + top_functions(raw.read_text())
    )
    print(top.read_text())
    print(f"written: {svg}, {top}")
