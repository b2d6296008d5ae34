"""The open-loop phase pauses the other scenarios' sidecars, and always resumes them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.run import others_paused


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _stopped(pid: int, want: bool) -> bool:
    """Whether the process reached the wanted state within a second (signals are async)."""
    for _ in range(100):
        if (_state(pid) == "T") == want:
            return True
        time.sleep(0.01)
    return False


class _Stack:
    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.running = dict.fromkeys(pids)
        self._pids = pids

    def sidecar_pids(self, key: str) -> list[int]:
        return self._pids[key]


def test_the_others_are_stopped_while_measuring_and_resumed_after() -> None:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in "ab"]
    try:
        stack: Any = _Stack({"measured": [procs[0].pid], "other": [procs[1].pid], "native": []})
        with pytest.raises(RuntimeError), others_paused(stack, "measured") as paused:
            assert paused == [procs[1].pid]
            assert _stopped(procs[1].pid, True)
            assert not _stopped(procs[0].pid, True)  # the measured one runs
            raise RuntimeError("the measurement failed")
        assert _stopped(procs[1].pid, False)  # resumed even so
    finally:
        for p in procs:
            p.kill()
            p.wait()
