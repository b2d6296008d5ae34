"""Plugin discovery and the API checks that give newcomers a clear message."""

from __future__ import annotations

import pytest

from extproc.plugin import Needs, Plugin, PluginConfig
from extproc.registry import PluginLoadError, resolve_plugin, validate_plugin_class


def test_builtins_are_found_through_entry_points() -> None:
    cls = resolve_plugin("headers")
    assert cls.name == "headers"
    assert cls.__module__ == "plugins.headers.plugin"


def test_unknown_plugin_lists_what_is_installed() -> None:
    with pytest.raises(PluginLoadError, match=r"installed: .*headers"):
        resolve_plugin("definitely_not_installed")


def test_import_path_that_does_not_import_is_explained() -> None:
    with pytest.raises(PluginLoadError, match="cannot be imported"):
        resolve_plugin("no.such.module:Thing")


class _SyncHook(Plugin):
    name = "sync"

    def on_request(self, event):  # type: ignore[no-untyped-def, override]
        return None


class _NoPhase(Plugin):
    name = "nophase"
    needs = Needs(request_headers=False)


class _OldApi(Plugin):
    name = "old"
    api_version = "0.9"


class _BadConfig(Plugin):
    name = "badcfg"
    Config = dict  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (object, "must name a class derived from extproc.plugin.Plugin"),
        (_SyncHook, "on_request must be declared 'async def'"),
        (_NoPhase, "declares no phase"),
        (_OldApi, "was written for plugin API 0.9"),
        (_BadConfig, "Config must be a subclass of extproc.plugin.PluginConfig"),
    ],
)
def test_newcomer_mistakes_get_a_message_naming_the_fix(cls: object, message: str) -> None:
    with pytest.raises(PluginLoadError, match=message):
        validate_plugin_class(cls, "mine")


def test_a_valid_plugin_passes() -> None:
    class Fine(Plugin):
        name = "fine"
        Config = PluginConfig

    assert validate_plugin_class(Fine, "fine") is Fine
