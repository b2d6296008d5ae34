"""A real ``redis-server`` for tests and benches: its own port, its own temp dir, no persistence.

::

    with RedisServer() as server:
        client = make_redis(server.url)
        ...
        server.pause()      # SIGSTOP: connections hang, as with a stalled Redis
        server.resume()     # SIGCONT
        server.restart()    # same port, empty data (scripts must be loaded again)
        server.command_stats()["evalsha"]["calls"]

    with RedisServer(tls=certs) as server:   # also TLS on server.tls_port (certs: CertFiles)
        client = make_redis(server.tls_url, tls=RedisTls(ca_file=str(certs.ca), ...))

Only the process it started is ever signalled, by pid. A missing ``redis-server`` binary is an
error (:class:`RedisNotFoundError`), never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

from extproc.testing.ports import free_port

if TYPE_CHECKING:
    from extproc.testing.certs import CertFiles

__all__ = ["RedisNotFoundError", "RedisServer", "RedisStartError"]

_HOST: Final = "127.0.0.1"


class RedisNotFoundError(RuntimeError):
    """``redis-server`` is not on PATH."""


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries the tail of its log."""


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one inline command and return the raw reply (a tiny client: no redis-py needed)."""
    with socket.create_connection((_HOST, port), timeout=timeout) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if _complete(data):
                break
        return data


def _complete(data: bytes) -> bool:
    if data[:1] in (b"+", b"-", b":"):
        return data.endswith(b"\r\n")
    if data[:1] == b"$":
        header, _, rest = data.partition(b"\r\n")
        size = int(header[1:])
        return size < 0 or len(rest) >= size + 2
    return False


class RedisServer:
    """One ``redis-server`` on a free 127.0.0.1 port, started in ``__init__`` (or ``start``)."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        start: bool = True,
        unix_socket: bool = False,
        tls: CertFiles | None = None,
        tls_auth_clients: Literal["yes", "no", "optional"] = "optional",
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisNotFoundError("redis-server is not on PATH: install it (apt redis-server)")
        self.binary = found
        self._dir = tempfile.TemporaryDirectory(prefix="extproc-redis-")
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(self._dir.name) / "redis.log"
        #: with ``unix_socket``, the server also listens on this socket (``unix://`` + it)
        self.socket_path = str(Path(self._dir.name) / "redis.sock") if unix_socket else None
        #: with ``tls``, the server also listens for TLS on ``tls_port`` with the server
        #: certificate of these files, and checks client certificates against their CA
        #: (``tls_auth_clients``: "yes" requires one); the plain port stays for the helpers
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.tls_port = 0
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def tls_url(self) -> str:
        if not self.tls_port:
            raise RuntimeError("this RedisServer was started without tls")
        return f"rediss://{_HOST}:{self.tls_port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, attempts: int = 5) -> None:
        """Start on a free port (a new one unless the server ran before: ``restart`` keeps
        it). A port taken between choosing and binding is retried with another."""
        keep = self.port
        for _ in range(attempts):
            port = keep or free_port()
            if self.tls is not None and not (keep and self.tls_port):
                self.tls_port = free_port()
            if self._spawn(port):
                self.port = port
                return
            if keep:  # the old port may still be in TIME_WAIT / held: retry it for a while
                time.sleep(0.1)
        raise RedisStartError(f"redis-server did not start: {self._tail()}")

    def _spawn(self, port: int, timeout: float = 10.0) -> bool:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(self._log),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.socket_path is not None:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.tls is not None:
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", self.tls_auth_clients,
            ]  # fmt: skip
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False  # most likely the port was taken
            with contextlib.suppress(OSError):
                if _command(port, "PING", timeout=0.5).startswith(b"+PONG"):
                    self._proc = proc
                    return True
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        return False

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("redis-server is not running")
        os.kill(self._proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering; connections stay open."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (SIGTERM, then SIGKILL after ``timeout``) and wait for the process."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to clients."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, with empty data."""
        self.stop()
        self.start()

    def command(self, *args: str) -> bytes:
        """One inline command (no spaces inside arguments); the raw RESP reply."""
        return _command(self.port, *args)

    def command_stats(self) -> dict[str, dict[str, float]]:
        """``INFO commandstats`` as ``{"evalsha": {"calls": 12.0, "usec": ...}, ...}``."""
        return self.counters()[0]

    def counters(self) -> tuple[dict[str, dict[str, float]], int]:
        """:meth:`command_stats` and the server's ``total_writes_processed``, read at one
        instant. Redis writes a client's replies once for all of its commands that one read
        brought in, so the writes count round trips: a pipeline of 50 SETs is one, where
        ``commandstats`` counts 50. Each reading is itself one write and one ``info`` call,
        both counted by the next reading."""
        raw = _command(self.port, "INFO", "stats", "commandstats").decode()
        stats: dict[str, dict[str, float]] = {}
        writes = 0
        for line in raw.splitlines():
            if line.startswith("total_writes_processed:"):
                writes = int(line.partition(":")[2])
            if not line.startswith("cmdstat_"):
                continue
            name, _, fields = line[len("cmdstat_") :].partition(":")
            values: dict[str, float] = {}
            for pair in fields.split(","):
                key, _, value = pair.partition("=")
                with contextlib.suppress(ValueError):
                    values[key] = float(value)
            stats[name] = values
        return stats, writes

    def calls(self, command: str) -> int:
        return int(self.command_stats().get(command, {}).get("calls", 0))

    def reset_stats(self) -> None:
        _command(self.port, "CONFIG", "RESETSTAT")

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
