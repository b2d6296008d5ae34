"""Build a :class:`~extproc.context.PluginContext` with real services, for tests and benches."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from extproc.context import Clock, PluginContext, plugin_logger
from extproc.observability.metrics import PluginMetrics, Registry
from extproc.services.cache import MemoryCache
from extproc.services.http import HttpClient
from extproc.services.secrets import Secrets

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from extproc.services.cache import Cache

__all__ = ["make_plugin_context"]


def make_plugin_context(
    plugin_name: str,
    config: Any,
    *,
    redis: Redis | None = None,
    clock: Clock = time.monotonic,
    wall_clock: Clock = time.time,
    registry: Registry | None = None,
    http: HttpClient | None = None,
    cache: Cache | None = None,
) -> PluginContext:
    """A context with the real service implementations: a logger under
    ``extproc.plugin.<name>``, :class:`PluginMetrics` on ``registry`` (a fresh one unless
    given), a :class:`MemoryCache` on ``clock``, :class:`Secrets` from the environment and an
    :class:`HttpClient` (close it with ``await context.http.aclose()``)."""
    logger = plugin_logger(plugin_name)
    return PluginContext(
        plugin_name=plugin_name,
        config=config,
        logger=logger,
        metrics=PluginMetrics(registry if registry is not None else Registry(), plugin_name),
        cache=cache if cache is not None else MemoryCache(clock=clock),
        secrets=Secrets(),
        http=http if http is not None else HttpClient(clock=clock),
        redis=redis,
        clock=clock,
        wall_clock=wall_clock,
    )
