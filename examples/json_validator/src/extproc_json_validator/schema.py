"""The checks themselves: pure functions, no I/O, no plugin API (tested table-driven)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc_json_validator.config import Route

__all__ = ["Problem", "depth", "type_of", "validate"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a body: where (a JSON path such as ``$.items``) and what."""

    path: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "problem": self.problem}


def type_of(value: Any) -> str:
    """The JSON type name of a decoded value (``integer`` is also a ``number``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def depth(value: Any) -> int:
    """Nesting depth of objects and arrays (a scalar is 0, ``{}`` is 1); iterative."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest


def _accepts(allowed: str | tuple[str, ...], actual: str) -> bool:
    names = (allowed,) if isinstance(allowed, str) else allowed
    return actual in names or (actual == "integer" and "number" in names)


def validate(document: Any, route: Route, limit: int = 100) -> list[Problem]:
    """Check a decoded body against a route's schema; at most ``limit`` problems."""
    if not isinstance(document, Mapping):
        return [Problem("$", f"expected an object, got {type_of(document)}")]
    problems = [Problem(f"$.{f}", "required") for f in route.required if f not in document]
    for key, value in document.items():
        allowed = route.properties.get(key)
        if allowed is None:
            if not route.additional_properties:
                problems.append(Problem(f"$.{key}", "not allowed"))
        elif not _accepts(allowed, type_of(value)):
            want = allowed if isinstance(allowed, str) else " or ".join(allowed)
            problems.append(Problem(f"$.{key}", f"expected {want}, got {type_of(value)}"))
        if len(problems) >= limit:
            break
    return problems[:limit]
