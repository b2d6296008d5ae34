"""Token sources, ambiguity, and the strict shape checks done before any crypto."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.plugin import Headers, HttpRequest
from plugins.jwt_auth.config import ProviderConfig
from plugins.jwt_auth.extract import Extractor, TokenError, check_token_shape, parse_token

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
OTHER = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ5In0.c2lnMg"


def extractor(**sources: Any) -> Extractor:
    base = {"issuer": "i", "jwks": {"file": "/dev/null"}}
    providers = {
        "a": ProviderConfig.model_validate({**base, **sources}),
        "b": ProviderConfig.model_validate(
            {**base, "from_headers": [{"name": "x-b-token", "prefix": ""}]}
        ),
    }
    return Extractor(providers, max_token_bytes=4096, max_header_bytes=8192)


def req(path: str = "/", items: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    return HttpRequest("GET", path, headers=Headers(items))


ALL = frozenset({"a", "b"})


def test_default_source_is_bearer() -> None:
    found = extractor().extract(req(items=(("authorization", f"Bearer {TOKEN}"),)), ALL)
    assert found is not None and found.token == TOKEN and found.providers == {"a"}
    assert found.headers == {"authorization"}


@pytest.mark.parametrize(
    "value", [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN}", f"Bearer {TOKEN} "]
)
def test_bearer_variants(value: str) -> None:
    found = extractor().extract(req(items=(("authorization", value),)), ALL)
    assert found is not None and found.token == TOKEN


@pytest.mark.parametrize(
    "items",
    [
        (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
        (("authorization", f"Bearer {TOKEN}"), ("x-b-token", OTHER)),
        (("authorization", f"Bearer {TOKEN} {OTHER}"),),
        (("authorization", f"Bearer {TOKEN},{OTHER}"),),
        (("authorization", "Bearer"),),
    ],
)
def test_ambiguity_is_an_error(items: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(TokenError):
        extractor().extract(req(items=items), ALL)


def test_sources_outside_the_rule_are_ignored() -> None:
    items = (("authorization", f"Bearer {TOKEN}"), ("x-b-token", OTHER))
    found = extractor().extract(req(items=items), frozenset({"b"}))
    assert found is not None and found.token == OTHER


def test_custom_header_query_and_cookie() -> None:
    ex = extractor(
        from_headers=[{"name": "X-Token", "prefix": "JWT "}],
        from_params=["access_token"],
        from_cookies=["session"],
    )
    hdr = ex.extract(req(items=(("x-token", f"jwt {TOKEN}"),)), ALL)
    assert hdr is not None and hdr.token == TOKEN
    q = ex.extract(req(f"/p?x=1&access_token={TOKEN}"), ALL)
    assert q is not None and q.token == TOKEN and not q.headers
    c = ex.extract(req(items=(("cookie", f"a=b; session={TOKEN}; c=d"),)), ALL)
    assert c is not None and c.token == TOKEN
    # a Bearer header is not a source once others are configured
    assert ex.extract(req(items=(("authorization", f"Bearer {TOKEN}"),)), frozenset({"a"})) is None
    with pytest.raises(TokenError):
        ex.extract(req(f"/p?access_token={TOKEN}&access_token={OTHER}"), ALL)
    with pytest.raises(TokenError):
        ex.extract(req(items=(("cookie", f"session={TOKEN}"), ("cookie", f"session={OTHER}"))), ALL)
    with pytest.raises(TokenError):
        ex.extract(req(f"/p?access_token={OTHER}", (("cookie", f"session={TOKEN}"),)), ALL)
    # the same token in two places is not ambiguous
    same = ex.extract(req(f"/p?access_token={TOKEN}", (("cookie", f"session={TOKEN}"),)), ALL)
    assert same is not None and same.token == TOKEN


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (TOKEN, None),
        ("a.b", "malformed"),
        ("a.b.c.d.e", "malformed"),
        ("e30.e30.", "malformed"),
        ("e30+.e30.c2ln", "malformed"),
        ("e30=.e30.c2ln", "malformed"),
        ("e30hb.e30.c2ln", "malformed"),  # length % 4 == 1
        ("e30.e30.c2lo", None),
        ("e30.e30.c2lp", None),
        ("e30.e30.c2k", None),
        ("e30.e30.c2l", "malformed"),  # non-zero trailing bits: a second spelling
        ("e30.e30.cw", None),
        ("e30.e30.c3", "malformed"),
        ("a" * 5000 + ".b.c", "too_large"),
        ("a.b.c\u00e9", "malformed"),
    ],
)
def test_shape(token: str, reason: str | None) -> None:
    if reason is None:
        check_token_shape(token, 4096)
        return
    with pytest.raises(TokenError) as info:
        check_token_shape(token, 4096)
    assert info.value.reason == reason


def test_parse_token() -> None:
    parsed = parse_token(TOKEN)
    assert parsed.header == {"alg": "RS256"} and parsed.payload == {"sub": "x"}
    assert parsed.signature == b"sig"
    assert parsed.signing_input == TOKEN.rsplit(".", 1)[0].encode()
