"""Plugin discovery through the packaging entry-point group ``extproc.plugins``.

Built-in plugins register the same way a third-party package does (see ``pyproject.toml``);
nothing is found through import side effects.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from extproc.plugin import API_VERSION, Plugin, PluginConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginLoadError",
    "available_plugins",
    "resolve_plugin",
    "validate_plugin_class",
]

ENTRY_POINT_GROUP = "extproc.plugins"

log = logging.getLogger("extproc.registry")


class PluginLoadError(LookupError):
    """A plugin cannot be found or does not follow the plugin API."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_plugins() -> list[str]:
    return sorted(_entry_points())


def validate_plugin_class(cls: object, name: str) -> type[Plugin]:
    """Check the class against the plugin API and say how to fix what is wrong."""
    if not (inspect.isclass(cls) and issubclass(cls, Plugin)):
        raise PluginLoadError(
            f"plugin {name!r}: the entry point must name a class derived from "
            f"extproc.plugin.Plugin, got {cls!r}"
        )
    major = API_VERSION.split(".")[0]
    if str(cls.api_version).split(".")[0] != major:
        raise PluginLoadError(
            f"plugin {name!r} was written for plugin API {cls.api_version}, this extproc "
            f"provides {API_VERSION}: upgrade the plugin or pin a matching extproc"
        )
    if not (inspect.isclass(cls.Config) and issubclass(cls.Config, PluginConfig)):
        raise PluginLoadError(
            f"plugin {name!r}: Config must be a subclass of extproc.plugin.PluginConfig"
        )
    for hook in ("initialize", "on_request", "on_response", "on_error", "health_check", "shutdown"):
        if not inspect.iscoroutinefunction(getattr(cls, hook)):
            raise PluginLoadError(
                f"plugin {name!r}: {hook} must be declared 'async def' (it is awaited)"
            )
    if cls.needs.phases() == frozenset():
        raise PluginLoadError(
            f"plugin {name!r} declares no phase: set `needs = Needs(...)` on the class"
        )
    _warn_unreachable_hooks(cls, name)
    return cls


_HOOK_PHASES = {
    "on_request": (
        "request_headers=True, request_body=BodyMode.BUFFERED or request_trailers=True",
        True,
    ),
    "on_response": (
        "response_headers=True, response_body=BodyMode.BUFFERED or response_trailers=True",
        False,
    ),
}


def _warn_unreachable_hooks(cls: type[Plugin], name: str) -> None:
    """A hook overridden for phases the plugin never declares is never called: say so (a log
    line, not an error: ``needs_for`` may still enable the phase for some configurations)."""
    phases = cls.needs.phases()
    for hook, (fix, request_side) in _HOOK_PHASES.items():
        overridden = getattr(cls, hook) is not getattr(Plugin, hook)
        if overridden and not any(p.is_request is request_side for p in phases):
            declared = ", ".join(sorted(p.value for p in phases)) or "none"
            log.warning(
                "plugin %r overrides %s but declares no phase that calls it (declared: %s), so "
                "it will never run: add %s to its `needs = Needs(...)`",
                name,
                hook,
                declared,
                fix,
            )


def _import_path(name: str) -> type[Plugin]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except Exception as exc:
        raise PluginLoadError(f"plugin {name!r} cannot be imported: {exc!r}") from exc
    return validate_plugin_class(cls, name)


@cache
def resolve_plugin(name: str) -> type[Plugin]:
    """The plugin class registered under ``name``.

    ``module.path:ClassName`` names a class directly, without packaging: meant for a plugin
    under development and for tests; deployed plugins register an entry point.
    """
    if ":" in name:
        return _import_path(name)
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none"
        raise PluginLoadError(
            f"no plugin named {name!r} is installed (installed: {known}); a plugin registers "
            f"in the entry-point group {ENTRY_POINT_GROUP!r}"
        )
    try:
        cls = ep.load()
    except Exception as exc:
        raise PluginLoadError(f"plugin {name!r} failed to import: {exc!r}") from exc
    return validate_plugin_class(cls, name)
