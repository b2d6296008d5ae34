"""Collects the figures of every fault test (requests sent, by phase and status) and prints
them at the end of the run; with ``EXTPROC_FAULTS_FIGURES=path.json`` they are also written to
that file (the source of the figures in docs/reliability.md)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_FIGURES: dict[str, Any] = {}


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict the test fills; it is reported under the test's id."""
    entry: dict[str, Any] = {}
    _FIGURES[request.node.nodeid.rpartition("::")[2]] = entry
    return entry


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("fault figures")
    for name, data in _FIGURES.items():
        if not data:
            continue
        terminalreporter.write_line(f"{name}: {json.dumps(data, sort_keys=True)}")
    path = os.environ.get("EXTPROC_FAULTS_FIGURES")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(_FIGURES, fh, indent=1, sort_keys=True)
