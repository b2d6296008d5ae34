"""Structured logs: one JSON object per line, with request id, trace id, plugin and phase.

Values of sensitive headers (``logging.sensitive_headers``) and anything that looks like a
bearer token are masked before a record is written.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from extproc.config import LoggingSettings

__all__ = ["JsonFormatter", "RepeatThrottle", "configure_logging", "redact"]

_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_TOKENISH: Final = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9\-_=.+/]+|eyJ[A-Za-z0-9\-_]+\.[A-Za-z0-9\-_]+\.[A-Za-z0-9\-_]*"
)


#: libraries that log routine work at info
_CHATTY: Final = ("watchfiles", "httpx")


def redact(text: str) -> str:
    """Mask bearer tokens and JWT-shaped strings."""
    return _TOKENISH.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, sensitive_headers: Iterable[str] = ()) -> None:
        super().__init__()
        self.sensitive = frozenset(h.lower() for h in sensitive_headers)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            out[key] = self._clean(key, value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)

    def _clean(self, key: str, value: Any) -> Any:
        if key.lower() in self.sensitive:
            return "[redacted]"
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(key, v) for v in value]
        return value


class RepeatThrottle(logging.Filter):
    """Lets a message through at most once per ``interval`` seconds; the next one that passes
    says how many were held back meanwhile. A message is its logger, level and format string
    (not its arguments: "retrying in 1.09s" and "retrying in 0.87s" are one message).

    Only for records of loggers under ``prefix``: the OpenTelemetry SDK's. With the collector
    unreachable its exporter logs a warning per retry and an error per batch, and its batch
    processor, once its queue is full, a warning per span it drops: with every stream traced
    at a thousand requests a second, a thousand lines a second from a sidecar that is
    otherwise fine. Held-back records are not written (nor formatted) at all. The count of a
    message's last interval comes with the next record of it that passes or, when none comes
    before the process ends, at its exit (:meth:`drain`)."""

    def __init__(
        self,
        prefix: str = "opentelemetry",
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        #: (logger, level, format) -> [when it last passed, held back since, the last held]
        self._seen: dict[tuple[str, int, object], list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not (name == self.prefix or name.startswith(self.prefix + ".")):
            return True
        key = (name, record.levelno, record.msg)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= 1_000:  # messages with varying formats: forget the old
                    self._seen.clear()
                self._seen[key] = [now, 0, None]
                return True
            passed, held, _ = seen
            if now - passed < self.interval:
                seen[1] = held + 1
                seen[2] = record
                return False
            seen[0], seen[1], seen[2] = now, 0, None
        if held:
            record.msg = (
                f"{record.getMessage()} ({int(held)} more like this in the last "
                f"{now - passed:.0f} s not logged)"
            )
            record.args = None
        return True

    def drain(self) -> list[logging.LogRecord]:
        """For each message with records held back since it last passed: the last of them,
        saying how many more there were. What is drained is forgotten, so these records pass
        this filter (as a message seen for the first time)."""
        now = self._clock()
        out = []
        with self._lock:
            for key, (passed, held, last) in list(self._seen.items()):
                if not held:
                    continue
                del self._seen[key]
                record = logging.makeLogRecord(vars(last))
                try:
                    record.msg = record.getMessage()
                except Exception:  # arguments that do not fit the format: logged as they are
                    record.msg = f"{record.msg} {record.args!r}"
                if held > 1:
                    record.msg += (
                        f" ({int(held) - 1} more like this in the last {now - passed:.0f} s "
                        "not logged)"
                    )
                record.args = None
                out.append(record)
        return out


#: the handler and throttle of the last :func:`configure_logging`, for the exit
_AT_EXIT: list[tuple[logging.Handler, RepeatThrottle]] = []


def _write_held() -> None:
    """At exit (before logging's own shutdown, registered earlier): what the throttle held."""
    for handler, throttle in _AT_EXIT:
        for record in throttle.drain():
            handler.handle(record)


def configure_logging(settings: LoggingSettings, stream: Any = None) -> None:
    """The one place that configures log output for the process."""
    from extproc.observability.tracing import TraceIdFilter

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceIdFilter())
    # the OpenTelemetry SDK's own complaints (an unreachable collector): once a minute each
    throttle = RepeatThrottle()
    handler.addFilter(throttle)
    if not _AT_EXIT:
        atexit.register(_write_held)
    _AT_EXIT[:] = [(handler, throttle)]
    if settings.format == "json":
        handler.setFormatter(JsonFormatter(settings.sensitive_headers))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    logging.getLogger("extproc").setLevel(settings.level.upper())
    # Chatter at info from libraries, quiet unless at debug: watchfiles logs every batch of
    # file events in the config's directory (the reload that matters is logged by
    # extproc.reload, "configuration file changed"); httpx logs every request it sends, and a
    # plugin that calls a service per request through the HTTP client would log a line per
    # request (its failures reach the plugin as typed errors, and its breaker has metrics)
    debug = settings.level.upper() == "DEBUG"
    for chatty in _CHATTY:
        logging.getLogger(chatty).setLevel(logging.NOTSET if debug else logging.WARNING)
