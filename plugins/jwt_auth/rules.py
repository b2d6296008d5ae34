"""Route rules: which requirement applies to a request, decided so that path tricks cannot
reach a protected route through a looser rule.

Envoy normalises paths (when configured to), but a matcher in front of every route must not
rely on that alone. We compute every *reading* of the path a server behind us might plausibly
use — percent-decoded once (and twice), backslashes as slashes, ``;params`` stripped or kept,
dot segments resolved, slashes merged, trailing slash dropped, lower-cased — match each reading
(first matching rule wins, as in Envoy), and apply the **strictest** of the rules found. So
``/public/../admin``, ``//admin``, ``/public%2F..%2Fadmin``, ``/public/..;/admin`` and ``/ADMIN``
all get at least the ``/admin`` rule. Paths no sane server accepts (control characters, encoded
NUL, broken %-escapes, not starting with ``/``) raise :class:`BadPathError`, answered with 400.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .config import Requirement, Rule

__all__ = ["BadPathError", "CompiledRule", "RuleSet", "path_readings"]

MAX_PATH: Final = 8192
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_SLOW_CHARS: Final = frozenset("%\\;")


class BadPathError(ValueError):
    """The path is malformed beyond any reasonable reading."""


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _has_control(s: str) -> bool:
    return _CONTROL.search(s) is not None


def _percent_decode(s: str) -> str | None:
    """Decode %XX escapes once (UTF-8, undecodable bytes kept as surrogates). ``None`` when an
    escape is broken."""
    if "%" not in s:
        return s
    out = bytearray()
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "%":
            h = s[i + 1 : i + 3]
            if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                return None
            out.append(int(h, 16))
            i += 3
        else:
            out += c.encode("utf-8", "surrogateescape")
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _resolve(path: str, strip_params: bool) -> str:
    """Merge slashes, optionally drop ``;params`` from each segment, resolve dot segments
    (clamped at the root, RFC 3986 section 5.2.4)."""
    stack: list[str] = []
    segments = path.split("/")
    trailing = False
    for raw_seg in segments:
        seg = raw_seg.split(";", 1)[0] if strip_params else raw_seg
        if seg in ("", "."):
            trailing = True
            continue
        if seg == "..":
            if stack:
                stack.pop()
            trailing = True
            continue
        stack.append(seg)
        trailing = False
    out = "/" + "/".join(stack)
    if trailing and stack:
        out += "/"
    return out


def path_readings(raw: str) -> tuple[str, ...]:
    """Every reading of ``raw`` (a path without query) a server might use, de-duplicated."""
    if raw == "*":
        return ("*",)
    if not raw.startswith("/") or len(raw) > MAX_PATH or _has_control(raw):
        raise BadPathError("malformed path")
    readings: list[str] = []
    if not (_SLOW_CHARS.intersection(raw) or "//" in raw or "/." in raw):
        if not raw.endswith("/") and raw.lower() == raw:
            return (raw,)  # the common case: one reading
        readings.append(raw)
    else:
        decoded = _percent_decode(raw)
        if decoded is None or _has_control(decoded):
            raise BadPathError("malformed path")
        bases = [raw, decoded]
        twice = _percent_decode(decoded) if "%" in decoded else None
        if twice is not None and not _has_control(twice):
            bases.append(twice)
        for base in bases:
            slashed = base.replace("\\", "/")
            for strip in (True, False):
                readings.append(_resolve(slashed, strip))
    more: list[str] = []
    for r in readings:
        if len(r) > 1 and r.endswith("/"):
            more.append(r.rstrip("/") or "/")
    readings += more
    readings += [r.lower() for r in readings]
    return tuple(dict.fromkeys(readings))


@dataclass(frozen=True, slots=True)
class CompiledRule:
    index: int
    requirement: Requirement
    providers: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    prefix: str | None = None
    exact: str | None = None
    regex: re.Pattern[str] | None = None
    methods: frozenset[str] = frozenset()
    case_sensitive: bool = True
    provider_set: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "provider_set", frozenset(self.providers))

    @property
    def level(self) -> int:
        """3 = a token is required, 2 = allow missing, 1 = allow missing or failed."""
        if self.requirement.allow_missing_or_failed:
            return 1
        if self.requirement.allow_missing:
            return 2
        return 3

    @property
    def strictness(self) -> tuple[int, int, int, int]:
        authz = len(self.scopes) + len(self.roles) + len(self.groups)
        return (self.level, authz, -len(self.providers), -self.index)

    @property
    def has_authz(self) -> bool:
        return bool(self.scopes or self.roles or self.groups)

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        subject = path if self.case_sensitive else path.lower()
        if self.prefix is not None:
            return subject.startswith(self.prefix)
        if self.exact is not None:
            return subject == self.exact
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return True  # the default rule


def compile_rule(index: int, rule: Rule, all_providers: Sequence[str]) -> CompiledRule:
    m = rule.match

    def fold(v: str | None) -> str | None:
        return v if v is None or m.case_sensitive else v.lower()

    return CompiledRule(
        index=index,
        requirement=rule.requires,
        providers=tuple(rule.requires.provider_names(list(all_providers))),
        scopes=tuple(rule.scopes),
        roles=tuple(rule.roles),
        groups=tuple(rule.groups),
        prefix=fold(m.prefix),
        exact=fold(m.path),
        regex=(
            re.compile(m.regex, 0 if m.case_sensitive else re.IGNORECASE)
            if m.regex is not None
            else None
        ),
        methods=frozenset(m.methods),
        case_sensitive=m.case_sensitive,
    )


_MEMO_SIZE = 8192


class RuleSet:
    """Rules compiled once per configuration; :meth:`match` is the per-request call."""

    def __init__(
        self, rules: Sequence[Rule], default: Requirement, all_providers: Sequence[str]
    ) -> None:
        self.rules = tuple(compile_rule(i, r, all_providers) for i, r in enumerate(rules))
        self.default = CompiledRule(
            index=len(self.rules),
            requirement=default,
            providers=tuple(default.provider_names(list(all_providers))),
        )
        self._memo: dict[tuple[str, str], CompiledRule | BadPathError] = {}

    def match_reading(self, method: str, path: str) -> CompiledRule:
        for rule in self.rules:
            if rule.matches(method, path):
                return rule
        return self.default

    def match(self, method: str, raw_path: str) -> CompiledRule:
        """The rule for a request: the strictest over all readings of the path. Raises
        :class:`BadPathError` for malformed paths.

        Decisions are memoised per (method, path): APIs see the same few thousand paths over
        and over, and normalising every reading costs more than the token check. The memo is
        bounded (cleared when full), so a flood of distinct paths costs memory only up to it.
        """
        key = (method, raw_path)
        hit = self._memo.get(key)
        if hit is not None:
            if isinstance(hit, BadPathError):
                raise hit
            return hit
        try:
            decided: CompiledRule | BadPathError = self._match(method, raw_path)
        except BadPathError as exc:
            decided = exc
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = decided
        if isinstance(decided, BadPathError):
            raise decided
        return decided

    def _match(self, method: str, raw_path: str) -> CompiledRule:
        method = method.upper()
        readings = path_readings(raw_path)
        best = self.match_reading(method, readings[0])
        for reading in readings[1:]:
            rule = self.match_reading(method, reading)
            if rule is not best and rule.strictness > best.strictness:
                best = rule
        return best
