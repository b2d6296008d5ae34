"""What the server hands to plugins: services (:class:`PluginContext`) and the request-scoped
shared data (:class:`RequestContext`)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from extproc.observability.metrics import PluginMetrics
    from extproc.services.cache import Cache
    from extproc.services.http import HttpClient
    from extproc.services.secrets import Secrets

__all__ = [
    "AUTH_CLAIMS",
    "AUTH_SUBJECT",
    "Clock",
    "PluginContext",
    "RequestContext",
    "deadline",
    "time_left",
]


def plugin_logger(plugin_name: str) -> logging.LoggerAdapter[logging.Logger]:
    """The logger of :attr:`PluginContext.logger`: ``extproc.plugin.<name>``, keeping the
    ``extra={...}`` fields of each call (a plain :class:`logging.LoggerAdapter` replaces them
    with its own before Python 3.13, and structured logs would lose them)."""
    return _FieldsKept(logging.getLogger(f"extproc.plugin.{plugin_name}"), {})


class _FieldsKept(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = kwargs.get("extra")
        kwargs["extra"] = {**(self.extra or {}), **fields} if fields else self.extra
        return msg, kwargs


#: well-known request-context keys, set by the authentication plugin from verified claims only
AUTH_CLAIMS: Final = "auth.claims"
AUTH_SUBJECT: Final = "auth.subject"

Clock = Callable[[], float]

# The event-loop time by which the plugin being called must have answered: its own timeout cut
# to what is left of the message's budget. Set by the chain around every hook call.
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar(
    "extproc_deadline", default=math.inf
)


def deadline() -> float:
    """The running plugin's deadline in ``asyncio`` loop time (``math.inf`` outside a call).

    Compare it with ``loop.time()``; do not time durations with that clock: on uvloop (the
    sidecar's loop) it moves in whole milliseconds, once per loop turn. Use
    ``time.perf_counter()`` for a duration you report."""
    return _deadline.get()


def time_left(default: float = math.inf) -> float:
    """Seconds the running plugin has left to answer. Give a dependency call (Redis, HTTP) at
    most this long, and keep some of it to apply your own fallback before the chain's deadline
    applies the plugin's failure policy instead."""
    d = _deadline.get()
    if d == math.inf:
        return default
    return max(0.0, d - asyncio.get_running_loop().time())


class RequestContext(dict[str, Any]):
    """Data shared by every plugin and phase of one HTTP request (Kong's ``ctx.shared``).

    Keys are namespaced strings: ``auth.claims`` / ``auth.subject`` are set by the JWT plugin and
    read by the rate limiter; choose ``<plugin>.<name>`` for your own. It lives exactly as long as
    the request's ext_proc stream.
    """

    __slots__ = ()


@dataclass(slots=True)
class PluginContext:
    """Services injected into a plugin's ``initialize``.

    ``clock`` is a monotonic clock in seconds and ``wall_clock`` Unix time in seconds: use them
    (not ``time`` directly) so tests can inject time. ``redis`` is ``None`` when no Redis is
    configured.
    """

    plugin_name: str
    config: Any
    logger: logging.LoggerAdapter[logging.Logger]
    metrics: PluginMetrics
    cache: Cache
    secrets: Secrets
    http: HttpClient
    redis: Redis | None = None
    clock: Clock = time.monotonic
    wall_clock: Clock = time.time
    #: the number of worker processes sharing this configuration (1 unless ``--workers``)
    workers: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
