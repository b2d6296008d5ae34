"""Redis over TLS (``rediss://``, ``redis.tls_*``) against a real redis-server with its TLS port
on: server verification, client certificates, and the rate limiter's exact counts through it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.plugin import Continue, Reject
from extproc.services.redis import RedisTls, make_redis
from extproc.services.redis_pipe import PipeSettings, RedisPipe
from extproc.testing.certs import CertFiles, make_certificates
from extproc.testing.context import make_plugin_context
from extproc.testing.redis_server import RedisServer
from plugins.rate_limit import RateLimitConfig, RateLimitPlugin
from tests.integration.test_rate_limit_redis import call

pytestmark = pytest.mark.redis


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return make_certificates(tmp_path / "pki")


@pytest.fixture
def mtls_redis(certs: CertFiles) -> Iterator[RedisServer]:
    with RedisServer(tls=certs, tls_auth_clients="yes") as server:
        yield server


def client_tls(certs: CertFiles, *, cert: bool = True, ca: Path | None = None) -> RedisTls:
    return RedisTls(
        ca_file=str(ca or certs.ca),
        cert_file=str(certs.client_cert) if cert else None,
        key_file=str(certs.client_key) if cert else None,
    )


async def ping(url: str, tls: RedisTls | None) -> bool:
    client = make_redis(url, tls=tls, socket_timeout=2.0, connect_timeout=2.0)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def test_tls_redis_needs_our_ca_and_a_client_certificate(
    mtls_redis: RedisServer, certs: CertFiles
) -> None:
    url = mtls_redis.tls_url
    assert url.startswith("rediss://127.0.0.1:")
    assert await ping(url, client_tls(certs))
    refused = {
        "no client certificate": client_tls(certs, cert=False),
        "server from another CA": client_tls(certs, ca=certs.other_ca),
    }
    for tls in refused.values():
        with pytest.raises(RedisConnectionError):
            await ping(url, tls)
    with socket.create_connection(("127.0.0.1", mtls_redis.tls_port), timeout=2) as plain:
        plain.sendall(b"PING\r\n")  # plaintext to the TLS port: no PONG
        plain.settimeout(2)
        with contextlib.suppress(TimeoutError, ConnectionError):  # or closed: no PONG either
            assert b"PONG" not in plain.recv(100)


async def test_the_pipelined_connection_speaks_mutual_tls(
    mtls_redis: RedisServer, certs: CertFiles
) -> None:
    def pipe(tls: RedisTls) -> RedisPipe:
        client = make_redis(mtls_redis.tls_url, tls=tls, socket_timeout=2.0, connect_timeout=2.0)
        settings = PipeSettings.from_client(client)
        assert settings is not None and settings.tls is not None
        return RedisPipe(settings)

    good = pipe(client_tls(certs))
    try:
        assert await good.execute("PING") == b"PONG"
        assert await good.execute("INCR", "n") == 1
    finally:
        await good.aclose()
    for tls in (client_tls(certs, cert=False), client_tls(certs, ca=certs.other_ca)):
        bad = pipe(tls)
        try:
            with pytest.raises((OSError, ConnectionError)):
                await bad.execute("PING")
        finally:
            await bad.aclose()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipe", "pool"])
async def test_rate_limit_counts_exactly_over_tls_redis(
    mtls_redis: RedisServer, certs: CertFiles, pipelined: bool
) -> None:
    """Over TLS too, through the pipelined connection (the default) or redis-py's pool."""
    rule = {"name": "k", "key": ["header:x-api-key"], "fail": "closed",
            "limits": [{"requests": 3, "per": "day"}]}  # fmt: skip
    cfg = RateLimitConfig.model_validate({"rules": [rule], "redis_pipeline": pipelined})
    redis = make_redis(
        mtls_redis.tls_url, tls=client_tls(certs), socket_timeout=1.0, connect_timeout=1.0
    )
    ctx = make_plugin_context("rate_limit", cfg, redis=redis)
    plugin = RateLimitPlugin(cfg)
    await plugin.initialize(ctx)
    try:
        assert plugin._redis is not None and plugin._redis.pipelined is pipelined
        results = [(await call(plugin, budget=1.0, key="tls-client"))[0] for _ in range(5)]
        assert [type(r) for r in results] == [Continue] * 3 + [Reject] * 2
        assert all(r.status == 429 for r in results[3:] if isinstance(r, Reject))
        # Redis decided: 3 grants and the first denial (the next one came from the plugin's
        # over-limit cache); the script was loaded at initialize, so no EVAL was needed
        assert (mtls_redis.calls("evalsha"), mtls_redis.calls("eval")) == (4, 0)
    finally:
        await plugin.shutdown()
        await ctx.http.aclose()
        await redis.aclose()
