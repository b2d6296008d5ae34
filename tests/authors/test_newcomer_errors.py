"""The mistakes a plugin newcomer makes each get a message that names the plugin and the fix."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.config import parse_config
from extproc.plugin import ErrorEvent, Needs, Plugin, RequestEvent, Result
from extproc.registry import PluginLoadError, validate_plugin_class
from extproc.runtime import GenerationBuildError, Services, build_generation
from extproc.server import Server
from extproc.testing import EnvoyMode, FakeEnvoy
from extproc.testing.processes import free_port
from tests.authors.newcomer_plugins import (
    BrokenInitPlugin,
    ForgetfulPlugin,
    WrongReturnPlugin,
)

PATH = "tests.authors.newcomer_plugins"


# ------------------------------------------------------------ wrong return type


class _Recording(WrongReturnPlugin):
    def __init__(self) -> None:
        super().__init__(None)
        self.errors: list[ErrorEvent] = []

    async def on_error(self, event: ErrorEvent) -> None:
        self.errors.append(event)


@pytest.mark.parametrize(("path", "got"), [("/none", "NoneType"), ("/dict", "dict")])
async def test_wrong_return_type_names_the_plugin_and_the_results_to_use(
    caplog: pytest.LogCaptureFixture, path: str, got: str
) -> None:
    plugin = _Recording()
    envoy = FakeEnvoy.for_plugins([plugin])
    with caplog.at_level(logging.WARNING, logger="extproc.chain"):
        ex = await envoy.request(path=path)
        await asyncio.sleep(0)  # on_error runs in the background
    assert ex.status == 500  # fail closed, as configured by default
    [record] = [r for r in caplog.records if r.getMessage() == "plugin failed: bad_result"]
    assert record.plugin == "wrong_return"  # type: ignore[attr-defined]
    message = record.error  # type: ignore[attr-defined]
    assert f"plugin 'wrong_return' returned {got} from on_request" in message
    assert "return extproc.plugin.CONTINUE, Continue(...), Respond(...) or Reject(...)" in message
    assert [e.kind for e in plugin.errors] == ["bad_result"]


# ------------------------------------------------------------ blocking the event loop


@contextlib.asynccontextmanager
async def _server(config: Path) -> AsyncIterator[tuple[Server, str]]:
    port = free_port()
    from extproc.config import load_config

    server = Server(load_config(config), listen=f"127.0.0.1:{port}", admin="")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop()


async def test_blocking_call_is_blamed_on_the_plugin_by_the_watchdog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "server: {loop_lag_threshold_ms: 100, drain_delay_s: 0}\n"
        f"plugins:\n  - {{plugin: '{PATH}:SleepyPlugin', timeout_ms: 100, fail: open}}\n"
    )
    with caplog.at_level(logging.WARNING, logger="extproc.watchdog"):
        async with _server(config) as (server, target):
            envoy = FakeEnvoy.connect(target, EnvoyMode())
            try:
                ex = await envoy.request(path="/")
            finally:
                await envoy.aclose()
            for _ in range(100):
                if server.watchdog.last_stall is not None:
                    break
                await asyncio.sleep(0.02)
    assert ex.status == 200
    assert server.watchdog.last_stall is not None
    assert server.watchdog.last_stall[0] == "sleepy"
    [message] = [r.getMessage() for r in caplog.records if r.name == "extproc.watchdog"]
    assert "in plugin sleepy" in message
    assert "asyncio.to_thread" in message  # the fix


# ------------------------------------------------------------ phases


def test_forgotten_phase_is_warned_about_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extproc.registry"):
        validate_plugin_class(ForgetfulPlugin, "forgetful")
    messages = [r.getMessage() for r in caplog.records]
    assert any("'forgetful'" in m and "on_response" in m and "response_headers=True" in m
               for m in messages)  # fmt: skip


class _NoPhase(Plugin):
    name = "nophase"
    needs = Needs(request_headers=False)


class _SyncHook(Plugin):
    name = "synchook"

    def on_request(self, event: RequestEvent) -> Result:  # type: ignore[override]
        raise NotImplementedError


class _Future(Plugin):
    name = "future"
    api_version = "2"


@pytest.mark.parametrize(
    ("cls", "fix"),
    [
        (_NoPhase, "set `needs = Needs(...)`"),
        (_SyncHook, "on_request must be declared 'async def'"),
        (_Future, "upgrade the plugin or pin a matching extproc"),
    ],
)
def test_api_misuse_is_refused_at_load_time_with_the_fix(cls: type[Plugin], fix: str) -> None:
    with pytest.raises(PluginLoadError) as info:
        validate_plugin_class(cls, cls.name)
    assert repr(cls.name) in str(info.value)
    assert fix in str(info.value)


# ------------------------------------------------------------ initialize raising


async def test_raising_in_initialize_fails_the_config_load_naming_the_plugin() -> None:
    text = f"plugins:\n  - plugin: '{PATH}:BrokenInitPlugin'\n"
    loaded = parse_config(text, "extproc.yaml")
    services = Services()
    try:
        with pytest.raises(GenerationBuildError) as info:
            await build_generation(loaded, 1, services)
    finally:
        await services.aclose()
    message = str(info.value)
    assert message.startswith("plugin 'broken_init'")
    assert f"({PATH}:BrokenInitPlugin) failed to initialize" in message
    assert "RuntimeError: cannot read the signing key" in message
    assert BrokenInitPlugin.name == "broken_init"


def test_forgetful_plugin_is_still_loadable() -> None:
    # the forgotten phase is a warning, not an error: the plugin may mean it
    assert validate_plugin_class(ForgetfulPlugin, "forgetful") is ForgetfulPlugin
