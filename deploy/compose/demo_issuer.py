"""DEMO ONLY - a toy token issuer for the docker compose stack. Never deploy it.

It mints RS256 tokens for whoever asks, with whatever subject they ask for: it exists so that
the jwt_auth plugin in ``deploy/compose/extproc.yaml`` has a JWKS to fetch and you have tokens
to try. The signing key is generated at start and lives only in memory (a restart rotates it;
the sidecar refetches the JWKS when it sees the new ``kid``).

    GET /.well-known/jwks.json           the public key set
    GET /token?sub=alice[&scope=read][&tier=gold][&ttl=600]
                                         {"access_token": "...", "token_type": "Bearer", ...}
    GET /healthz                         ok

Settings (environment): DEMO_ISSUER (the ``iss`` claim), DEMO_AUDIENCE (``aud``),
DEMO_ISSUER_LISTEN (host:port, default 0.0.0.0:9000).

Uses PyJWT and cryptography, both dependencies of the sidecar image it runs in.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = os.environ.get("DEMO_ISSUER", "extproc-demo-issuer")
AUDIENCE = os.environ.get("DEMO_AUDIENCE", "extproc-demo")
LISTEN = os.environ.get("DEMO_ISSUER_LISTEN", "0.0.0.0:9000")
MAX_TTL_S = 86_400
_SAFE = re.compile(r"^[A-Za-z0-9_.@:+ -]{1,128}$")


class DemoKey:
    """One RSA key with its ``kid``, generated in memory."""

    def __init__(self) -> None:
        self.kid = f"demo-{uuid.uuid4().hex[:12]}"
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def mint(self, sub: str, scope: str | None, tier: str | None, ttl: int) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
        }
        if scope:
            claims["scope"] = scope
        if tier:
            claims["tier"] = tier
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": self.kid})


KEY = DemoKey()


class Handler(BaseHTTPRequestHandler):
    server_version = "extproc-demo-issuer"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/.well-known/jwks.json":
            self._json(200, KEY.jwks(), cache="public, max-age=300")
        elif url.path == "/token":
            self._token(parse_qs(url.query))
        elif url.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._json(404, {"error": "not_found"})

    def _token(self, query: dict[str, list[str]]) -> None:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[0] if values else None

        sub = one("sub") or "alice"
        scope, tier = one("scope"), one("tier")
        for value in (sub, scope, tier):
            if value is not None and not _SAFE.match(value):
                self._json(400, {"error": "invalid_request", "detail": "unexpected characters"})
                return
        try:
            ttl = min(max(int(one("ttl") or 600), 1), MAX_TTL_S)
        except ValueError:
            self._json(400, {"error": "invalid_request", "detail": "ttl must be an integer"})
            return
        token = KEY.mint(sub, scope, tier, ttl)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": ttl, "demo": True}
        self._json(200, body, cache="no-store")

    def _json(self, status: int, body: Any, cache: str = "no-store") -> None:
        self._send(status, json.dumps(body).encode() + b"\n", "application/json", cache)

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", cache)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"demo-issuer {self.address_string()} {format % args}\n")


def main() -> None:
    host, _, port = LISTEN.rpartition(":")
    httpd = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    print(
        f"DEMO token issuer (not for production) on {LISTEN}: iss={ISSUER!r} aud={AUDIENCE!r} "
        f"kid={KEY.kid}",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
