"""The Redis client the server puts into ``PluginContext.redis``: redis-py asyncio with defaults
that suit a per-request budget of milliseconds.

redis-py's own defaults work against a budget: it retries failed commands (three times, with
backoff), may retry on timeouts, and waits for sockets without bound unless told. Here:

* **no retries** (``Retry(NoBackoff(), 0)``): a failed call fails at once and the caller's
  failure policy answers; retrying belongs to the next request, not to this one;
* **short socket timeouts** (``socket_timeout`` / ``socket_connect_timeout``, default 250 ms, at
  most 5 s): an upper bound only - callers still wrap each call in ``asyncio.timeout`` cut to
  what is left of their budget (:func:`extproc.context.time_left`);
* **a connection whose command timed out or was cancelled is dropped, never reused**: redis-py
  disconnects a connection on any exception (cancellation included) while it sends or reads, so
  a late reply can never be read as the answer to the next command (our integration tests check
  this with a paused server);
* a **bounded pool** (``max_connections``, default 16): past it, a call fails at once instead of
  opening sockets without end;
* no ``CLIENT SETINFO`` round trips on connect, no periodic health-check ``PING``.

Credentials never sit in the configuration: ``username_ref`` / ``password_ref`` are secret
references (``env:NAME`` or ``file:/path``) resolved through :class:`Secrets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from extproc.services.secrets import Secrets

__all__ = ["RedisTls", "make_redis"]

_MAX_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RedisTls:
    """TLS to Redis (``rediss://`` URLs, or any URL with this given)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True
    verify: bool = True


def make_redis(
    url: str,
    *,
    secrets: Secrets | None = None,
    username_ref: str | None = None,
    password_ref: str | None = None,
    tls: RedisTls | None = None,
    socket_timeout: float = 0.25,
    connect_timeout: float = 0.25,
    max_connections: int = 16,
    client_name: str | None = None,
) -> Redis:
    """A client for ``url``: ``redis://host:port/db``, ``rediss://...`` (TLS),
    ``unix:///path/redis.sock`` or a bare socket path (``/path/redis.sock``).

    Nothing connects here: the first command opens the first connection. Close the client with
    ``await client.aclose()``.
    """
    if not 0 < socket_timeout <= _MAX_TIMEOUT or not 0 < connect_timeout <= _MAX_TIMEOUT:
        raise ValueError(f"Redis timeouts must be in (0, {_MAX_TIMEOUT}] seconds")
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    if url.startswith("/"):
        url = "unix://" + url
    scheme = url.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r} (redis, rediss, unix)")
    resolver = secrets if secrets is not None else Secrets()
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        "health_check_interval": 0,
        "driver_info": None,
        "client_name": client_name,
    }
    if scheme != "unix":
        options["socket_keepalive"] = True
    if username_ref is not None:
        options["username"] = resolver.get(username_ref)
    if password_ref is not None:
        options["password"] = resolver.get(password_ref)
    if tls is not None or scheme == "rediss":
        if scheme == "unix":
            raise ValueError("TLS does not apply to a Unix socket")
        tls = tls or RedisTls()
        if scheme == "redis":
            url = "rediss" + url[len("redis") :]
        options.update(
            ssl_ca_certs=tls.ca_file,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
            ssl_check_hostname=tls.check_hostname and tls.verify,
            ssl_cert_reqs="required" if tls.verify else "none",
        )
    client: Redis = Redis.from_url(url, **options)
    return client
