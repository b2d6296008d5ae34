"""Test helpers for anything that verifies JWTs: keys, a token factory (including the classic
attacks), and a real local JWKS HTTP server with controllable misbehaviour.

Usage::

    key = make_rsa_key("k1")
    tokens = TokenFactory(key, issuer="https://issuer.test", audience="api")
    async with JwksServer([key]) as jwks:
        ...  # configure the plugin with jwks.url
        token = tokens.mint({"sub": "alice"})
        jwks.rotate([make_ec_key("k2")])
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

__all__ = [
    "JwksServer",
    "KeyPair",
    "TokenFactory",
    "b64url",
    "make_ec_key",
    "make_ed25519_key",
    "make_rsa_key",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_b64(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


@dataclass(frozen=True)
class KeyPair:
    """A signing key with its ``kid`` and the one algorithm it is used with."""

    kid: str
    alg: str
    private_key: PrivateKey

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def public_pem(self) -> bytes:
        pem: bytes = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def jwk(self, *, with_alg: bool = True, **extra: Any) -> dict[str, Any]:
        """The public JWK (``kid``, ``use: sig`` and, unless ``with_alg=False``, ``alg``)."""
        pub = self.public_key
        if isinstance(pub, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(pub, as_dict=True)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            data = ECAlgorithm.to_jwk(pub, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(pub, as_dict=True)
        data = dict(data)
        data["kid"] = self.kid
        data["use"] = "sig"
        if with_alg:
            data["alg"] = self.alg
        data.update(extra)
        return data


def make_rsa_key(kid: str | None = None, *, bits: int = 2048, alg: str = "RS256") -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return KeyPair(kid or f"rsa-{uuid.uuid4().hex[:8]}", alg, key)


def make_ec_key(kid: str | None = None, *, alg: str = "ES256") -> KeyPair:
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
    return KeyPair(kid or f"ec-{uuid.uuid4().hex[:8]}", alg, ec.generate_private_key(curve))


def make_ed25519_key(kid: str | None = None) -> KeyPair:
    return KeyPair(
        kid or f"ed-{uuid.uuid4().hex[:8]}", "EdDSA", ed25519.Ed25519PrivateKey.generate()
    )


def jwks_document(keys: Iterable[KeyPair | Mapping[str, Any]]) -> dict[str, Any]:
    return {"keys": [k.jwk() if isinstance(k, KeyPair) else dict(k) for k in keys]}


class TokenFactory:
    """Mints tokens for one key (override per call), with standard claims filled in.

    ``mint`` sets ``iss``, ``aud``, ``iat``, ``nbf`` and ``exp`` (``lifetime`` seconds from the
    factory's clock) unless given or listed in ``omit``.
    """

    def __init__(
        self,
        key: KeyPair,
        *,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        lifetime: float = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self.clock = clock

    def claims(
        self, claims: Mapping[str, Any] | None = None, *, omit: Iterable[str] = ()
    ) -> dict[str, Any]:
        now = int(self.clock())
        out: dict[str, Any] = {"sub": "user-1", "iat": now, "nbf": now}
        out["exp"] = now + int(self.lifetime)
        if self.issuer is not None:
            out["iss"] = self.issuer
        if self.audience is not None:
            out["aud"] = self.audience if isinstance(self.audience, str) else list(self.audience)
        out.update(claims or {})
        for name in omit:
            out.pop(name, None)
        return out

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        key: KeyPair | None = None,
        kid: str | None = None,
        alg: str | None = None,
        headers: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
        no_kid: bool = False,
    ) -> str:
        key = key or self.key
        alg = alg or key.alg
        hdr: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": kid or key.kid}
        if no_kid:
            hdr.pop("kid")
        hdr.update(headers or {})  # anything goes, even headers a library would refuse
        signing_input = f"{_json_b64(hdr)}.{_json_b64(self.claims(claims, omit=omit))}"
        signature = get_default_algorithms()[alg].sign(signing_input.encode(), key.private_key)
        return f"{signing_input}.{b64url(signature)}"

    def raw(self, header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes) -> str:
        """A token from parts, signed or not as the caller decides."""
        return f"{_json_b64(header)}.{_json_b64(payload)}.{b64url(signature)}"

    # ------------------------------------------------------------------ attacks

    def alg_none(self, claims: Mapping[str, Any] | None = None, *, alg: str = "none") -> str:
        """An unsigned token (``alg: none``; try ``"None"``/``"NONE"`` too)."""
        header = {"alg": alg, "typ": "JWT", "kid": self.key.kid}
        return f"{_json_b64(header)}.{_json_b64(self.claims(claims))}."

    def hs256_with_public_key(self, claims: Mapping[str, Any] | None = None) -> str:
        """Algorithm confusion: HMAC-SHA256 keyed with the issuer's public key (PEM), the bytes
        a naive verifier would hand to HMAC."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.key.kid}
        signing_input = f"{_json_b64(header)}.{_json_b64(self.claims(claims))}"
        sig = hmac.new(self.key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(sig)}"

    def tampered_payload(self, claims: Mapping[str, Any] | None = None, **changes: Any) -> str:
        """A validly signed token whose payload was replaced afterwards."""
        token = self.mint(claims)
        header, payload, sig = token.split(".")
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        body.update(changes or {"sub": "admin"})
        return f"{header}.{_json_b64(body)}.{sig}"

    def truncated_signature(self, claims: Mapping[str, Any] | None = None, cut: int = 4) -> str:
        token = self.mint(claims)
        return token[:-cut]


# ---------------------------------------------------------------------- JWKS server


class JwksServer:
    """A real HTTP/1.1 server on 127.0.0.1 (port from the OS) serving a JWKS document.

    Behaviour is switched at runtime: :meth:`rotate` the keys, :meth:`down` (``"refused"``
    closes the listening socket, ``"503"`` answers 503), :meth:`slow`, :meth:`garbage`,
    :meth:`hold` (requests wait until :meth:`release`). ``fetches`` counts requests served
    (any status); :meth:`wait_for_fetches` awaits a count without sleeping.
    """

    def __init__(
        self,
        keys: Iterable[KeyPair | Mapping[str, Any]] = (),
        *,
        path: str = "/.well-known/jwks.json",
        cache_control: str | None = None,
        port: int = 0,
    ) -> None:
        self.path = path
        self.cache_control = cache_control
        self._document = jwks_document(keys)
        self._body_override: bytes | None = None
        self._status = 200
        self._delay = 0.0
        self._server: asyncio.Server | None = None
        self._port = port
        self._gate = asyncio.Event()
        self._gate.set()
        self._changed = asyncio.Condition()
        self._refused = False
        self.fetches = 0
        self.requests_seen: list[str] = []

    # lifecycle ---------------------------------------------------------------------

    async def start(self) -> JwksServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._gate.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> JwksServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{self.path}"

    # behaviour ---------------------------------------------------------------------

    def rotate(self, keys: Iterable[KeyPair | Mapping[str, Any]]) -> None:
        self._document = jwks_document(keys)

    def serve(self, document: Any) -> None:
        """Serve any JSON document (or raw bytes) as the body."""
        self._body_override = document if isinstance(document, bytes) else None
        if not isinstance(document, bytes):
            self._document = document

    def garbage(self, body: bytes = b"<html>502 bad gateway</html>") -> None:
        self._body_override = body

    async def down(self, mode: str = "refused") -> None:
        if mode == "refused":
            self._refused = True
            if self._server is not None:
                self._server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2.0)
                self._server = None
        else:
            self._status = int(mode)

    async def up(self) -> None:
        """Undo :meth:`down`, :meth:`garbage` and :meth:`slow`."""
        self._status = 200
        self._body_override = None
        self._delay = 0.0
        if self._refused:
            self._refused = False
            await self.start()

    def slow(self, seconds: float) -> None:
        self._delay = seconds

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def wait_for_fetches(self, n: int, timeout_s: float = 5.0) -> None:
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.fetches >= n)

        await asyncio.wait_for(_wait(), timeout_s)

    # serving -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            while True:  # drain the request headers
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
            self.requests_seen.append(request_line.decode("latin-1").strip())
            async with self._changed:
                self.fetches += 1
                self._changed.notify_all()
            await self._gate.wait()
            if self._delay:
                await asyncio.sleep(self._delay)
            status = self._status
            if status != 200:
                body = b'{"error":"unavailable"}'
            elif self._body_override is not None:
                body = self._body_override
            else:
                body = json.dumps(self._document).encode()
            head = [f"HTTP/1.1 {status} X", "content-type: application/json"]
            head.append(f"content-length: {len(body)}")
            head.append("connection: close")
            if self.cache_control:
                head.append(f"cache-control: {self.cache_control}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
