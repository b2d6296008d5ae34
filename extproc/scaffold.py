"""``extproc new-plugin NAME``: a new plugin project that installs, loads and passes its tests.

The project is rendered from the templates in ``extproc/templates/plugin/``: a pyproject with
the ``extproc.plugins`` entry point, ``config.py`` (the schema) beside ``plugin.py`` (the
handler), unit tests through :class:`~extproc.testing.FakeEnvoy` and an end-to-end test through
a real Envoy. Placeholders are ``{{name}}``-style words, replaced in file contents and paths.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

__all__ = ["PluginNames", "ScaffoldError", "add_parser", "plugin_names", "render_plugin"]

_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_PLACEHOLDER: Final = re.compile(r"\{\{(\w+)\}\}")
_SUFFIX: Final = ".tmpl"


class ScaffoldError(ValueError):
    """The plugin name or the target directory cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class PluginNames:
    """Every spelling of a new plugin's name the templates need."""

    name: str  # my_plugin: the entry-point name and the `plugin:` key in the config
    package: str  # extproc_my_plugin: the import package
    dist: str  # extproc-my-plugin: the distribution name on PyPI
    class_prefix: str  # MyPlugin: MyPluginPlugin, MyPluginConfig
    header: str  # x-my-plugin: the header the generated plugin sets

    def mapping(self) -> dict[str, str]:
        return {
            "name": self.name,
            "package": self.package,
            "dist": self.dist,
            "class_prefix": self.class_prefix,
            "header": self.header,
        }


def plugin_names(raw: str) -> PluginNames:
    """Check a plugin name (``my_plugin`` or ``my-plugin``) and derive the other spellings."""
    name = raw.strip().lower().replace("-", "_")
    if name.startswith("extproc_"):
        name = name.removeprefix("extproc_")
    if not _NAME.match(name) or name.endswith("_") or "__" in name:
        raise ScaffoldError(
            f"plugin name {raw!r} is not usable: use 1-48 lower-case letters, digits and single "
            f"underscores, starting with a letter (e.g. 'api_keys')"
        )
    if keyword.iskeyword(name):
        raise ScaffoldError(f"plugin name {raw!r} is a Python keyword: choose another")
    class_prefix = "".join(part.capitalize() for part in name.split("_"))
    return PluginNames(
        name=name,
        package=f"extproc_{name}",
        dist=f"extproc-{name.replace('_', '-')}",
        class_prefix=class_prefix,
        header=f"x-{name.replace('_', '-')}",
    )


def _templates() -> Traversable:
    return files("extproc") / "templates" / "plugin"


def _substitute(text: str, values: dict[str, str], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ScaffoldError(f"template {where}: unknown placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def _walk(node: Traversable, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    out: list[tuple[tuple[str, ...], str]] = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            out.extend(_walk(child, (*prefix, child.name)))
        elif child.name.endswith(_SUFFIX):
            out.append(((*prefix, child.name), child.read_text(encoding="utf-8")))
    return out


def render_plugin(raw_name: str, parent: Path, *, check_installed: bool = True) -> Path:
    """Write the project for plugin ``raw_name`` into ``parent/<name>``; returns that path.

    Refuses a name an installed plugin already has (the entry points would clash) and a target
    directory that exists and is not empty: nothing is ever overwritten.
    """
    names = plugin_names(raw_name)
    if check_installed:
        from extproc.registry import available_plugins

        if names.name in available_plugins():
            raise ScaffoldError(
                f"a plugin named {names.name!r} is already installed: choose another name"
            )
    target = parent / names.name
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} already exists and is not empty: nothing was written")
    values = names.mapping()
    rendered: list[tuple[Path, str]] = []
    for parts, text in _walk(_templates()):
        where = "/".join(parts)
        rel = [_substitute(p, values, where) for p in parts]
        rel[-1] = rel[-1].removesuffix(_SUFFIX)
        rendered.append((target.joinpath(*rel), _substitute(text, values, where)))
    if not rendered:
        raise ScaffoldError("no templates found: is extproc installed with its package data?")
    for path, text in rendered:  # render everything first: a template error writes nothing
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def _cmd_new_plugin(args: argparse.Namespace) -> int:
    try:
        target = render_plugin(args.name, Path(args.directory))
    except ScaffoldError as exc:
        print(f"extproc new-plugin: {exc}", file=sys.stderr)
        return 2
    names = plugin_names(args.name)
    print(
        f"created {target} - plugin {names.name!r} (package {names.package})\n"
        f"next:\n"
        f"  cd {target}\n"
        f"  pip install -e .          # registers the plugin in the extproc.plugins group\n"
        f"  pytest                    # unit tests (FakeEnvoy) and one through a real Envoy\n"
        f"then use it in extproc.yaml as `- plugin: {names.name}` (see README.md)"
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``new-plugin`` on the ``extproc`` command line (``subparsers`` is the object
    ``ArgumentParser.add_subparsers()`` returned)."""
    p = subparsers.add_parser(
        "new-plugin",
        help="create a plugin project (package, config schema, tests) to start from",
        description=(
            "Create a plugin project that installs, loads and passes its tests: a package with"
            " a plugin class and its config schema, an entry point, and tests (FakeEnvoy and a"
            " real Envoy)."
        ),
    )
    p.add_argument("name", help="plugin name, e.g. api_keys (also the entry-point name)")
    p.add_argument(
        "-d",
        "--directory",
        default=".",
        help="where to create the project folder (default: the current directory)",
    )
    p.set_defaults(func=_cmd_new_plugin)
