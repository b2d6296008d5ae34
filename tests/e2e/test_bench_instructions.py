"""``python -m bench.instructions`` for real, under valgrind: a commit against itself gives the
same count to a fraction of a percent, which is the point of counting instructions on a
machine whose speed drifts. valgrind missing is a failure with the install hint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_head_against_itself_counts_the_same() -> None:
    hint = "valgrind is needed: apt-get update && apt-get install -y valgrind"
    assert shutil.which("valgrind"), hint
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.instructions",
            "--requests", "100", "--configs", "none", "--baseline", "HEAD",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    number = r"([\d,.]+)"
    row = re.search(
        rf"\| no plugins \(`extproc-h2`\) \| {number} \| {number} \| {number} \|", done.stdout
    )
    assert row, done.stdout
    here, base = (int(row.group(i).replace(",", "")) for i in (1, 2))
    # the whole stream path, HTTP/2 to plugin chain and back: far more than the switching
    assert 50_000 < here < 2_000_000
    assert abs(here - base) / base < 0.005, (here, base)
