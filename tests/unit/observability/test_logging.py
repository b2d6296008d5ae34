"""``configure_logging``: one JSON line per record, no third-party chatter at info, and the
OpenTelemetry SDK's repeated complaints throttled."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from extproc.config import LoggingSettings
from extproc.observability.logging import RepeatThrottle, configure_logging

_TOUCHED = ("", "extproc", "watchfiles", "httpx")


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
    logging.getLogger("httpx").info('HTTP Request: GET http://idp/jwks "HTTP/1.1 200 OK"')
    logging.getLogger("httpx").warning("a warning still passes")
    logging.getLogger("extproc.reload").info("configuration file changed", extra={"path": "/c"})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["logger"], r["msg"], r.get("path")) for r in lines] == [
        ("httpx", "a warning still passes", None),
        ("extproc.reload", "configuration file changed", "/c"),
    ]  # fmt: skip


@pytest.mark.usefixtures("restore_logging")
def test_watchfiles_speaks_at_debug() -> None:
    configure_logging(LoggingSettings(level="info", format="json"), stream=io.StringIO())
    out = io.StringIO()  # configured again (a reload) at debug
    configure_logging(LoggingSettings(level="debug", format="json"), stream=out)
    logging.getLogger("watchfiles.main").debug("rust notify timeout")
    assert json.loads(out.getvalue())["logger"] == "watchfiles.main"


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_an_unreachable_collector_is_reported_once_a_minute_with_a_count() -> None:
    clock = _Clock()
    throttle = RepeatThrottle(interval=60.0, clock=clock)
    retry = "Transient error %s encountered while exporting %s, retrying in %.2fs."
    name = "opentelemetry.exporter.otlp.proto.grpc.exporter"
    passed = []
    for i in range(100):  # the arguments differ; the message is the same
        clock.now += 1.0
        record = _record(name, retry, "UNAVAILABLE", "traces", 1 + i / 100)
        if throttle.filter(record):
            passed.append((clock.now, record.getMessage()))
    assert [t for t, _ in passed] == [1_001.0, 1_061.0]
    assert passed[0][1].endswith("retrying in 1.00s.")
    assert passed[1][1] == (
        "Transient error UNAVAILABLE encountered while exporting traces, retrying in 1.60s. "
        "(59 more like this in the last 60 s not logged)"
    )


def test_the_throttle_keeps_messages_levels_and_other_loggers_apart() -> None:
    clock = _Clock()
    throttle = RepeatThrottle(clock=clock)
    queue_full = _record("opentelemetry.sdk._shared_internal", "Queue full, dropping %s.", "span")
    assert throttle.filter(queue_full)
    assert not throttle.filter(
        _record("opentelemetry.sdk._shared_internal", "Queue full, dropping %s.", "span")
    )
    # another message, the same message at another level, another logger: each passes
    assert throttle.filter(
        _record("opentelemetry.sdk._shared_internal", "Exception while exporting %s.", "span")
    )
    assert throttle.filter(
        _record(
            "opentelemetry.sdk._shared_internal",
            "Queue full, dropping %s.",
            "span",
            level=logging.ERROR,
        )
    )
    assert throttle.filter(
        _record("opentelemetry.exporter.otlp", "Queue full, dropping %s.", "span")
    )
    # ours (and anything outside the prefix) is never held back
    for _ in range(3):
        assert throttle.filter(
            _record("extproc.server", "configuration refused; the running one stays")
        )
        assert throttle.filter(_record("opentelemetry_extra", "not the SDK"))


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_throttles_the_sdk_not_extproc() -> None:
    out = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=out)
    sdk = logging.getLogger("opentelemetry.sdk._shared_internal")
    for _ in range(50):
        sdk.warning("Queue full, dropping %s.", "span")
        logging.getLogger("extproc.server").warning("stream refused")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sum(r["logger"] == "extproc.server" for r in lines) == 50
    assert [r["msg"] for r in lines if r["logger"].startswith("opentelemetry")] == [
        "Queue full, dropping span."
    ]


def test_what_was_held_last_is_written_at_exit() -> None:
    """The count of a message's last interval is not lost when no later record comes: at the
    process's exit the last held record is written with it."""
    clock = _Clock()
    throttle = RepeatThrottle(interval=60.0, clock=clock)
    name = "opentelemetry.sdk._shared_internal"
    for i in range(5):
        clock.now += 1.0
        throttle.filter(_record(name, "Queue full, dropping %s %d.", "span", i))
    assert throttle.filter(_record(name, "Exception while exporting %s.", "span"))  # none held
    clock.now += 10.0
    (held,) = throttle.drain()
    assert held.name == name and held.levelno == logging.WARNING
    assert held.getMessage() == (
        "Queue full, dropping span 4. (3 more like this in the last 14 s not logged)"
    )
    assert throttle.filter(held)  # drained: the exit's record is not held back itself
    assert throttle.drain() == []
    for _ in range(2):  # arguments that do not fit the format are written as they are
        throttle.filter(_record(name, "Dropped %d spans.", "many"))
    (odd,) = throttle.drain()
    assert odd.getMessage() == "Dropped %d spans. ('many',)"


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_writes_the_held_count_at_exit() -> None:
    from extproc.observability import logging as extproc_logging

    out = io.StringIO()
    configure_logging(LoggingSettings(level="info", format="json"), stream=out)
    # (not the SDK's _shared_internal logger: once imported, it has a duplicate filter of its own)
    exporter = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
    for delay in (1, 2, 4):
        exporter.warning("Transient error %s, retrying in %ds.", "UNAVAILABLE", delay)
    extproc_logging._write_held()  # as atexit calls it
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["msg"] for r in lines] == [
        "Transient error UNAVAILABLE, retrying in 1s.",
        "Transient error UNAVAILABLE, retrying in 4s. (1 more like this in the last 0 s not "
        "logged)",
    ]
