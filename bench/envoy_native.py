"""What an operator would configure without a sidecar: Envoy's own ``jwt_authn`` and
``local_ratelimit`` filters, with the same keys and limits as the extproc scenarios.

* ``jwt_authn``: one provider (issuer, audience, the JWKS inline), every path requires it,
  ``sub`` copied into ``x-user`` (as our ``claim_to_headers``), verified tokens cached
  (``jwt_cache_config``: Envoy's counterpart of our token cache).
* ``local_ratelimit``: a token bucket per distinct ``x-user`` value (a descriptor entry with
  no value is a wildcard: each value gets its own bucket, ``max_dynamic_descriptors`` of them).
  The global bucket is far above any load. Limits are per Envoy process (no Redis): the
  native filter has no shared store, which is why it is the *floor*, not an equal.

Check the result with ``envoy --mode validate`` (``python -m bench.envoy_native``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NativeLimits", "jwt_authn_filter", "local_ratelimit_filter", "native_filters"]

_JWT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_RL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_ALWAYS = {"numerator": 100, "denominator": "HUNDRED"}


@dataclass(frozen=True, slots=True)
class NativeLimits:
    """A bucket of ``requests`` per ``period_s`` per user (refilled whole each period)."""

    requests: int
    period_s: int = 1
    max_users: int = 10_000


def jwt_authn_filter(
    issuer: str, audience: str, jwks: Mapping[str, Any], *, cache_size: int = 10_000
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _JWT_TYPE,
            "providers": {
                "idp": {
                    "issuer": issuer,
                    "audiences": [audience],
                    "local_jwks": {"inline_string": json.dumps(dict(jwks))},
                    "forward": True,
                    "claim_to_headers": [{"header_name": "x-user", "claim_name": "sub"}],
                    "jwt_cache_config": {"jwt_cache_size": cache_size},
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
        },
    }


def local_ratelimit_filter(limits: NativeLimits) -> dict[str, Any]:
    bucket = {
        "max_tokens": limits.requests,
        "tokens_per_fill": limits.requests,
        "fill_interval": f"{limits.period_s}s",
    }
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _RL_TYPE,
            "stat_prefix": "native_rl",
            "token_bucket": {
                "max_tokens": 1_000_000_000,
                "tokens_per_fill": 1_000_000_000,
                "fill_interval": "1s",
            },
            "filter_enabled": {"runtime_key": "native_rl_enabled", "default_value": _ALWAYS},
            "filter_enforced": {"runtime_key": "native_rl_enforced", "default_value": _ALWAYS},
            "descriptors": [{"entries": [{"key": "user"}], "token_bucket": bucket}],
            "max_dynamic_descriptors": limits.max_users,
            "rate_limits": [
                {
                    "actions": [
                        {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}
                    ]
                }
            ],
        },
    }


def native_filters(
    issuer: str, audience: str, jwks: Mapping[str, Any], limits: NativeLimits
) -> list[dict[str, Any]]:
    """The HTTP filters that go before the router, in order: authenticate, then limit."""
    return [jwt_authn_filter(issuer, audience, jwks), local_ratelimit_filter(limits)]


def _validate() -> None:  # pragma: no cover - a manual check
    import subprocess
    import tempfile

    import yaml

    from bench.stack import ListenerPlan, compose_bootstrap
    from extproc.testing.jwt import jwks_document, make_rsa_key
    from extproc.testing.processes import envoy_binary

    key = make_rsa_key("bench")
    filters = native_filters("https://issuer.bench/", "api", jwks_document([key]), NativeLimits(10))
    bootstrap = compose_bootstrap([ListenerPlan("native", filters=filters)])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(bootstrap, f)
        f.flush()
        done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", f.name], check=False)
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    _validate()
