"""The ``jwt_auth`` configuration: reading this file tells you everything the plugin can do.

```yaml
jwt_auth:
  providers:
    corp:
      issuer: https://login.example.com/
      audiences: [api]
      jwks: {uri: https://login.example.com/.well-known/jwks.json}
      algorithms: [RS256, ES256]
      claim_to_headers: [{claim: sub, header: x-user}]
  rules:
    - match: {prefix: /public/}
      requires: {allow_missing: true}
    - match: {prefix: /admin/, methods: [POST, DELETE]}
      requires: {provider: corp}
      scopes: [admin]
  # unmatched routes: a valid token of any provider is required (fail-safe default)
```
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from extproc.plugin import PluginConfig

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "ClaimHeader",
    "HeaderSource",
    "JwksConfig",
    "JwtAuthConfig",
    "ProviderConfig",
    "Requirement",
    "RouteMatch",
    "Rule",
    "TokenCacheConfig",
]

#: the only algorithms ever accepted: asymmetric signatures. ``none`` and HMAC are not even
#: expressible in the schema.
Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(Algorithm.__args__)  # type: ignore[attr-defined]

_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")
#: headers a plugin must never set (Envoy ignores or rejects their mutation, or they would let
#: a token holder rewrite routing)
_FORBIDDEN_SET = frozenset({"host", "authorization", "cookie", "content-length", "te", "upgrade"})


def _check_header_name(value: str) -> str:
    value = value.lower()
    if not _HEADER.match(value):
        raise ValueError(f"{value!r} is not a valid lower-case header name")
    if value.startswith("x-envoy-") or value in _FORBIDDEN_SET:
        raise ValueError(f"header {value!r} may not be set by a plugin")
    return value


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_algorithms() -> list[Algorithm]:
    return ["RS256", "ES256"]


class JwksConfig(PluginConfig):
    """Where the provider's public keys come from: exactly one of ``uri``, ``file``,
    ``inline``."""

    uri: str | None = Field(
        None, description="JWKS URL; https, or http only for a loopback host", max_length=2048
    )
    file: str | None = Field(None, description="path of a local JWKS JSON file, read at start")
    inline: dict[str, Any] | str | None = Field(
        None, description="the JWKS document itself (object or JSON string)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> JwksConfig:
        given = [n for n in ("uri", "file", "inline") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("jwks needs exactly one of uri, file, inline")
        if self.uri is not None:
            parts = urlsplit(self.uri)
            secure = parts.scheme == "https"
            loopback = parts.scheme == "http" and is_loopback_host(parts.hostname)
            if not (secure or loopback):
                raise ValueError("jwks.uri must be https (plain http only on a loopback host)")
            if not parts.hostname:
                raise ValueError("jwks.uri has no host")
            if parts.username or parts.password:
                raise ValueError("jwks.uri must not carry credentials")
        return self


class HeaderSource(PluginConfig):
    name: str = Field(description="header carrying the token (lower-cased)")
    prefix: str = Field(
        "", description="scheme or prefix before the token, e.g. 'Bearer ' (case-insensitive)"
    )

    @field_validator("name")
    @classmethod
    def _lower(cls, v: str) -> str:
        v = v.lower()
        if not _HEADER.match(v):
            raise ValueError(f"{v!r} is not a valid header name")
        return v


class ClaimHeader(PluginConfig):
    claim: str = Field(
        min_length=1, max_length=128, description="claim name; dots walk nested objects"
    )
    header: str = Field(description="request header set from the verified claim")

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        return _check_header_name(v)


class ProviderConfig(PluginConfig):
    issuer: str = Field(min_length=1, max_length=2048, description="required exact `iss` value")
    audiences: list[str] = Field(
        default_factory=list,
        description="accepted `aud` values (any one suffices); empty disables the aud check",
    )
    jwks: JwksConfig = Field(description="the provider's key set")
    algorithms: list[Algorithm] = Field(
        default_factory=_default_algorithms,
        min_length=1,
        description="signature algorithms accepted; each key is pinned to one of them",
    )
    cache_duration_s: float = Field(
        600, ge=5, le=86_400, description="how long a fetched JWKS is fresh"
    )
    refetch_min_interval_s: float = Field(
        30, ge=0.01, le=3600, description="at most one unknown-kid refetch per this interval"
    )
    timeout_ms: int = Field(1000, ge=10, le=30_000, description="JWKS fetch timeout per call")
    retries: int = Field(1, ge=0, le=5, description="JWKS fetch retries (with backoff)")
    fetch_retry_min_s: float = Field(
        1.0, ge=0.01, le=600, description="first wait after a failed JWKS fetch (doubles)"
    )
    fetch_retry_max_s: float = Field(
        60.0, ge=0.01, le=3600, description="longest wait between failed JWKS fetches"
    )
    max_jwks_bytes: int = Field(
        262_144, ge=1024, le=16_777_216, description="JWKS response size cap"
    )
    max_keys: int = Field(64, ge=1, le=1024, description="keys kept from one JWKS document")
    forward: bool = Field(True, description="keep the token header for the upstream")
    from_headers: list[HeaderSource] = Field(
        default_factory=list,
        description="headers carrying the token; all sources empty means Authorization Bearer",
    )
    from_params: list[str] = Field(default_factory=list, description="query parameters")
    from_cookies: list[str] = Field(default_factory=list, description="cookies")
    claim_to_headers: list[ClaimHeader] = Field(
        default_factory=list, description="verified claims copied into request headers"
    )
    payload_header: str | None = Field(
        None, description="header set to the base64url JSON of the verified claims"
    )
    clock_skew_s: int = Field(60, ge=0, le=600, description="leeway for exp/nbf/iat")
    max_lifetime_s: int | None = Field(
        None, ge=1, le=31_536_000, description="refuse tokens valid for longer (exp - iat)"
    )
    require_exp: bool = Field(True, description="refuse tokens without `exp`")
    require_email_verified: bool = Field(False, description="require `email_verified: true`")

    @field_validator("payload_header")
    @classmethod
    def _payload_header(cls, v: str | None) -> str | None:
        return None if v is None else _check_header_name(v)

    @model_validator(mode="after")
    def _sources(self) -> ProviderConfig:
        if self.fetch_retry_max_s < self.fetch_retry_min_s:
            raise ValueError("fetch_retry_max_s must be >= fetch_retry_min_s")
        out = {h.header for h in self.claim_to_headers}
        if self.payload_header:
            out.add(self.payload_header)
        sources = {h.name for h in self.token_headers()}
        clash = out & sources
        if clash:
            raise ValueError(f"headers {sorted(clash)} are both token sources and outputs")
        return self

    def token_headers(self) -> list[HeaderSource]:
        if not (self.from_headers or self.from_params or self.from_cookies):
            return [HeaderSource(name="authorization", prefix="Bearer ")]
        return list(self.from_headers)

    def output_headers(self) -> set[str]:
        out = {h.header for h in self.claim_to_headers}
        if self.payload_header:
            out.add(self.payload_header)
        return out


class RouteMatch(PluginConfig):
    """Which requests a rule covers: exactly one of ``prefix``, ``path``, ``regex`` (matched in
    full), on the normalised path without the query string."""

    prefix: str | None = Field(None, max_length=2048, description="path prefix, e.g. /api/")
    path: str | None = Field(None, max_length=2048, description="exact path")
    regex: str | None = Field(None, max_length=1024, description="Python regex, full match")
    methods: list[str] = Field(
        default_factory=list, description="HTTP methods (any when empty), case-insensitive"
    )
    case_sensitive: bool = Field(True, description="compare the path case-sensitively")

    @model_validator(mode="after")
    def _one(self) -> RouteMatch:
        given = [n for n in ("prefix", "path", "regex") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("match needs exactly one of prefix, path, regex")
        for value in (self.prefix, self.path):
            if value is not None and not value.startswith("/"):
                raise ValueError("prefix/path must start with '/'")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"bad regex: {exc}") from None
        return self

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]


class Requirement(PluginConfig):
    """What a route requires: exactly one of ``provider``, ``any_of``, ``allow_missing``,
    ``allow_missing_or_failed``."""

    provider: str | None = Field(None, description="a valid token of this provider")
    any_of: list[str] | None = Field(None, min_length=1, description="one of these providers")
    allow_missing: bool = Field(False, description="no token is fine; a bad token is a 401")
    allow_missing_or_failed: bool = Field(
        False, description="never reject; verified claims are passed on when there are any"
    )
    providers: list[str] = Field(
        default_factory=list,
        description="providers tried by allow_missing[_or_failed] (all when empty)",
    )

    @model_validator(mode="after")
    def _one(self) -> Requirement:
        kinds = [
            self.provider is not None,
            self.any_of is not None,
            self.allow_missing,
            self.allow_missing_or_failed,
        ]
        if sum(kinds) != 1:
            raise ValueError(
                "requires needs exactly one of provider, any_of, allow_missing, "
                "allow_missing_or_failed"
            )
        if self.providers and not (self.allow_missing or self.allow_missing_or_failed):
            raise ValueError("providers is only for allow_missing / allow_missing_or_failed")
        return self

    def provider_names(self, all_names: list[str]) -> list[str]:
        if self.provider is not None:
            return [self.provider]
        if self.any_of is not None:
            return list(self.any_of)
        return list(self.providers) or list(all_names)


class Rule(PluginConfig):
    match: RouteMatch = Field(description="which requests the rule covers")
    requires: Requirement = Field(description="what the requests must present")
    scopes: list[str] = Field(default_factory=list, description="all required in scope claim")
    roles: list[str] = Field(default_factory=list, description="all required in roles claim")
    groups: list[str] = Field(default_factory=list, description="all required in groups claim")

    @model_validator(mode="after")
    def _authz_needs_auth(self) -> Rule:
        if (self.scopes or self.roles or self.groups) and (
            self.requires.allow_missing or self.requires.allow_missing_or_failed
        ):
            raise ValueError("scopes/roles/groups need requires.provider or requires.any_of")
        return self


class TokenCacheConfig(PluginConfig):
    enabled: bool = Field(True, description="cache validated tokens (by SHA-256)")
    max_entries: int = Field(10_000, ge=1, le=10_000_000, description="L1 entries kept")
    max_ttl_s: float = Field(300, ge=1, le=86_400, description="longest an entry is kept")
    refresh_ahead: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="a hit in the last share of max_ttl_s before its entry expires verifies "
        "the token again after answering, and the new entry replaces it (0: never): a token "
        "in use does not drop out of the cache, so no request waits for its re-verification "
        "or the Redis read before it",
    )
    ttl_fraction: float = Field(
        0.8, gt=0, le=1, description="share of the token's remaining lifetime an entry lives"
    )
    redis: bool = Field(
        True,
        description="use Redis as a second tier when one is configured (not read while the "
        "worker's CPU is saturated or other streams are in flight: verifying here is "
        "cheaper than waiting for the read)",
    )
    redis_prefix: str = Field("extproc:jwt:", max_length=64, description="Redis key prefix")
    redis_timeout_ms: int = Field(20, ge=1, le=1000, description="bound on each Redis call")
    redis_write_window_ms: float = Field(
        20,
        ge=0,
        le=1000,
        description="new and refreshed entries reach Redis this long after they were made, "
        "in one pipeline with the others of the window (at most 128 a pipeline): a longer "
        "window costs fewer round trips when entries come spread out, and leaves a token "
        "that long longer unknown to the other workers",
    )


class JwtAuthConfig(PluginConfig):
    providers: dict[Annotated[str, Field(pattern=_NAME)], ProviderConfig] = Field(
        min_length=1, description="token issuers, by name"
    )
    rules: list[Rule] = Field(
        default_factory=list, description="first match wins; strictest across path readings"
    )
    default: Requirement | None = Field(
        None, description="for unmatched routes; a valid token of any provider when unset"
    )
    scope_claim: str = Field("scope", description="claim holding scopes (string or list)")
    roles_claim: str = Field("roles", description="claim holding roles (dots walk objects)")
    groups_claim: str = Field("groups", description="claim holding groups")
    max_token_bytes: int = Field(
        8192, ge=256, le=65_536, description="longer tokens are refused before any decoding"
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, le=1_048_576, description="a token header longer than this is a 401"
    )
    realm: str | None = Field(
        None, max_length=128, description="realm in WWW-Authenticate challenges"
    )
    token_cache: TokenCacheConfig = Field(default_factory=TokenCacheConfig)

    @model_validator(mode="after")
    def _references(self) -> JwtAuthConfig:
        names = set(self.providers)
        reqs = [r.requires for r in self.rules]
        if self.default is not None:
            reqs.append(self.default)
        for req in reqs:
            for name in req.provider_names(sorted(names)):
                if name not in names:
                    raise ValueError(f"unknown provider {name!r} in requires")
        if self.realm is not None and ('"' in self.realm or "\\" in self.realm):
            raise ValueError("realm must not contain quotes or backslashes")
        outputs: set[str] = set()
        sources: set[str] = set()
        for p in self.providers.values():
            outputs |= p.output_headers()
            sources |= {h.name for h in p.token_headers()}
        if outputs & sources:
            raise ValueError(f"headers {sorted(outputs & sources)} are token sources and outputs")
        return self

    def default_requirement(self) -> Requirement:
        return self.default or Requirement(any_of=sorted(self.providers))
