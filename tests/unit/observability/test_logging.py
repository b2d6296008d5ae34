"""``configure_logging``: one JSON line per record, and no third-party chatter at info."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from extproc.config import LoggingSettings
from extproc.observability.logging import configure_logging

_TOUCHED = ("", "extproc", "watchfiles")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers = root.handlers[:]
    levels = {name: logging.getLogger(name).level for name in _TOUCHED}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_and_watchfiles_quiet_at_info() -> None:
    out = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=out)
    logging.getLogger("watchfiles.main").info("1 change detected")
    logging.getLogger("extproc.reload").info("configuration file changed", extra={"path": "/c"})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["logger"], r["msg"], r.get("path")) for r in lines] == [
        ("extproc.reload", "configuration file changed", "/c"),
    ]  # fmt: skip


@pytest.mark.usefixtures("restore_logging")
def test_watchfiles_speaks_at_debug() -> None:
    configure_logging(LoggingSettings(level="info", format="json"), stream=io.StringIO())
    out = io.StringIO()  # configured again (a reload) at debug
    configure_logging(LoggingSettings(level="debug", format="json"), stream=out)
    logging.getLogger("watchfiles.main").debug("rust notify timeout")
    assert json.loads(out.getvalue())["logger"] == "watchfiles.main"
