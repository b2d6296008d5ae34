"""The plugin end to end (no network: inline JWKS, fixed clocks): the bad-token suite, 401/403
shapes, claims in the context, header hygiene, the validated-token cache."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.context import AUTH_CLAIMS, AUTH_SUBJECT
from extproc.plugin import Continue, Reject
from extproc.testing.jwt import KeyPair, TokenFactory, b64url, make_rsa_key
from plugins.jwt_auth import JwtAuthConfig, JwtAuthPlugin
from tests.support.jwt_helpers import AUDIENCE, ISSUER, NOW, bearer, provider, request


def assert_401(result: object, reason: str | None = None) -> Reject:
    assert isinstance(result, Reject), result
    assert result.status == 401
    assert result.error == "unauthorized"
    assert result.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    if reason is not None:
        assert result.details == f"jwt_{reason}", result.details
    body = json.loads(result.to_respond().body)
    assert set(body) == {"error", "message"}
    return result


async def test_valid_tokens_pass_for_each_algorithm(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, ec_key: KeyPair, ed_key: KeyPair
) -> None:
    plugin = await make_plugin()
    for key in (rsa_key, ec_key, ed_key):
        event = bearer(tokens.mint({"sub": f"u-{key.alg}"}, key=key))
        result = await plugin.on_request(event)
        assert isinstance(result, Continue), (key.alg, result)
        assert event.context[AUTH_SUBJECT] == f"u-{key.alg}"
        assert event.context[AUTH_CLAIMS]["iss"] == ISSUER


async def test_algorithm_is_pinned_per_key(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    ps = KeyPair("rsa-1", "PS256", rsa_key.private_key)  # same RSA key, PSS padding
    pinned = await make_plugin()  # the JWK says alg RS256
    assert_401(await pinned.on_request(bearer(tokens.mint(key=ps))), "bad_alg")
    unpinned_jwks = {"inline": {"keys": [rsa_key.jwk(with_alg=False)]}}
    both = await make_plugin(jwks=unpinned_jwks, algorithms=["RS256", "PS256"])
    assert isinstance(await both.on_request(bearer(tokens.mint(key=ps))), Continue)
    assert isinstance(await both.on_request(bearer(tokens.mint())), Continue)
    rs_only = await make_plugin(jwks=unpinned_jwks, algorithms=["RS256"])
    assert_401(await rs_only.on_request(bearer(tokens.mint(key=ps))), "bad_alg")


async def test_audience_as_list(make_plugin: Any, rsa_key: KeyPair, wall: Any) -> None:
    plugin = await make_plugin()
    factory = TokenFactory(rsa_key, issuer=ISSUER, audience=["other", AUDIENCE], clock=wall)
    assert isinstance(await plugin.on_request(bearer(factory.mint())), Continue)


def with_payload(t: TokenFactory, raw: bytes) -> str:
    header = t.mint().split(".")[0]
    return f"{header}.{b64url(raw)}.AAAA"


BAD_TOKENS: list[tuple[str, Any, str]] = [
    ("alg none", lambda t: t.alg_none(), "malformed"),
    (
        "alg None signed",
        lambda t: t.raw({"alg": "None", "kid": "rsa-1"}, t.claims(), b"x" * 8),
        "bad_alg",
    ),
    ("hs256 with public key", lambda t: t.hs256_with_public_key(), "bad_alg"),
    ("tampered payload", lambda t: t.tampered_payload(sub="admin"), "bad_signature"),
    ("truncated signature", lambda t: t.truncated_signature(cut=4), None),
    ("signature cut to 3 bytes", lambda t: t.mint().rsplit(".", 1)[0] + ".AAAA", "bad_signature"),
    ("non canonical signature", lambda t: t.mint()[:-1] + "B", None),
    ("expired", lambda t: t.mint({"exp": int(NOW) - 3600}), "expired"),
    (
        "not yet valid",
        lambda t: t.mint({"nbf": int(NOW) + 3600, "exp": int(NOW) + 7200}),
        "not_yet_valid",
    ),
    ("issued in the future", lambda t: t.mint({"iat": int(NOW) + 3600}), "iat_future"),
    ("no exp", lambda t: t.mint(omit=["exp"]), "missing_exp"),
    ("wrong issuer", lambda t: t.mint({"iss": "https://evil.test/"}), "wrong_issuer"),
    ("wrong audience", lambda t: t.mint({"aud": "other"}), "wrong_audience"),
    ("no audience", lambda t: t.mint(omit=["aud"]), "wrong_audience"),
    ("unknown kid", lambda t: t.mint(kid="nope"), "unknown_kid"),
    ("kid not a string", lambda t: t.mint(headers={"kid": 5}), "malformed"),
    ("kid for another alg", lambda t: t.mint(kid="ec-1"), "bad_alg"),
    ("crit header", lambda t: t.mint(headers={"crit": ["exp"], "exp": 1}), "unsupported_header"),
    ("b64 false", lambda t: t.mint(headers={"b64": False, "crit": ["b64"]}), "unsupported_header"),
    ("zip header", lambda t: t.mint(headers={"zip": "DEF"}), "unsupported_header"),
    ("alg RS512 not allowed", lambda t: t.mint(alg="RS512"), "bad_alg"),
    ("header not json", lambda t: f"{b64url(b'nope')}.{t.mint().split('.')[1]}.AAAA", "malformed"),
    ("payload not json", lambda t: with_payload(t, b"{"), "malformed"),
    ("payload a list", lambda t: with_payload(t, b"[1]"), "malformed"),
    ("payload NaN exp", lambda t: with_payload(t, b'{"exp":NaN}'), "malformed"),
    ("duplicate claim", lambda t: with_payload(t, b'{"iss":1,"iss":2}'), "malformed"),
    ("exp a string", lambda t: t.mint({"exp": "never"}), "malformed"),
    ("exp a boolean", lambda t: t.mint({"exp": True}), "malformed"),
    ("sub a number", lambda t: t.mint({"sub": 7}), "malformed"),
    ("two segments", lambda t: ".".join(t.mint().split(".")[:2]), "malformed"),
    ("five segments (JWE)", lambda t: t.mint() + ".AAAA.AAAA", "malformed"),
    ("padding", lambda t: t.mint() + "=", "malformed"),
    (
        "standard base64 alphabet",
        lambda t: t.mint().replace("-", "+").replace("_", "/") + "+/",
        "malformed",
    ),
    (
        "jku honoured?",
        lambda t: t.mint(kid="nope", headers={"jku": "http://127.0.0.1:1/jwks"}),
        "unknown_kid",
    ),
    (
        "embedded jwk honoured?",
        lambda t: t.mint(key=make_rsa_key("x"), kid="x", headers={"jwk": {"kty": "RSA"}}),
        "unknown_kid",
    ),
    ("huge token", lambda t: t.mint({"pad": "A" * 20_000}), "too_large"),
    ("not ASCII", lambda t: t.mint()[:-2] + "\u00e9A", "malformed"),
    ("a lone surrogate", lambda t: t.mint()[:-2] + "\udce9A", "malformed"),
    ("deeply nested", lambda t: with_payload(t, b"[" * 5000), "malformed"),
    (
        "deeply nested object",
        lambda t: with_payload(t, b'{"a":' * 1000 + b"1" + b"}" * 1000),
        "malformed",
    ),
    (  # within every interpreter's recursion limit: refused by our own depth limit
        "nested 33 deep",
        lambda t: with_payload(t, b'{"iss":"x","a":' + b"[" * 32 + b"]" * 32 + b"}"),
        "malformed",
    ),
    (  # 32 deep is allowed: the token is refused for what it claims, not for its shape
        "nested 32 deep",
        lambda t: with_payload(t, b'{"iss":"x","a":' + b"[" * 31 + b"]" * 31 + b"}"),
        "wrong_issuer",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
async def test_bad_tokens_are_401(
    make_plugin: Any, tokens: TokenFactory, name: str, make: Any, reason: str | None
) -> None:
    plugin = await make_plugin()
    token = make(tokens)
    event = bearer(token)
    result = await plugin.on_request(event)
    assert_401(result, reason)
    assert AUTH_CLAIMS not in event.context


async def test_ambiguous_and_missing(make_plugin: Any, tokens: TokenFactory) -> None:
    plugin = await make_plugin()
    missing = await plugin.on_request(request())
    assert isinstance(missing, Reject) and missing.status == 401
    assert missing.headers["www-authenticate"] == "Bearer"  # no error code (RFC 6750 3.1)
    assert missing.details == "jwt_missing"
    t = tokens.mint()
    twice = request(items=(("authorization", f"Bearer {t}"), ("authorization", f"Bearer {t}")))
    assert_401(await plugin.on_request(twice), "multiple_tokens")
    for value in (f"Bearer {t} {t}", f"Bearer {t},{t}", "Bearer", "Bearer   "):
        assert_401(await plugin.on_request(request(headers={"authorization": value})))
    # scheme is case-insensitive
    assert isinstance(
        await plugin.on_request(request(headers={"authorization": f"bEaReR {t}"})), Continue
    )
    # another scheme is not our token: missing
    basic = await plugin.on_request(request(headers={"authorization": "Basic dXNlcjpwYXNz"}))
    assert isinstance(basic, Reject) and basic.details == "jwt_missing"


async def test_absurd_header_is_401_not_5xx(make_plugin: Any) -> None:
    plugin = await make_plugin()
    result = await plugin.on_request(request(headers={"authorization": "Bearer " + "A" * 100_000}))
    assert_401(result, "too_large")


async def test_realm_in_challenges(make_plugin: Any, rsa_key: KeyPair) -> None:
    plugin = await make_plugin({"providers": {"main": provider([rsa_key])}, "realm": "api"})
    result = await plugin.on_request(request())
    assert isinstance(result, Reject) and result.headers["www-authenticate"] == 'Bearer realm="api"'
    bad = await plugin.on_request(bearer("a.b.c"))
    assert isinstance(bad, Reject)
    assert bad.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'


def _config(keys: list[KeyPair], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {
            "main": provider(
                keys,
                claim_to_headers=[{"claim": "sub", "header": "x-user"}],
                payload_header="x-jwt-payload",
            )
        },
        "rules": [
            {"match": {"prefix": "/public/"}, "requires": {"allow_missing": True}},
            {"match": {"prefix": "/open/"}, "requires": {"allow_missing_or_failed": True}},
            {"match": {"prefix": "/admin/"}, "requires": {"provider": "main"}, "scopes": ["admin"]},
            {
                "match": {"prefix": "/team/"},
                "requires": {"provider": "main"},
                "roles": ["dev"],
                "groups": ["eng"],
            },
        ],
    }
    cfg.update(extra)
    return cfg


async def test_forged_claim_headers_are_always_removed(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    forged = {"x-user": "admin", "x-jwt-payload": "e30"}
    # allow-missing route, no token: headers removed, none set
    r = await plugin.on_request(request("/public/a", forged))
    assert isinstance(r, Continue)
    assert set(r.remove_headers) >= {"x-user", "x-jwt-payload"} and not r.set_headers
    # allow-missing-or-failed with a bad token: same
    r = await plugin.on_request(request("/open/a", {**forged, "authorization": "Bearer x.y.z"}))
    assert isinstance(r, Continue) and set(r.remove_headers) >= {"x-user"} and not r.set_headers
    # valid token: removed first, then set from verified claims only
    event = bearer(tokens.mint({"sub": "alice"}), "/public/a")
    r = await plugin.on_request(event)
    assert isinstance(r, Continue)
    assert "x-user" in r.remove_headers and r.set_headers["x-user"] == "alice"
    payload = r.set_headers["x-jwt-payload"]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert decoded["sub"] == "alice"
    # allow_missing still refuses a present but bad token
    assert_401(await plugin.on_request(bearer(tokens.mint({"exp": 1}), "/public/a")), "expired")


async def test_claim_header_values_are_sanitised(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    r = await plugin.on_request(bearer(tokens.mint({"sub": "a\r\nx-admin: 1"}), "/public/"))
    assert isinstance(r, Continue) and "x-user" not in r.set_headers


async def test_forward_false_removes_the_token_header(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin({"providers": {"main": provider([rsa_key], forward=False)}})
    r = await plugin.on_request(bearer(tokens.mint()))
    assert isinstance(r, Continue) and "authorization" in r.remove_headers


async def test_authorisation_by_claims_is_403(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    denied = await plugin.on_request(bearer(tokens.mint({"scope": "read write"}), "/admin/x"))
    assert isinstance(denied, Reject) and denied.status == 403 and denied.error == "forbidden"
    assert denied.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    ok = await plugin.on_request(bearer(tokens.mint({"scope": "read admin"}), "/admin/x"))
    assert isinstance(ok, Continue)
    ok_list = await plugin.on_request(bearer(tokens.mint({"scope": ["admin"]}), "/admin/x"))
    assert isinstance(ok_list, Continue)
    team = await plugin.on_request(
        bearer(tokens.mint({"roles": ["dev"], "groups": "ops"}), "/team/")
    )
    assert isinstance(team, Reject) and team.status == 403
    team = await plugin.on_request(
        bearer(tokens.mint({"roles": ["dev"], "groups": ["eng"]}), "/team/")
    )
    assert isinstance(team, Continue)
    # a path trick does not dodge the admin rule
    tricked = await plugin.on_request(bearer(tokens.mint(), "/public/..;/admin/x"))
    assert isinstance(tricked, Reject) and tricked.status == 403
    tricked = await plugin.on_request(request("/public/%2e%2e/ADMIN/x"))
    assert isinstance(tricked, Reject) and tricked.status == 401


async def test_bad_path_is_400(make_plugin: Any) -> None:
    plugin = await make_plugin()
    for path in ("/a%00b", "/a%zz", "relative", "/a\x01"):
        r = await plugin.on_request(request(path))
        assert isinstance(r, Reject) and r.status == 400, path


async def test_nested_role_claim(make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair) -> None:
    cfg = _config([rsa_key], roles_claim="realm_access.roles")
    plugin = await make_plugin(cfg)
    token = tokens.mint({"realm_access": {"roles": ["dev"]}, "groups": ["eng"]})
    assert isinstance(await plugin.on_request(bearer(token, "/team/")), Continue)


async def test_email_verified_and_max_lifetime(make_plugin: Any, tokens: TokenFactory) -> None:
    plugin = await make_plugin(require_email_verified=True, max_lifetime_s=600)
    assert_401(await plugin.on_request(bearer(tokens.mint())), "email_unverified")
    assert isinstance(
        await plugin.on_request(bearer(tokens.mint({"email_verified": True}))), Continue
    )
    long = tokens.mint({"email_verified": True, "exp": int(NOW) + 3600})
    assert_401(await plugin.on_request(bearer(long)), "lifetime_too_long")


async def test_require_exp_false_and_leeway(make_plugin: Any, tokens: TokenFactory) -> None:
    plugin = await make_plugin(require_exp=False, clock_skew_s=30)
    assert isinstance(await plugin.on_request(bearer(tokens.mint(omit=["exp"]))), Continue)
    assert isinstance(
        await plugin.on_request(bearer(tokens.mint({"exp": int(NOW) - 20}))), Continue
    )
    assert_401(await plugin.on_request(bearer(tokens.mint({"exp": int(NOW) - 31}))), "expired")


# ---------------------------------------------------------------- cache


async def test_tokens_first_seen_together_do_not_all_expire_together(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    for i in range(40):  # a burst of new clients: all verified within the same instant
        token = tokens.mint({"exp": int(NOW) + 1000, "sub": f"user-{i}"})
        assert isinstance(await plugin.on_request(bearer(token)), Continue)
    assert plugin.token_cache is not None
    ttls = [plugin.token_cache.l1.ttl(k) for k in plugin.token_cache.l1]
    assert all(270 <= t <= 300 for t in ttls)  # max_ttl_s 300 less up to 10 %
    assert max(ttls) - min(ttls) > 5  # spread out: no re-verification stampede later


async def _let_run() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _cached_until(
    plugin: JwtAuthPlugin, tokens: TokenFactory, mono: Any, seconds: float
) -> str:
    """A token (far from its exp) verified and cached; then the monotonic clock moved to
    ``seconds`` before its entry ends. Returns the token."""
    token = tokens.mint({"exp": int(NOW) + 3000})
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    assert plugin.token_cache is not None
    left = plugin.token_cache.l1.ttl(next(iter(plugin.token_cache.l1)))
    assert left is not None
    mono.now += left - seconds
    return token


async def test_a_token_in_use_is_verified_again_before_its_entry_expires(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, wall: Any, mono: Any
) -> None:
    """Refresh-ahead: no request waits for the re-verification (or an L2 read) of a token
    that is in use, and tokens first seen together do not fall out of the cache together."""
    plugin = await make_plugin(_config([rsa_key]))
    token = tokens.mint({"exp": int(NOW) + 3000})
    first = await plugin.on_request(bearer(token))  # a miss: verified, entry of 270-300 s
    cache = plugin.token_cache
    assert isinstance(first, Continue) and cache is not None
    [key] = list(cache.l1)

    def later(seconds: float) -> None:
        mono.now += seconds
        wall.now += seconds

    later(200)  # not yet in the last 30 s (refresh_ahead 0.1 of max_ttl_s 300)
    assert await plugin.on_request(bearer(token)) is first
    await _let_run()
    assert plugin._m_refresh.value == 0
    left = cache.l1.ttl(key)
    assert left is not None
    later(left - 10)
    assert await plugin.on_request(bearer(token)) is first  # answered from the entry ...
    assert key in plugin._refreshing  # ... and the token goes to be verified again
    assert await plugin.on_request(bearer(token)) is first
    assert len(plugin._refreshing) == 1  # one at a time
    await _let_run()
    assert plugin._m_refresh.value == 1 and not plugin._refreshing
    renewed = cache.l1.ttl(key)
    assert renewed is not None and 270 <= renewed <= 300
    later(100)  # past where the first entry ended: still a hit
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    assert plugin._m_miss.value == 1 and plugin._m_hit.value == 4


async def test_no_refresh_when_the_token_ends_before_a_new_entry_would(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, wall: Any, mono: Any
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    token = tokens.mint({"exp": int(NOW) + 100})  # entry: 80 % of 100 s, less jitter
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    assert plugin.token_cache is not None
    [key] = list(plugin.token_cache.l1)
    left = plugin.token_cache.l1.ttl(key)
    assert left is not None
    mono.now += left - 5
    wall.now += left - 5  # the token has ~25-33 s left: a new entry would be shorter still
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    await _let_run()
    assert plugin._m_refresh.value == 0 and not plugin._refreshing


async def test_a_refresh_that_fails_drops_the_entry_and_the_next_request_is_refused(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, mono: Any
) -> None:
    from plugins.jwt_auth.jwks import parse_jwks

    plugin = await make_plugin(_config([rsa_key]))
    token = tokens.mint({"exp": int(NOW) + 3000})
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    assert plugin.token_cache is not None
    [key] = list(plugin.token_cache.l1)
    # the same key, now pinned to another algorithm: the entry's key is still in the set
    # (same material, same thumbprint), but the token no longer verifies against it
    repinned = {**rsa_key.jwk(), "alg": "PS256"}
    plugin._providers["main"].jwks._install(
        parse_jwks({"keys": [repinned]}, ["RS256", "PS256"], fetched_at=0)
    )
    left = plugin.token_cache.l1.ttl(key)
    assert left is not None
    mono.now += left - 10  # the monotonic clock alone: the token is still far from exp
    assert isinstance(await plugin.on_request(bearer(token)), Continue)  # the old entry
    await _let_run()
    assert key not in plugin.token_cache.l1  # the refresh found the algorithm refused
    assert_401(await plugin.on_request(bearer(token)), "bad_alg")


async def test_new_key_material_under_an_old_kid_ends_the_tokens_cached_under_the_old(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, other_rsa_key: KeyPair
) -> None:
    """An identity provider that reuses a kid for a new key (a compromised key replaced in
    a hurry): tokens signed by the old key are refused at once, not when their cache entry
    ends; the cache remembers the key by its thumbprint, not by its kid."""
    from plugins.jwt_auth.jwks import parse_jwks

    plugin = await make_plugin(_config([rsa_key]))
    old = tokens.mint({"exp": int(NOW) + 3000})
    assert isinstance(await plugin.on_request(bearer(old)), Continue)
    assert plugin.token_cache is not None and len(plugin.token_cache.l1) == 1
    swapped = {**other_rsa_key.jwk(), "kid": rsa_key.kid}
    plugin._providers["main"].jwks._install(
        parse_jwks({"keys": [swapped]}, ["RS256"], fetched_at=0)
    )
    assert len(plugin.token_cache.l1) == 0  # dropped when the key set changed
    assert_401(await plugin.on_request(bearer(old)), "bad_signature")
    new = tokens.mint({"exp": int(NOW) + 3000}, key=other_rsa_key, kid=rsa_key.kid)
    assert isinstance(await plugin.on_request(bearer(new)), Continue)


async def test_a_refresh_is_not_bound_by_the_deadline_of_the_request_that_started_it(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, mono: Any
) -> None:
    """The request is answered at once; its deadline (nearly spent by then) must not starve
    the re-verification that runs after it (a JWKS refetch, a Redis write)."""
    from extproc.context import _deadline, time_left

    plugin = await make_plugin(_config([rsa_key]))
    token = await _cached_until(plugin, tokens, mono, 10)
    seen: list[float] = []
    verify = plugin._verify_with

    async def spy(*args: Any) -> Any:
        seen.append(time_left())
        return await verify(*args)

    plugin._verify_with = spy  # type: ignore[method-assign]
    reset = _deadline.set(asyncio.get_running_loop().time() + 0.001)
    try:
        assert isinstance(await plugin.on_request(bearer(token)), Continue)
    finally:
        _deadline.reset(reset)
    await _let_run()
    assert seen == [float("inf")] and plugin._m_refresh.value == 1


async def test_refresh_ahead_0_never_refreshes(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, mono: Any
) -> None:
    plugin = await make_plugin(_config([rsa_key], token_cache={"refresh_ahead": 0}))
    token = await _cached_until(plugin, tokens, mono, 1)
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    await _let_run()
    assert plugin._m_refresh.value == 0


async def test_cache_hit_still_enforces_exp_and_rules(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, wall: Any, mono: Any
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    token = tokens.mint({"exp": int(NOW) + 100, "scope": "read"})
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    assert plugin.token_cache is not None and len(plugin.token_cache.l1) == 1
    hit = bearer(token)
    assert isinstance(await plugin.on_request(hit), Continue)
    assert hit.context[AUTH_SUBJECT] == "user-1"
    assert plugin._m_hit.value == 1
    # a cache hit does not skip the route's rules
    denied = await plugin.on_request(bearer(token, "/admin/"))
    assert isinstance(denied, Reject) and denied.status == 403
    # the TTL is 80% of the remaining lifetime, less up to 10% jitter (monotonic clock) ...
    assert 72 <= plugin.token_cache.l1.ttl(next(iter(plugin.token_cache.l1))) <= 80
    # ... and a hit re-checks exp against the wall clock even before the entry expires
    wall.now += 200
    assert_401(await plugin.on_request(bearer(token)), "expired")


async def test_raw_token_never_stored(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin()
    token = tokens.mint()
    await plugin.on_request(bearer(token))
    assert plugin.token_cache is not None
    for key in plugin.token_cache.l1:
        assert token not in key and token.split(".")[2] not in key
        assert len(key.rsplit(":", 1)[1]) == 64  # sha-256 hex


async def test_cache_entry_dropped_when_kid_leaves(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair, ec_key: KeyPair
) -> None:
    plugin = await make_plugin()
    token = tokens.mint()
    assert isinstance(await plugin.on_request(bearer(token)), Continue)
    client = plugin._providers["main"].jwks
    from plugins.jwt_auth.jwks import parse_jwks

    assert client.key_set is not None
    client._install(parse_jwks({"keys": [ec_key.jwk()]}, ["ES256"], fetched_at=0))
    assert plugin.token_cache is not None and len(plugin.token_cache.l1) == 0
    assert_401(await plugin.on_request(bearer(token)), "unknown_kid")


# ---------------------------------------------------------------- never an exception


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    value=st.text(max_size=300),
    path=st.text(max_size=60),
    method=st.sampled_from(["GET", "post", "", "DELETE"]),
)
async def test_garbage_never_raises(make_plugin: Any, value: str, path: str, method: str) -> None:
    plugin = await make_plugin()
    event = request("/" + path, {"authorization": value, "cookie": value}, method=method)
    result = await plugin.on_request(event)
    assert isinstance(result, Reject) and result.status in (400, 401)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"providers": {}},
        {"providers": {"p": {"issuer": "i", "jwks": {"uri": "http://idp.example.com/jwks"}}}},
        {"providers": {"p": {"issuer": "i", "jwks": {"uri": "ftp://127.0.0.1/jwks"}}}},
        {"providers": {"p": {"issuer": "i", "jwks": {"uri": "https://u:p@idp/jwks"}}}},
        {"providers": {"p": {"issuer": "i", "jwks": {}}}},
        {"providers": {"p": {"issuer": "i", "jwks": {"file": "/x", "inline": "{}"}}}},
        {"providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}, "algorithms": ["HS256"]}}},
        {"providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}, "algorithms": ["none"]}}},
        {"providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}, "timeout_ms": 0}}},
        {
            "providers": {
                "p": {"issuer": "i", "jwks": {"file": "/x"}, "payload_header": "authorization"}
            }
        },
        {
            "providers": {
                "p": {
                    "issuer": "i",
                    "jwks": {"file": "/x"},
                    "claim_to_headers": [{"claim": "sub", "header": "x-envoy-foo"}],
                }
            }
        },
        {
            "providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider": "q"}}],
        },
        {
            "providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}}},
            "rules": [{"match": {"prefix": "/", "path": "/"}, "requires": {"provider": "p"}}],
        },
        {
            "providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}}},
            "rules": [
                {"match": {"prefix": "/"}, "requires": {"allow_missing": True}, "scopes": ["a"]}
            ],
        },
        {
            "providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}}},
            "rules": [{"match": {"regex": "("}, "requires": {"provider": "p"}}],
        },
        {"providers": {"p": {"issuer": "i", "jwks": {"file": "/x"}}}, "unknown": 1},
    ],
)
def test_bad_config_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JwtAuthConfig.model_validate(bad)


def test_loopback_http_is_allowed() -> None:
    for uri in (
        "http://127.0.0.1:8080/jwks",
        "http://[::1]/jwks",
        "http://localhost/jwks",
        "https://idp/jwks",
    ):
        JwtAuthConfig.model_validate({"providers": {"p": {"issuer": "i", "jwks": {"uri": uri}}}})


def test_plugin_declaration() -> None:
    assert JwtAuthPlugin.name == "jwt_auth" and JwtAuthPlugin.priority == 1000
    assert JwtAuthPlugin.Config is JwtAuthConfig
    needs = JwtAuthPlugin.needs
    assert needs.request_headers and not needs.response_headers
    assert len(needs.phases()) == 1


async def test_a_cached_token_answers_with_one_result_built_when_it_was_verified(
    make_plugin: Any, tokens: TokenFactory, rsa_key: KeyPair
) -> None:
    plugin = await make_plugin(_config([rsa_key]))
    token = tokens.mint({"sub": "alice"})
    first = await plugin.on_request(bearer(token))
    again = await plugin.on_request(bearer(token))
    assert isinstance(first, Continue) and first.set_headers["x-user"] == "alice"
    assert again is first  # no Continue built per request for a cache hit


async def test_a_token_cached_before_a_reload_gets_the_new_headers_to_strip(
    tokens: TokenFactory, rsa_key: KeyPair, wall: Any, mono: Any
) -> None:
    """L1 is kept over a reload when the cache settings stay; the result prebuilt for a
    token must not keep the old generation's list of headers to remove."""
    from extproc.testing.context import make_plugin_context

    def config(other_header: str) -> JwtAuthConfig:
        other = provider([rsa_key], issuer="https://other.example")
        other["claim_to_headers"] = [{"claim": "sub", "header": other_header}]
        return JwtAuthConfig.model_validate(
            {"providers": {"main": provider([rsa_key]), "other": other}}
        )

    async def start(cfg: JwtAuthConfig, previous: JwtAuthPlugin | None) -> JwtAuthPlugin:
        plugin = JwtAuthPlugin(cfg)
        if previous is not None:
            plugin.take_over(previous)
        await plugin.initialize(make_plugin_context("jwt_auth", cfg, clock=mono, wall_clock=wall))
        return plugin

    old = await start(config("x-team"), None)
    token = tokens.mint({"sub": "alice"})
    before = await old.on_request(bearer(token))
    assert isinstance(before, Continue) and "x-team" in before.remove_headers
    new = await start(config("x-group"), old)
    assert new.token_cache is not None and old.token_cache is not None
    assert new.token_cache.l1 is old.token_cache.l1  # the entry is inherited
    after = await new.on_request(bearer(token))
    assert isinstance(after, Continue)
    assert "x-group" in after.remove_headers and "x-team" not in after.remove_headers
    for plugin in (old, new):
        await plugin.shutdown()
