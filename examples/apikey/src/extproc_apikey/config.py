"""Schema of the ``apikey`` plugin: reading this file tells you everything it can do.

Keys are never stored in clear: the config and Redis hold the hex SHA-256 of each key
(``python -m extproc_apikey hash KEY`` prints it). With a ``redis:`` section in the sidecar's
configuration the owner of a key is ``GET <redis_prefix><sha256>``; without one, ``keys`` below
is the whole key set.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from extproc.plugin import PluginConfig
from pydantic import Field, field_validator, model_validator

__all__ = ["ApiKeyConfig", "StaticKey", "hash_key"]

_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key: what the config and Redis store."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class StaticKey(PluginConfig):
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key, never the key itself"
    )
    owner: str = Field(
        min_length=1, max_length=128, pattern=r"^[\w.@:-]+$", description="who the key belongs to"
    )


def _header_name(value: str) -> str:
    if not _HEADER.match(value) or value.startswith(("host", ":", "x-envoy-")):
        raise ValueError(f"{value!r} is not a lower-case header name ext_proc may use")
    return value


class ApiKeyConfig(PluginConfig):
    header: str = Field("x-api-key", description="the request header that carries the key")
    keys: tuple[StaticKey, ...] = Field(
        (), max_length=100_000, description="the key set without Redis (and see redis_down)"
    )
    redis_prefix: str = Field(
        "apikey:", max_length=64, description="Redis key of a key: <prefix><sha256>, value: owner"
    )
    redis_down: Literal["reject", "static"] = Field(
        "reject", description="when Redis fails: answer 503, or decide with `keys`"
    )
    cache_ttl_s: float = Field(
        30.0, ge=0, le=3600, description="how long a key found in Redis is cached in process"
    )
    negative_cache_ttl_s: float = Field(
        2.0, ge=0, le=3600, description="how long an unknown key is cached (0: not at all)"
    )
    anonymous_prefixes: tuple[str, ...] = Field(
        (), max_length=100, description="paths below these need no key"
    )
    owner_header: str | None = Field(
        "x-apikey-owner", description="send the owner upstream in this header (null: do not)"
    )
    strip_key: bool = Field(True, description="remove the key header before the upstream")
    set_auth_subject: bool = Field(
        True, description="also set auth.subject = apikey:<owner> (rate_limit can key on it)"
    )

    @field_validator("header", "owner_header")
    @classmethod
    def _header_names(cls, value: str | None) -> str | None:
        return None if value is None else _header_name(value)

    @field_validator("anonymous_prefixes")
    @classmethod
    def _prefixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            if not prefix.startswith("/"):
                raise ValueError(f"{prefix!r} must start with '/'")
        return value

    @model_validator(mode="after")
    def _unique_keys(self) -> ApiKeyConfig:
        digests = [k.sha256 for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("keys: the same sha256 is listed twice")
        return self
