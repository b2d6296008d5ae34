"""Generations: a configuration with its initialized plugins, pinned by the streams using it.

A reload builds and initializes the next generation *beside* the running one, swaps it in
atomically, and retires the old one once its last stream has ended (or a grace time passed),
calling every plugin's ``shutdown``. A configuration that fails to build leaves the running
generation in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from extproc.chain import Chain, Slot
from extproc.config import LoadedConfig, instance_name
from extproc.context import PluginContext, plugin_logger
from extproc.observability.metrics import PluginMetrics, Registry
from extproc.plugin import HealthState, HealthStatus, Plugin
from extproc.rollout import make_gate
from extproc.services.breaker import CircuitBreaker
from extproc.services.cache import MemoryCache
from extproc.services.http import HttpClient
from extproc.services.secrets import Secrets

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Generation", "GenerationBuildError", "Runtime", "Services"]

log = logging.getLogger("extproc.runtime")


class GenerationBuildError(Exception):
    """A plugin's ``initialize`` failed: the configuration cannot be served."""


@dataclass(slots=True)
class Services:
    """Process-wide services shared by every generation."""

    registry: Registry = field(default_factory=Registry)
    http: HttpClient = field(default_factory=HttpClient)
    secrets: Secrets = field(default_factory=Secrets)
    redis: Redis | None = None
    redis_key: str = ""
    workers: int = 1

    async def aclose(self) -> None:
        await self.http.aclose()
        if self.redis is not None:
            await self.redis.aclose()


@dataclass(slots=True)
class Generation:
    number: int
    loaded: LoadedConfig
    chain: Chain
    digests: dict[str, str]
    active: int = 0
    retired: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = field(default_factory=time.time)

    def pin(self) -> None:
        self.active += 1
        self.drained.clear()

    def release(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.drained.set()

    async def health(self) -> dict[str, HealthStatus]:
        out: dict[str, HealthStatus] = {}
        for slot in self.chain.slots:
            try:
                async with asyncio.timeout(1.0):
                    out[slot.name] = await slot.plugin.health_check()
            except Exception as exc:
                out[slot.name] = HealthStatus.unhealthy(
                    f"health check failed: {type(exc).__name__}"
                )
        return out

    async def shutdown(self, grace: float) -> None:
        """Wait (bounded) for the last stream, then shut every plugin down."""
        self.retired = True
        if self.active:
            try:
                async with asyncio.timeout(grace):
                    await self.drained.wait()
            except TimeoutError:
                log.warning(
                    "generation retired with streams still open",
                    extra={"generation": self.number, "streams": self.active},
                )
        for slot in self.chain.slots:
            try:
                async with asyncio.timeout(max(grace, 1.0)):
                    await slot.plugin.shutdown()
            except Exception:
                log.exception("plugin shutdown failed", extra={"plugin": slot.name})


async def build_generation(
    loaded: LoadedConfig,
    number: int,
    services: Services,
    previous: Generation | None = None,
    *,
    init_timeout: float = 30.0,
) -> Generation:
    """Instantiate and initialize every plugin of ``loaded``; hand state over from
    ``previous`` where a plugin's section is unchanged. Raises :class:`GenerationBuildError`
    (after shutting down what was already initialized) when a plugin cannot start."""
    slots: list[Slot] = []
    digests: dict[str, str] = {}
    old_plugins = previous.chain.plugins() if previous else {}
    old_breakers = {s.name: s.breaker for s in previous.chain.slots} if previous else {}
    started: list[Plugin] = []
    for index, (entry, cls, plugin_config) in enumerate(loaded.plugins):
        if not entry.enabled:
            continue
        name = instance_name(entry, cls)
        digest = loaded.section_digest(index)
        digests[name] = digest
        plugin = cls(plugin_config)
        unchanged = previous is not None and previous.digests.get(name) == digest
        if unchanged and name in old_plugins:
            try:
                plugin.take_over(old_plugins[name])
            except Exception:
                log.exception("state hand-over failed; starting fresh", extra={"plugin": name})
        context = PluginContext(
            plugin_name=name,
            config=plugin_config,
            logger=plugin_logger(name),
            metrics=PluginMetrics(services.registry, cls.name or name),
            cache=MemoryCache(),
            secrets=services.secrets,
            http=services.http,
            redis=services.redis,
            workers=services.workers,
        )
        try:
            async with asyncio.timeout(init_timeout):
                await plugin.initialize(context)
        except Exception as exc:
            for done in started:
                try:
                    await done.shutdown()
                except Exception:
                    log.exception("shutdown after a failed build")
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            )
            raise GenerationBuildError(
                f"plugin {name!r} ({entry.plugin}) failed to initialize: {reason}"
            ) from exc
        started.append(plugin)
        breaker = old_breakers.get(name) if unchanged else None
        slots.append(
            Slot(
                plugin=plugin,
                name=name,
                priority=entry.priority if entry.priority is not None else cls.priority,
                timeout=entry.timeout_ms / 1000,
                fail_open=entry.fail == "open",
                breaker=breaker
                or CircuitBreaker(
                    f"plugin:{name}",
                    failure_threshold=entry.breaker_failures,
                    reset_timeout=entry.breaker_reset_s,
                ),
                shadow=entry.shadow,
                needs=plugin.needs_for(plugin_config),
                isolate=not cls.cancellation_safe if entry.isolate is None else entry.isolate,
                gate=make_gate(entry.rollout, salt=name),
            )
        )
    chain = Chain(slots, budget=loaded.config.server.budget_s, registry=services.registry)
    return Generation(number, loaded, chain, digests)


class Runtime:
    """Owns the current generation and swaps it on reload."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.current: Generation | None = None
        self._next_number = 1
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_error = ""
        registry = services.registry
        self._reload_counter = registry.counter(
            "extproc_config_reloads_total", "configuration reloads", ("result",)
        )
        registry.gauge(
            "extproc_config_generation",
            "number of the configuration generation being served",
            lambda: [((), float(self.current.number if self.current else 0))],
        )
        registry.gauge(
            "extproc_active_streams",
            "ext_proc streams open, by generation",
            lambda: [((), float(sum(g.active for g in self._generations())))],
        )
        self._old: list[Generation] = []

    def _generations(self) -> list[Generation]:
        gens = [g for g in self._old if not g.drained.is_set() or g.active]
        if self.current:
            gens.append(self.current)
        return gens

    async def start(self, loaded: LoadedConfig) -> Generation:
        gen = await build_generation(loaded, self._next_number, self.services)
        self._next_number += 1
        self.current = gen
        return gen

    async def reload(self, loaded: LoadedConfig, grace: float) -> Generation:
        """Build ``loaded`` beside the running generation and swap it in. On failure the
        running generation stays and the error is raised."""
        async with self._lock:
            try:
                gen = await build_generation(loaded, self._next_number, self.services, self.current)
            except Exception as exc:
                self.reloads_failed += 1
                self.last_error = str(exc)
                self._reload_counter.labels("failed").inc()
                raise
            self._next_number += 1
            old, self.current = self.current, gen
            self.reloads_ok += 1
            self.last_error = ""
            self._reload_counter.labels("ok").inc()
            if old is not None:
                self._old.append(old)
                task = asyncio.ensure_future(self._retire(old, grace))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            return gen

    async def _retire(self, gen: Generation, grace: float) -> None:
        await gen.shutdown(grace)
        if gen in self._old:
            self._old.remove(gen)
        log.info("generation retired", extra={"generation": gen.number})

    async def shutdown(self, grace: float) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.current is not None:
            await self.current.shutdown(grace)

    async def health(self) -> tuple[HealthState, dict[str, HealthStatus]]:
        if self.current is None:
            return HealthState.UNHEALTHY, {}
        per_plugin = await self.current.health()
        states = {s.state for s in per_plugin.values()}
        if HealthState.UNHEALTHY in states:
            return HealthState.UNHEALTHY, per_plugin
        if HealthState.DEGRADED in states:
            return HealthState.DEGRADED, per_plugin
        return HealthState.HEALTHY, per_plugin

    def status(self) -> dict[str, Any]:
        gen = self.current
        return {
            "generation": gen.number if gen else 0,
            "config_digest": gen.loaded.digest if gen else None,
            "config_source": gen.loaded.source if gen else None,
            "reloads": {"ok": self.reloads_ok, "failed": self.reloads_failed},
            "last_reload_error": self.last_error or None,
            "active_streams": sum(g.active for g in self._generations()),
            "plugins": [
                {
                    "name": s.name,
                    "plugin": type(s.plugin).name,
                    "version": type(s.plugin).version,
                    "priority": s.priority,
                    "phases": sorted(p.value for p in s.phases),
                    "fail": "open" if s.fail_open else "closed",
                    "shadow": s.shadow,
                    "breaker": s.breaker.state.value,
                    "metrics": dict(s.plugin.metrics()),
                }
                for s in (gen.chain.slots if gen else ())
            ],
        }
