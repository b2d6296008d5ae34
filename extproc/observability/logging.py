"""Structured logs: one JSON object per line, with request id, trace id, plugin and phase.

Values of sensitive headers (``logging.sensitive_headers``) and anything that looks like a
bearer token are masked before a record is written.
"""

from __future__ import annotations

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
    otherwise fine. Held-back records are not written (nor formatted) at all; the count of
    the last interval is lost if no record of that message comes after it."""

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
        #: (logger, level, format) -> [when it last passed, held back since]
        self._seen: dict[tuple[str, int, object], list[float]] = {}

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
                self._seen[key] = [now, 0]
                return True
            passed, held = seen
            if now - passed < self.interval:
                seen[1] = held + 1
                return False
            seen[0], seen[1] = now, 0
        if held:
            record.msg = (
                f"{record.getMessage()} ({int(held)} more like this in the last "
                f"{now - passed:.0f} s not logged)"
            )
            record.args = None
        return True


def configure_logging(settings: LoggingSettings, stream: Any = None) -> None:
    """The one place that configures log output for the process."""
    from extproc.observability.tracing import TraceIdFilter

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceIdFilter())
    # the OpenTelemetry SDK's own complaints (an unreachable collector): once a minute each
    handler.addFilter(RepeatThrottle())
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
