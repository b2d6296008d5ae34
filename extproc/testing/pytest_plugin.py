"""pytest fixtures for plugin authors, loaded automatically once extproc is installed.

* ``fake_envoy`` - a factory: ``async with fake_envoy(MyPlugin, {"key": "value"}) as envoy``
  builds the plugin from its config, initializes it with real services, and gives a
  :class:`~extproc.testing.fake_envoy.FakeEnvoy` that drives it in process (no sockets);
* ``extproc_stack`` - a factory: ``async with extproc_stack({"plugins": [...]}) as stack``
  starts an echo upstream, the sidecar (a real process) and a real Envoy configured by
  ``extproc envoy-config``; ``stack.http`` is an ``httpx.AsyncClient`` on Envoy's listener;
* ``extproc_redis`` - a real ``redis-server`` of the test's own, on a free port;
* ``manual_clock`` - a :class:`~extproc.testing.clock.ManualClock`.

The factories return async context managers, so they work with pytest-asyncio in strict and
in auto mode alike; whatever a test leaves running is stopped when the test ends. Disable the
plugin with ``-p no:extproc``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

from extproc.testing.clock import ManualClock

if TYPE_CHECKING:
    from extproc.context import Clock, PluginContext
    from extproc.plugin import Plugin
    from extproc.testing.fake_envoy import EnvoyMode, FakeEnvoy
    from extproc.testing.redis_server import RedisServer
    from extproc.testing.stack import LocalStack

__all__ = [
    "FakeEnvoySession",
    "StackFactory",
    "extproc_redis",
    "extproc_stack",
    "fake_envoy",
    "manual_clock",
    "write_config",
]


def write_config(config: Mapping[str, Any] | str | os.PathLike[str], directory: Path) -> Path:
    """A configuration file for ``config``: a path is used as is, YAML text or a mapping is
    written into ``directory``. A mapping gets ``version: 1`` and ``server.drain_delay_s: 0``
    unless it sets them (a test stack has no load balancer to drain)."""
    import yaml

    if isinstance(config, os.PathLike):
        return Path(config)
    if isinstance(config, str):
        if "\n" not in config and Path(config).is_file():
            return Path(config)
        text = config
    else:
        data = dict(config)
        data.setdefault("version", 1)
        server = dict(data.get("server") or {})
        server.setdefault("drain_delay_s", 0)
        data["server"] = server
        text = yaml.safe_dump(data, sort_keys=False)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"extproc-{len(list(directory.glob('extproc-*.yaml')))}.yaml"
    path.write_text(text)
    return path


class FakeEnvoySession:
    """One plugin built, initialized and wired behind a :class:`FakeEnvoy`.

    ``async with`` gives the FakeEnvoy; :attr:`plugin` and :attr:`context` are the instance
    and its :class:`~extproc.context.PluginContext` (for assertions on metrics or the cache).
    Leaving the block calls the plugin's ``shutdown`` and closes the context's HTTP client.
    """

    def __init__(
        self,
        plugin: type[Plugin] | Plugin,
        config: Mapping[str, Any] | None = None,
        *,
        mode: EnvoyMode | None = None,
        fail_open: bool = False,
        timeout: float = 1.0,
        redis: Any = None,
        clock: Clock | None = None,
    ) -> None:
        from extproc.plugin import Plugin

        if isinstance(plugin, Plugin):
            if config is not None:
                raise TypeError("give a plugin class with its config, or an instance alone")
            self.plugin = plugin
        else:
            self.plugin = plugin(plugin.Config.model_validate(dict(config or {})))
        self.mode = mode
        self.fail_open = fail_open
        self.timeout = timeout
        self.redis = redis
        self.clock = clock
        self._context: PluginContext | None = None
        self._envoy: FakeEnvoy | None = None

    @property
    def context(self) -> PluginContext:
        if self._context is None:
            raise RuntimeError("the session is not started: use `async with`")
        return self._context

    async def __aenter__(self) -> FakeEnvoy:
        from extproc.testing.context import make_plugin_context
        from extproc.testing.fake_envoy import FakeEnvoy

        name = type(self.plugin).name or type(self.plugin).__name__
        extra: dict[str, Any] = {}
        if self.clock is not None:
            extra["clock"] = self.clock
            if isinstance(self.clock, ManualClock):
                extra["wall_clock"] = self.clock.wall
        self._context = make_plugin_context(name, self.plugin.config, redis=self.redis, **extra)
        try:
            await self.plugin.initialize(self._context)
        except BaseException:
            await self._context.http.aclose()
            raise
        self._envoy = FakeEnvoy.for_plugins(
            [self.plugin], self.mode, timeout=self.timeout, fail_open=self.fail_open
        )
        return self._envoy

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.plugin.shutdown()
        finally:
            if self._envoy is not None:
                await self._envoy.aclose()
            if self._context is not None:
                await self._context.http.aclose()


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock that moves only with ``manual_clock.advance(seconds)``."""
    return ManualClock()


@pytest.fixture
def fake_envoy() -> Iterator[type[FakeEnvoySession]]:
    """``async with fake_envoy(PluginClass, config_dict, mode=..., clock=...) as envoy:``."""
    yield FakeEnvoySession


class StackFactory:
    """What the ``extproc_stack`` fixture gives: call it with a configuration to get a
    :class:`~extproc.testing.stack.LocalStack` to ``async with``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stacks: list[LocalStack] = []

    def __call__(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str],
        *,
        failure_mode_allow: bool = False,
        env: Mapping[str, str] | None = None,
        sidecar_args: Sequence[str] = ("--admin", ""),
    ) -> LocalStack:
        from extproc.testing.stack import LocalStack

        path = write_config(config, self.directory)
        stack = LocalStack(
            path,
            failure_mode_allow=failure_mode_allow,
            env=dict(os.environ, **(env or {})) if env is not None else None,
            sidecar_args=tuple(sidecar_args),
        )
        self.stacks.append(stack)
        return stack

    def close(self) -> None:
        # a stack left without `async with`: stop its processes (ours, by pid)
        for stack in self.stacks:
            if stack.envoy is not None:
                stack.envoy.stop()
            stack.sidecar.stop()


@pytest.fixture
def extproc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """``async with extproc_stack(config) as stack:`` - echo upstream + sidecar + real Envoy.

    ``config`` is a mapping (``{"plugins": [{"plugin": "my_plugin", "config": {...}}]}``), YAML
    text or a path. The plugins must be installed (entry points) or named ``module:Class``
    importable by the sidecar process.
    """
    factory = StackFactory(tmp_path_factory.mktemp("extproc-stack"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def extproc_redis() -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free port (``extproc_redis.url``), stopped after the test.

    A missing ``redis-server`` binary fails the test: it never skips."""
    from extproc.testing.redis_server import RedisServer

    server = RedisServer()
    with contextlib.closing(server):
        yield server
