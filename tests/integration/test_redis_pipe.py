"""The pipelined Redis connection against a real redis-server: replies reach their own callers
(also after a caller gave up), a stopped or restarted server is noticed, settings are taken
from the redis-py client they mirror."""

from __future__ import annotations

import asyncio

import pytest

from extproc.services.redis import RedisTls, make_redis
from extproc.services.redis_pipe import (
    PipeSettings,
    RedisPipe,
    ReplyError,
    pack_command,
)
from extproc.testing.redis_server import RedisServer

pytestmark = pytest.mark.redis


def _settings(server: RedisServer, **kw: object) -> PipeSettings:
    base = {"host": "127.0.0.1", "port": server.port, "connect_timeout": 2.0, "stale_after": 2.0}
    return PipeSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_pack_command_is_resp() -> None:
    assert pack_command("SET", "k", 12, b"\x00v") == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"
    )


async def test_concurrent_commands_get_their_own_replies() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            replies = await asyncio.gather(*(pipe.execute("ECHO", f"v{i}") for i in range(300)))
            assert replies == [f"v{i}".encode() for i in range(300)]
            assert pipe.connects == 1  # one connection carried them all
            assert await pipe.execute("INCRBY", "n", 5) == 5
            await pipe.execute("SET", "s", "x")
            with pytest.raises(ReplyError, match="not an integer"):
                await pipe.execute("INCR", "s")
            assert await pipe.execute("GET", "s") == b"x"  # an error reply keeps the order
        finally:
            await pipe.aclose()


async def test_a_late_reply_is_dropped_never_given_to_the_next_caller() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            await pipe.execute("SET", "k", "old")
            server.pause()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await pipe.execute("GET", "k")  # answered "old" once Redis runs again
            server.resume()
            await pipe.execute("SET", "k", "new")
            assert await pipe.execute("GET", "k") == b"new"
            assert pipe.connects == 1  # the connection was kept: no reconnect was needed
        finally:
            server.resume()
            await pipe.aclose()


async def test_a_connection_that_stopped_answering_is_replaced() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server, stale_after=0.1))
        try:
            await pipe.execute("PING")
            server.pause()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.15):
                    await pipe.execute("PING")
            await asyncio.sleep(0.05)  # now the unanswered PING is older than stale_after
            pending = asyncio.ensure_future(pipe.execute("ECHO", "after"))
            await asyncio.sleep(0.05)
            server.resume()
            assert await asyncio.wait_for(pending, 2.0) == b"after"
            assert pipe.connects == 2
        finally:
            server.resume()
            await pipe.aclose()


async def test_a_restarted_server_is_reconnected_without_a_failed_command() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            assert await pipe.execute("PING") == b"PONG"
            await asyncio.to_thread(server.restart)
            await asyncio.sleep(0.05)  # the loop reads the close of the idle connection
            assert not pipe.connected
            assert await pipe.execute("PING") == b"PONG"
            assert pipe.connects == 2
        finally:
            await pipe.aclose()


async def test_waiters_fail_at_once_when_the_server_goes_away() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            await pipe.execute("PING")
            server.pause()
            pending = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(3)]
            await asyncio.sleep(0.05)
            server.kill()
            results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2.0)
            assert all(isinstance(r, ConnectionError) for r in results), results
            with pytest.raises(OSError):  # ConnectionRefusedError: nothing listens now
                await pipe.execute("PING")
        finally:
            await pipe.aclose()


async def test_bounded_pending_commands() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server), max_pending=2)
        try:
            await pipe.execute("PING")
            server.pause()
            pending = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(2)]
            await asyncio.sleep(0.01)
            with pytest.raises(ConnectionError, match="too many"):
                await pipe.execute("PING")
            server.resume()
            assert await asyncio.wait_for(asyncio.gather(*pending), 2.0) == [b"PONG"] * 2
        finally:
            server.resume()
            await pipe.aclose()


async def test_settings_come_from_the_redis_py_client_auth_and_db_included() -> None:
    with RedisServer(unix_socket=True) as server:
        server.command("ACL", "SETUSER", "svc", "on", ">s3cret", "~*", "+@all")
        server.command("CONFIG", "SET", "requirepass", "default-pw")
        admin = make_redis(server.url)
        client = make_redis(server.url.replace("/0", "/3"), client_name="extproc-test")
        client.connection_pool.connection_kwargs.update(username="svc", password="s3cret")
        settings = PipeSettings.from_client(client)
        assert settings is not None
        assert (settings.port, settings.db, settings.username) == (server.port, 3, "svc")
        assert settings.client_name == "extproc-test"
        pipe = RedisPipe(settings)
        try:
            await pipe.execute("SET", "where", "db3")
            assert await pipe.execute("CLIENT", "GETNAME") == b"extproc-test"
            assert await pipe.execute("ACL", "WHOAMI") == b"svc"
            admin.connection_pool.connection_kwargs.update(password="default-pw")
            assert await admin.execute_command("GET", "where") is None  # db 0
            await admin.execute_command("SELECT", 3)
        finally:
            await pipe.aclose()
            await admin.aclose()
            await client.aclose()

        assert server.socket_path is not None
        unix = PipeSettings.from_client(make_redis(server.socket_path))
        assert unix is not None and unix.path == server.socket_path
        pipe = RedisPipe(PipeSettings(path=server.socket_path, password="default-pw"))
        try:
            assert await pipe.execute("PING") == b"PONG"
        finally:
            await pipe.aclose()

        bad = RedisPipe(_settings(server, password="wrong"))
        with pytest.raises(ReplyError, match=r"WRONGPASS|invalid"):
            await bad.execute("PING")
        await bad.aclose()


def test_tls_settings_are_taken_and_unknown_options_stay_with_redis_py() -> None:
    tls = RedisTls(ca_file="/ca.pem", cert_file="/c.pem", key_file="/k.pem")
    settings = PipeSettings.from_client(make_redis("rediss://h:1/0", tls=tls))
    assert settings is not None and (settings.host, settings.port) == ("h", 1)
    assert settings.tls == tls
    unverified = make_redis("rediss://h:1/0", tls=RedisTls(verify=False))
    insecure = PipeSettings.from_client(unverified)
    assert insecure is not None and insecure.tls == RedisTls(check_hostname=False, verify=False)
    assert PipeSettings.from_client(make_redis("redis://h:1/0")).tls is None  # type: ignore[union-attr]
    for option, value in (("credential_provider", object()), ("ssl_ca_data", "PEM")):
        client = make_redis("rediss://127.0.0.1:1/0")
        client.connection_pool.connection_kwargs[option] = value
        assert PipeSettings.from_client(client) is None, option


async def test_a_closed_pipe_refuses_commands() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        await pipe.execute("PING")
        await pipe.aclose()
        with pytest.raises(ConnectionError, match="closed"):
            await pipe.execute("PING")


def test_the_same_under_uvloop() -> None:
    """The sidecar runs on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def scenario(server: RedisServer) -> None:
        pipe = RedisPipe(_settings(server, client_name="on-uvloop", db=2))
        try:
            replies = await asyncio.gather(*(pipe.execute("ECHO", f"v{i}") for i in range(50)))
            assert replies == [f"v{i}".encode() for i in range(50)]
            await asyncio.to_thread(server.restart)
            await asyncio.sleep(0.05)
            assert await pipe.execute("CLIENT", "GETNAME") == b"on-uvloop"
            assert pipe.connects == 2
        finally:
            await pipe.aclose()

    with RedisServer() as server:
        uvloop.run(scenario(server))


class Replies:
    """Collects send_nowait callbacks: (reply, error) in the order they came."""

    def __init__(self) -> None:
        self.got: list[tuple[object, BaseException | None]] = []
        self.arrived = asyncio.Event()

    def __call__(self, reply: object, exc: BaseException | None) -> None:
        self.got.append((reply, exc))
        self.arrived.set()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(2.0):
            while len(self.got) < n:
                self.arrived.clear()
                await self.arrived.wait()


async def test_send_nowait_hands_each_reply_to_its_callback_in_the_read() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            replies = Replies()
            assert pipe.send_nowait(pack_command("PING"), replies) is None  # nothing open yet
            await pipe.execute("SET", "s", "x")
            for command in (("ECHO", "a"), ("INCR", "s"), ("ECHO", "b")):
                assert pipe.send_nowait(pack_command(*command), replies) is not None
            # interleaved with awaited commands, each reply still reaches its own caller
            assert await pipe.execute("GET", "s") == b"x"
            await replies.wait(3)
            assert replies.got[0] == (b"a", None)
            assert replies.got[1][0] is None
            assert isinstance(replies.got[1][1], ReplyError)
            assert replies.got[2] == (b"b", None)
            assert pipe.connects == 1
        finally:
            await pipe.aclose()


async def test_send_nowait_a_cancelled_reply_is_read_and_dropped() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            await pipe.execute("SET", "k", "old")
            server.pause()
            dropped = Replies()
            pending = pipe.send_nowait(pack_command("GET", "k"), dropped)
            assert pending is not None and not pending.done()
            pending.cancel()
            assert pending.done()
            server.resume()
            await pipe.execute("SET", "k", "new")
            assert await pipe.execute("GET", "k") == b"new"
            assert dropped.got == []
            assert pipe.connects == 1
        finally:
            server.resume()
            await pipe.aclose()


async def test_send_nowait_a_failing_callback_does_not_end_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(reply: object, exc: BaseException | None) -> None:
        raise RuntimeError("a bug in the caller")

    with RedisServer() as server:
        pipe = RedisPipe(_settings(server))
        try:
            await pipe.execute("PING")
            assert pipe.send_nowait(pack_command("ECHO", "x"), broken) is not None
            assert await pipe.execute("ECHO", "after") == b"after"
            assert pipe.connects == 1 and pipe.connected
            assert "Redis reply callback failed" in caplog.text
        finally:
            await pipe.aclose()


async def test_send_nowait_callbacks_fail_when_the_server_goes_away() -> None:
    with RedisServer() as server:
        pipe = RedisPipe(_settings(server), max_pending=3)
        try:
            await pipe.execute("PING")
            server.pause()
            replies = Replies()
            for _ in range(3):
                assert pipe.send_nowait(pack_command("PING"), replies) is not None
            with pytest.raises(ConnectionError, match="too many"):
                pipe.send_nowait(pack_command("PING"), replies)
            server.kill()
            await replies.wait(3)
            assert all(r is None and isinstance(e, ConnectionError) for r, e in replies.got)
            assert pipe.send_nowait(pack_command("PING"), replies) is None  # lost: reconnect
        finally:
            await pipe.aclose()
