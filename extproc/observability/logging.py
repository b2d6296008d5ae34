"""Structured logs: one JSON object per line, with request id, trace id, plugin and phase.

Values of sensitive headers (``logging.sensitive_headers``) and anything that looks like a
bearer token are masked before a record is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

from extproc.config import LoggingSettings

__all__ = ["JsonFormatter", "configure_logging", "redact"]

_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_TOKENISH: Final = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9\-_=.+/]+|eyJ[A-Za-z0-9\-_]+\.[A-Za-z0-9\-_]+\.[A-Za-z0-9\-_]*"
)


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


def configure_logging(settings: LoggingSettings, stream: Any = None) -> None:
    """The one place that configures log output for the process."""
    from extproc.observability.tracing import TraceIdFilter

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceIdFilter())
    if settings.format == "json":
        handler.setFormatter(JsonFormatter(settings.sensitive_headers))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    logging.getLogger("extproc").setLevel(settings.level.upper())
    # watchfiles logs every batch of file events in the config's directory at info; the
    # reload that matters is logged by extproc.reload ("configuration file changed")
    debug = settings.level.upper() == "DEBUG"
    logging.getLogger("watchfiles").setLevel(logging.NOTSET if debug else logging.WARNING)
