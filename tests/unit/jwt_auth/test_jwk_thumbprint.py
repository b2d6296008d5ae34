"""The key thumbprint the token cache remembers a verified token's key by (RFC 7638)."""

from __future__ import annotations

import pytest

from extproc.testing.jwt import make_ec_key, make_rsa_key
from plugins.jwt_auth.jwks import jwk_thumbprint, parse_jwks

#: the example key of RFC 7638 section 3.1, and its published SHA-256 thumbprint
RFC_7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJEC"
    "PebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Qvz"
    "qY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu"
    "0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC_7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_the_rfc_example_key() -> None:
    jwk = {"kty": "RSA", "n": RFC_7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == RFC_7638_THUMBPRINT


def test_only_the_key_material_counts() -> None:
    rsa, ec = make_rsa_key("a"), make_ec_key("b")
    for key in (rsa, ec):
        jwk = key.jwk()
        bare = {k: v for k, v in jwk.items() if k not in ("kid", "alg", "use")}
        assert jwk_thumbprint(jwk) == jwk_thumbprint(bare)
        assert jwk_thumbprint(jwk) == jwk_thumbprint({**jwk, "kid": "renamed", "alg": "x"})
    assert jwk_thumbprint(rsa.jwk()) != jwk_thumbprint(make_rsa_key("a").jwk())


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "RSA", "n": RFC_7638_N},
        {"kty": "RSA", "n": RFC_7638_N, "e": 65537},
        {"n": RFC_7638_N, "e": "AQAB"},
    ],
)
def test_keys_it_does_not_cover_are_refused(jwk: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        jwk_thumbprint(jwk)


def test_a_key_set_knows_each_kids_thumbprint() -> None:
    a, b = make_rsa_key("a"), make_ec_key("b")
    ks = parse_jwks({"keys": [a.jwk(), b.jwk()]}, ["RS256", "ES256"], fetched_at=0)
    assert ks.prints == {"a": jwk_thumbprint(a.jwk()), "b": jwk_thumbprint(b.jwk())}
    assert ks.thumbprints == frozenset(ks.prints.values())
    assert [t for t, _ in ks.for_alg("ES256")] == [ks.prints["b"]]
