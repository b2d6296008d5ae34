"""Claim checks, table-driven, with the time passed in."""

from __future__ import annotations

from typing import Any

import pytest

from plugins.jwt_auth.claims import ClaimsPolicy, check_claims, claim_values, missing_values
from plugins.jwt_auth.extract import TokenError

NOW = 1_000_000.0
POLICY = ClaimsPolicy(issuer="iss", audiences=frozenset({"api", "web"}), leeway=60)
GOOD: dict[str, Any] = {"iss": "iss", "aud": "api", "exp": NOW + 300, "iat": NOW, "nbf": NOW}


def with_(**kw: Any) -> dict[str, Any]:
    out = dict(GOOD)
    for k, v in kw.items():
        if v is ...:
            out.pop(k, None)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize(
    ("claims", "policy", "reason"),
    [
        (GOOD, POLICY, None),
        (with_(aud=["x", "web"]), POLICY, None),
        (with_(aud=[]), POLICY, "wrong_audience"),
        (with_(aud=["x", 1]), POLICY, "wrong_audience"),
        (with_(aud="x"), POLICY, "wrong_audience"),
        (with_(aud=...), ClaimsPolicy(issuer="iss", audiences=frozenset()), None),
        (with_(iss="ISS"), POLICY, "wrong_issuer"),
        (with_(iss=...), POLICY, "wrong_issuer"),
        (with_(iss=["iss"]), POLICY, "wrong_issuer"),
        (with_(exp=NOW - 59), POLICY, None),  # within leeway
        (with_(exp=NOW - 60), POLICY, "expired"),
        (with_(exp=...), POLICY, "missing_exp"),
        (
            with_(exp=...),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), require_exp=False),
            None,
        ),
        (with_(exp="1"), POLICY, "malformed"),
        (with_(exp=True), POLICY, "malformed"),
        (with_(exp=float("inf")), POLICY, "malformed"),
        (with_(nbf=NOW + 59), POLICY, None),
        (with_(nbf=NOW + 61), POLICY, "not_yet_valid"),
        (with_(iat=NOW + 61), POLICY, "iat_future"),
        (with_(iat="now"), POLICY, "malformed"),
        (
            with_(exp=NOW + 7200),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), max_lifetime=3600),
            "lifetime_too_long",
        ),
        (
            with_(exp=NOW + 3000),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), max_lifetime=3600),
            None,
        ),
        (
            with_(exp=NOW + 3000, iat=...),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), max_lifetime=3600),
            None,
        ),
        (
            with_(
                exp=...,
            ),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), require_exp=False, max_lifetime=10),
            "missing_exp",
        ),
        (with_(sub=5), POLICY, "malformed"),
        (
            GOOD,
            ClaimsPolicy(issuer="iss", audiences=frozenset(), require_email_verified=True),
            "email_unverified",
        ),
        (
            with_(email_verified=False),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), require_email_verified=True),
            "email_unverified",
        ),
        (
            with_(email_verified=True),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), require_email_verified=True),
            None,
        ),
        (
            with_(email_verified="true"),
            ClaimsPolicy(issuer="iss", audiences=frozenset(), require_email_verified=True),
            None,
        ),
    ],
)
def test_check_claims(claims: dict[str, Any], policy: ClaimsPolicy, reason: str | None) -> None:
    if reason is None:
        check_claims(claims, policy, NOW)
        return
    with pytest.raises(TokenError) as info:
        check_claims(claims, policy, NOW)
    assert info.value.reason == reason
    assert info.value.message and "{" not in info.value.message


@pytest.mark.parametrize(
    ("claims", "path", "values"),
    [
        ({"scope": "a b  c"}, "scope", {"a", "b", "c"}),
        ({"scope": ["a", 1, "b"]}, "scope", {"a", "b"}),
        ({"scope": 5}, "scope", set()),
        ({}, "scope", set()),
        ({"realm_access": {"roles": ["x"]}}, "realm_access.roles", {"x"}),
        ({"realm_access": ["x"]}, "realm_access.roles", set()),
        ({"a.b": "literal"}, "a.b", {"literal"}),
    ],
)
def test_claim_values(claims: dict[str, Any], path: str, values: set[str]) -> None:
    assert claim_values(claims, path) == values


def test_missing_values() -> None:
    assert missing_values({"scope": "a b"}, "scope", ["a", "c"]) == ["c"]
