"""PluginContext.logger keeps the ``extra`` fields of each call (structured logs)."""

from __future__ import annotations

import logging

import pytest

from extproc.context import plugin_logger


def test_a_plugins_log_call_keeps_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extproc.plugin.demo")
    log = plugin_logger("demo")
    log.info("with fields", extra={"user": "alice", "attempt": 2})
    log.info("without")
    first, second = caplog.records
    assert first.name == "extproc.plugin.demo"
    assert (first.user, first.attempt) == ("alice", 2)  # type: ignore[attr-defined]
    assert not hasattr(second, "user")
