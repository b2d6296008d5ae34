"""Pure claim checks (RFC 7519 section 4.1): no I/O, time passed in.

Every function raises :class:`~plugins.jwt_auth.extract.TokenError` with a reason code and a
client-safe message, or returns normally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .extract import TokenError

__all__ = [
    "ClaimsPolicy",
    "check_claims",
    "check_times",
    "claim_values",
    "missing_values",
]


@dataclass(frozen=True, slots=True)
class ClaimsPolicy:
    issuer: str
    audiences: frozenset[str]
    leeway: float = 60.0
    require_exp: bool = True
    max_lifetime: float | None = None
    require_email_verified: bool = False


def _numeric(payload: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim: a finite JSON number (not a boolean), or absent."""
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenError("malformed", f"claim {name} is not a number")
    return float(value)


def check_times(exp: float | None, nbf: float | None, now: float, leeway: float) -> None:
    """The time checks that must hold on every use, including cache hits."""
    if exp is not None and now >= exp + leeway:
        raise TokenError("expired", "token has expired")
    if nbf is not None and now + leeway < nbf:
        raise TokenError("not_yet_valid", "token is not valid yet")


def check_claims(payload: Mapping[str, Any], policy: ClaimsPolicy, now: float) -> None:
    """Issuer, audience, time and the optional extras. ``now`` is Unix time in seconds."""
    iss = payload.get("iss")
    if not isinstance(iss, str) or iss != policy.issuer:
        raise TokenError("wrong_issuer", "token issuer is not accepted")

    if policy.audiences:
        aud = payload.get("aud")
        if isinstance(aud, str):
            ok = aud in policy.audiences
        elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
            ok = any(a in policy.audiences for a in aud)
        else:
            ok = False
        if not ok:
            raise TokenError("wrong_audience", "token audience is not accepted")

    exp = _numeric(payload, "exp")
    nbf = _numeric(payload, "nbf")
    iat = _numeric(payload, "iat")
    if exp is None and policy.require_exp:
        raise TokenError("missing_exp", "token has no expiry")
    check_times(exp, nbf, now, policy.leeway)
    if iat is not None and iat > now + policy.leeway:
        raise TokenError("iat_future", "token is issued in the future")
    if policy.max_lifetime is not None:
        if exp is None:
            raise TokenError("missing_exp", "token has no expiry")
        start = iat if iat is not None else (nbf if nbf is not None else now)
        if exp - start > policy.max_lifetime:
            raise TokenError("lifetime_too_long", "token lifetime is too long")

    sub = payload.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise TokenError("malformed", "claim sub is not a string")

    if policy.require_email_verified:
        verified = payload.get("email_verified")
        if verified is not True and verified != "true":
            raise TokenError("email_unverified", "email address is not verified")


def claim_values(claims: Mapping[str, Any], path: str) -> frozenset[str]:
    """The string values of a claim: a space-separated string (OAuth ``scope``) or a list of
    strings; dots walk nested objects (``realm_access.roles``). Anything else is empty."""
    node: Any = claims
    if path in claims:
        node = claims[path]
    else:
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return frozenset()
            node = node[part]
    if isinstance(node, str):
        return frozenset(node.split())
    if isinstance(node, list):
        return frozenset(v for v in node if isinstance(v, str))
    return frozenset()


def missing_values(claims: Mapping[str, Any], path: str, required: Iterable[str]) -> list[str]:
    have = claim_values(claims, path)
    return [r for r in required if r not in have]
