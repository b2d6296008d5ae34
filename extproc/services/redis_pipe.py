"""A pipelined Redis connection for hot, fixed command shapes (the rate limiter's script).

redis-py takes a connection from its pool, sends, reads through a stream reader and gives the
connection back for every command; a round trip costs ~60 µs of client CPU in a tight loop and
more under load (measured in ``bench/``). :class:`RedisPipe` keeps one connection, writes each
command as it comes and matches replies to callers in order (Redis answers a connection's
commands in order), parsing with hiredis' C reader. A round trip is one ``write`` and one
``data_received``: no task, no pool. :meth:`RedisPipe.send_nowait` goes further for a caller
that can take its reply in a callback: the callback runs in ``data_received`` itself, so the
reply reaches its caller in the loop turn that read it, not one turn later through a future
and the awaiting task's wake-up.

What it keeps from :mod:`extproc.services.redis`:

* **a late reply never reaches the wrong caller**: a caller that stops waiting (timeout,
  cancellation) leaves its slot in the queue; its reply, when it comes, is read and dropped;
* **a connection that stopped answering is replaced**: when the oldest unanswered command is
  older than ``stale_after`` (the client's socket timeout), the next command closes the
  connection (every waiter fails) and opens a new one; a closed connection fails every waiter
  at once and the next command reconnects;
* **bounded**: at most ``max_pending`` unanswered commands; past that a command fails at once;
* the same connection settings: host and port or Unix socket, database, username and password,
  client name, connect timeout, and TLS (``rediss://``: CA file, client certificate and key,
  hostname check, verification on or off) - read from the redis-py client's pool
  (:meth:`PipeSettings.from_client`). Credential providers, other TLS options and other
  connection classes are not handled here: ``from_client`` returns ``None`` and the caller
  keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import hiredis

from extproc.services.redis import RedisTls

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "OnReply",
    "PendingReply",
    "PipeSettings",
    "RedisPipe",
    "ReplyError",
    "pack_command",
    "tls_context",
]

log = logging.getLogger("extproc.redis_pipe")


class ReplyError(Exception):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


_CONNECTIONS: Final = frozenset({"Connection", "UnixDomainSocketConnection", "SSLConnection"})
#: connection_kwargs of redis-py that this module either applies or may ignore safely
_UNDERSTOOD: Final = frozenset(
    {
        "host", "port", "path", "db", "username", "password", "client_name",
        "socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry",
        "health_check_interval", "driver_info", "himport_registry",
        "maint_notifications_pool_handler", "maint_notifications_config",
        "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout",
        "encoding", "encoding_errors", "decode_responses",
        "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "ssl_cert_reqs",
    }
)  # fmt: skip


def tls_context(tls: RedisTls) -> ssl.SSLContext:
    """A client context for ``tls``, as redis-py's ``SSLConnection`` makes it from the same
    options (made at each connect: rotated client certificates apply to the next connection).
    No ``ca_file``: the system's CAs."""
    context = ssl.create_default_context(cafile=tls.ca_file)
    context.check_hostname = tls.check_hostname and tls.verify
    if not tls.verify:
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


@dataclass(frozen=True, slots=True)
class PipeSettings:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    connect_timeout: float = 0.25
    #: an unanswered command this old (seconds) marks the connection as dead
    stale_after: float = 0.25
    keepalive: bool = True
    #: TLS (``rediss://``), or None
    tls: RedisTls | None = None

    @classmethod
    def from_client(cls, redis: Redis) -> PipeSettings | None:
        """The settings of ``redis``'s connections, or ``None`` when they use something this
        module does not do (a credential provider, a TLS option beyond those of
        :class:`~extproc.services.redis.RedisTls`, an unknown option)."""
        pool = getattr(redis, "connection_pool", None)
        kwargs: dict[str, Any] | None = getattr(pool, "connection_kwargs", None)
        if pool is None or kwargs is None:
            return None
        if type(pool).__name__ != "ConnectionPool":  # e.g. a blocking or sentinel pool
            return None
        if pool.connection_class.__name__ not in _CONNECTIONS:
            return None
        if set(kwargs) - _UNDERSTOOD:
            return None
        path = kwargs.get("path")
        timeout = kwargs.get("socket_timeout") or 0.25
        tls = None
        if pool.connection_class.__name__ == "SSLConnection":
            reqs = kwargs.get("ssl_cert_reqs", "required")
            if reqs not in ("required", "none", ssl.CERT_REQUIRED, ssl.CERT_NONE):
                return None  # "optional": not a mode a client should run in; redis-py decides
            tls = RedisTls(
                ca_file=kwargs.get("ssl_ca_certs"),
                cert_file=kwargs.get("ssl_certfile"),
                key_file=kwargs.get("ssl_keyfile"),
                check_hostname=bool(kwargs.get("ssl_check_hostname", True)),
                verify=reqs in ("required", ssl.CERT_REQUIRED),
            )
        return cls(
            host=str(kwargs.get("host", "127.0.0.1")),
            port=int(kwargs.get("port", 6379)),
            path=str(path) if path else None,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            client_name=kwargs.get("client_name"),
            connect_timeout=float(kwargs.get("socket_connect_timeout") or timeout),
            stale_after=float(timeout),
            keepalive=bool(kwargs.get("socket_keepalive", False)),
            tls=tls,
        )


def _arg(value: str | bytes | int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(int(value)).encode()


def pack_command(*args: str | bytes | int) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        data = _arg(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


#: a :meth:`RedisPipe.send_nowait` callback: ``(reply, None)`` or ``(None, error)``; an error
#: reply is a :class:`ReplyError`, a lost connection a ``ConnectionError``
OnReply = Callable[[Any, BaseException | None], None]


class PendingReply:
    """A command sent with :meth:`RedisPipe.send_nowait`: its reply goes to ``on_reply``, once,
    from ``data_received`` (or the connection's end). :meth:`cancel` stops waiting: the reply
    is still read when it comes, and dropped. Quacks like the futures in the connection's queue
    (``done``, ``set_result``, ``set_exception``)."""

    __slots__ = ("_on_reply",)

    def __init__(self, on_reply: OnReply) -> None:
        self._on_reply: OnReply | None = on_reply

    def done(self) -> bool:
        return self._on_reply is None

    def cancel(self) -> None:
        self._on_reply = None

    def set_result(self, reply: Any) -> None:
        self._deliver(reply, None)

    def set_exception(self, exc: BaseException) -> None:
        self._deliver(None, exc)

    def _deliver(self, reply: Any, exc: BaseException | None) -> None:
        on_reply, self._on_reply = self._on_reply, None
        if on_reply is None:
            return
        try:
            on_reply(reply, exc)
        except Exception:  # it runs inside data_received: never let it end the connection
            log.exception("Redis reply callback failed")


class _Protocol(asyncio.Protocol):
    """One connection: commands out in order, replies back to their waiters in order."""

    def __init__(self, on_lost: Callable[[_Protocol], None]) -> None:
        self._on_lost = on_lost
        self._reader = hiredis.Reader(replyError=ReplyError)
        #: (waiter, sent at) per unanswered command, oldest first
        self.waiters: collections.deque[tuple[asyncio.Future[Any] | PendingReply, float]] = (
            collections.deque()
        )
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport; they behave as one
        self.transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = loop.create_future()
        self.waiters.append((future, loop.time()))
        assert self.transport is not None
        self.transport.write(payload)
        return future

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while (reply := reader.gets()) is not False:
                if not waiters:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                future, _ = waiters.popleft()
                if future.done():  # its caller gave up: the late reply is dropped here
                    continue
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.abort(ConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionError("Redis connection lost") if exc is None else exc)

    def abort(self, exc: Exception) -> None:
        self._fail_all(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            self._on_lost(self)
        while self.waiters:
            future, _ = self.waiters.popleft()
            if not future.done():
                if not isinstance(exc, ConnectionError):
                    exc = ConnectionError(f"Redis connection lost: {exc!r}")
                future.set_exception(exc)


class RedisPipe:
    """One pipelined connection, opened on first use and reopened after it is lost."""

    def __init__(self, settings: PipeSettings, *, max_pending: int = 1024) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.settings = settings
        self.max_pending = max_pending
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False
        #: connections opened (read by tests and metrics)
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    async def execute(self, *args: str | bytes | int) -> Any:
        """Send one command and wait for its reply. Raises :class:`ReplyError` for an error
        reply, ``ConnectionError`` / ``OSError`` / ``TimeoutError`` when Redis cannot be
        reached; the caller bounds the wait (``asyncio.timeout``)."""
        return await self.execute_packed(pack_command(*args))

    async def execute_packed(self, payload: bytes) -> Any:
        loop = asyncio.get_running_loop()
        proto = self._open(loop)
        if proto is None:
            proto = await self._connection()
        else:
            self._check_pending(proto)
        return await proto.send(payload, loop)

    def usable(self) -> bool:
        """Is there an open connection that :meth:`send_nowait` can send on now? (A connection
        that stopped answering is closed here, as the next command would close it.)"""
        return self._open(asyncio.get_running_loop()) is not None

    def send_nowait(self, payload: bytes, on_reply: OnReply) -> PendingReply | None:
        """Send a packed command now; its reply (or error) goes to ``on_reply``, called from
        the read that brings it. ``None``: there is no open connection to send on (none yet,
        lost, or just closed as stale): use :meth:`execute_packed`, which opens one. Raises
        ``ConnectionError`` when ``max_pending`` commands wait. The caller bounds the wait
        (:meth:`PendingReply.cancel` at its deadline)."""
        loop = asyncio.get_running_loop()
        proto = self._open(loop)
        if proto is None:
            return None
        self._check_pending(proto)
        pending = PendingReply(on_reply)
        proto.waiters.append((pending, loop.time()))
        assert proto.transport is not None
        proto.transport.write(payload)
        return pending

    def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol | None:
        """The open connection to send on, or ``None`` (none, lost, or closed now as stale)."""
        proto = self._proto
        if proto is None or proto.closed:
            return None
        waiters = proto.waiters
        if waiters and loop.time() - waiters[0][1] > self.settings.stale_after:
            proto.abort(ConnectionError("Redis stopped answering on this connection"))
            return None
        return proto

    def _check_pending(self, proto: _Protocol) -> None:
        if len(proto.waiters) >= self.max_pending:
            raise ConnectionError("too many Redis commands waiting for a reply")

    async def _connection(self) -> _Protocol:
        if self._closed:
            raise ConnectionError("the Redis pipe is closed")
        if self._connecting is None:
            task = asyncio.get_running_loop().create_task(self._connect())
            self._connecting = task
            task.add_done_callback(self._connected)
        # callers that give up do not cancel the connect: it is bounded by connect_timeout
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._proto = task.result()

    async def _connect(self) -> _Protocol:
        s = self.settings
        loop = asyncio.get_running_loop()

        def lost(proto: _Protocol) -> None:
            if self._proto is proto:
                self._proto = None

        transport: asyncio.Transport | None = None
        handshake: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(s.connect_timeout):
                if s.path is not None:
                    made = await loop.create_unix_connection(lambda: _Protocol(lost), s.path)
                else:
                    made = await loop.create_connection(
                        lambda: _Protocol(lost),
                        s.host,
                        s.port,
                        ssl=tls_context(s.tls) if s.tls is not None else None,
                    )
                proto = made[1]
                transport = proto.transport
                sock = made[0].get_extra_info("socket")
                if sock is not None and s.keepalive and s.path is None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if s.password is not None:
                    auth = ("AUTH", s.username, s.password) if s.username else ("AUTH", s.password)
                    handshake.append(proto.send(pack_command(*auth), loop))
                if s.db:
                    handshake.append(proto.send(pack_command("SELECT", s.db), loop))
                if s.client_name:
                    handshake.append(
                        proto.send(pack_command("CLIENT", "SETNAME", s.client_name), loop)
                    )
                for step in handshake:
                    await step
        except BaseException:
            for step in handshake:  # the replies nobody will read (e.g. after a failed AUTH)
                step.cancel()
            if transport is not None:
                transport.abort()
            raise
        self.connects += 1
        if self._closed:
            proto.abort(ConnectionError("the Redis pipe is closed"))
            raise ConnectionError("the Redis pipe is closed")
        return proto

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._proto is not None:
            self._proto.abort(ConnectionError("the Redis pipe is closed"))
            self._proto = None
