"""Finding the token in a request, and checking its shape strictly before any crypto.

Sources: headers with an optional (case-insensitive) prefix such as ``Bearer``, query
parameters, cookies. A request that carries two different tokens, repeats a token header, or
has a header that does not parse as exactly one token is refused: we never guess which one the
client meant (the upstream might pick the other).

Shape: three base64url segments (RFC 7515 compact form) in the URL-safe alphabet, no padding,
canonical lengths and trailing bits (so that one signature has one spelling), under a size cap.
Header and payload must be JSON objects with no duplicate member names and no NaN/Infinity.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from extproc.plugin import Headers, HttpRequest

from .config import ProviderConfig

__all__ = [
    "Extractor",
    "FoundToken",
    "ParsedToken",
    "TokenError",
    "check_token_shape",
    "parse_token",
]

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: a final char of a segment whose length % 4 == 2 (resp. 3) must leave its low 4 (resp. 2)
#: bits zero, or two spellings decode to the same bytes
_LAST_OK_2: Final = frozenset(c for i, c in enumerate(_ALPHABET) if i % 16 == 0)
_LAST_OK_3: Final = frozenset(c for i, c in enumerate(_ALPHABET) if i % 4 == 0)
MAX_HEADER_SEGMENT: Final = 4096
#: deepest nesting of arrays and objects in a token's header or payload (claims are shallow;
#: past this the token is malformed, whatever the interpreter's own recursion limits allow)
MAX_JSON_DEPTH: Final = 32
_SEPARATOR: Final = re.compile(r"[ \t,;]")


class TokenError(Exception):
    """A token problem, with a reason code for access logs and a message safe for clients."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class FoundToken:
    token: str
    #: providers whose configured sources yielded this token
    providers: frozenset[str]
    #: headers the token came from (for ``forward: false``)
    headers: frozenset[str]


@dataclass(frozen=True, slots=True)
class ParsedToken:
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def check_token_shape(token: str, max_bytes: int) -> None:
    if len(token) > max_bytes:
        raise TokenError("too_large", "token is too large")
    if _TOKEN_RE.fullmatch(token) is None:
        raise TokenError("malformed", "token is malformed")
    for segment in token.split("."):
        rem = len(segment) % 4
        if rem == 1:
            raise TokenError("malformed", "token is malformed")
        if (rem == 2 and segment[-1] not in _LAST_OK_2) or (
            rem == 3 and segment[-1] not in _LAST_OK_3
        ):
            raise TokenError("malformed", "token is not canonically encoded")


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_object(data: bytes) -> dict[str, Any]:
    obj = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    _check_depth(obj)
    return obj


def _check_depth(root: dict[str, Any]) -> None:
    """Refuse nesting deeper than :data:`MAX_JSON_DEPTH` (iteratively: no recursion of our
    own). CPython 3.11's parser raises ``RecursionError`` at ~1,000 levels, 3.13's parses
    them: the limit is ours, so the answer is the same on every interpreter."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError("nested too deeply")
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))


def parse_token(token: str) -> ParsedToken:
    """Decode a token whose shape passed :func:`check_token_shape`. Nothing is verified."""
    header_b64, payload_b64, sig_b64 = token.split(".")
    if len(header_b64) > MAX_HEADER_SEGMENT:
        raise TokenError("malformed", "token header is too large")
    try:
        header = _load_object(_b64decode(header_b64))
    except (ValueError, RecursionError, binascii.Error, UnicodeDecodeError):
        raise TokenError("malformed", "token header is not a JSON object") from None
    try:
        payload = _load_object(_b64decode(payload_b64))
    except (ValueError, RecursionError, binascii.Error, UnicodeDecodeError):
        raise TokenError("malformed", "token payload is not a JSON object") from None
    try:
        signature = _b64decode(sig_b64)
    except (ValueError, binascii.Error):
        raise TokenError("malformed", "token signature is malformed") from None
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    return ParsedToken(header, payload, signing_input, signature)


# ------------------------------------------------------------------------- extraction


@dataclass(frozen=True, slots=True)
class _HeaderSource:
    header: str
    prefix: str  # lower-cased; "" for none
    provider: str


class Extractor:
    """Finds the one token of a request among the sources of the given providers."""

    def __init__(
        self,
        providers: dict[str, ProviderConfig],
        *,
        max_token_bytes: int,
        max_header_bytes: int,
    ) -> None:
        self.max_token_bytes = max_token_bytes
        self.max_header_bytes = max_header_bytes
        self._headers: list[_HeaderSource] = []
        self._params: dict[str, set[str]] = {}
        self._cookies: dict[str, set[str]] = {}
        for name, provider in providers.items():
            for h in provider.token_headers():
                self._headers.append(_HeaderSource(h.name, h.prefix.lower(), name))
            for p in provider.from_params:
                self._params.setdefault(p, set()).add(name)
            for c in provider.from_cookies:
                self._cookies.setdefault(c, set()).add(name)
        self.header_names: frozenset[str] = frozenset(s.header for s in self._headers)

    def extract(self, request: HttpRequest, allowed: frozenset[str]) -> FoundToken | None:
        """The token for one of ``allowed``; ``None`` when there is none. Raises
        :class:`TokenError` for ambiguity, oversize or a header that is not one token."""
        found: dict[str, tuple[set[str], set[str]]] = {}
        headers = request.headers
        for src in self._headers:
            if src.provider not in allowed:
                continue
            token = self._from_header(headers, src)
            if token is not None:
                providers, hdrs = found.setdefault(token, (set(), set()))
                providers.add(src.provider)
                hdrs.add(src.header)
        if self._params and request.query:
            for token, names in self._from_query(request.query, allowed):
                found.setdefault(token, (set(), set()))[0].update(names)
        if self._cookies and "cookie" in headers:
            for token, names in self._from_cookies(headers, allowed):
                found.setdefault(token, (set(), set()))[0].update(names)
        if not found:
            return None
        if len(found) > 1:
            raise TokenError("multiple_tokens", "more than one token in the request")
        token, (providers, hdrs) = next(iter(found.items()))
        if len(token) > self.max_token_bytes or not token.isascii():
            check_token_shape(token, self.max_token_bytes)  # raises
        # the full shape check waits for a cache miss (JwtAuthPlugin._verify): a cached token
        # passed it when it was verified
        return FoundToken(token, frozenset(providers), frozenset(hdrs))

    def _from_header(self, headers: Headers, src: _HeaderSource) -> str | None:
        values = headers.get_all(src.header)
        if len(values) != 1:
            if not values:
                return None
            raise TokenError("multiple_tokens", f"repeated {src.header} header")
        value = values[0]
        if len(value) > self.max_header_bytes:
            raise TokenError("too_large", "token header is too large")
        value = value.strip(" \t")
        if src.prefix:
            # lower-case the prefix's length only, not the whole token
            if value[: len(src.prefix)].lower() != src.prefix:
                if value.lower() == src.prefix.strip():
                    raise TokenError("malformed", f"{src.header} header has no token")
                return None  # another scheme (Basic ...): not ours
            value = value[len(src.prefix) :].strip(" \t")
            if not value:
                raise TokenError("malformed", f"{src.header} header has no token")
        if not value:
            return None
        if _SEPARATOR.search(value) is not None:
            raise TokenError("malformed", f"{src.header} header is not exactly one token")
        return value

    def _from_query(self, query: str, allowed: frozenset[str]) -> Iterable[tuple[str, set[str]]]:
        seen: dict[str, str] = {}
        for part in query.split("&"):
            raw_name, _, raw_value = part.partition("=")
            name = unquote(raw_name)
            names = self._params.get(name)
            if names is None:
                continue
            if len(raw_value) > self.max_header_bytes:
                raise TokenError("too_large", "token parameter is too large")
            if name in seen:
                raise TokenError("multiple_tokens", f"repeated {name} parameter")
            seen[name] = unquote(raw_value)
        for name, value in seen.items():
            names = self._params[name] & allowed
            if names and value:
                yield value, set(names)

    def _from_cookies(
        self, headers: Headers, allowed: frozenset[str]
    ) -> Iterable[tuple[str, set[str]]]:
        seen: dict[str, str] = {}
        for header_value in headers.get_all("cookie"):
            if len(header_value) > self.max_header_bytes * 4:
                raise TokenError("too_large", "cookie header is too large")
            for part in header_value.split(";"):
                name, _, value = part.strip().partition("=")
                if name not in self._cookies:
                    continue
                if name in seen:
                    raise TokenError("multiple_tokens", f"repeated {name} cookie")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                seen[name] = value
        for name, value in seen.items():
            names = self._cookies[name] & allowed
            if names and value:
                yield value, set(names)
