"""The servicer: read a ProcessingRequest, let the stream processor decide, write the reply;
served by grpc.aio (``transport: grpcio``) or by :mod:`extproc.http2` (``transport: http2``).
Everything else lives in :mod:`extproc.stream`, :mod:`extproc.chain` and :mod:`extproc.protocol`.

Explicit ``context.read()`` / ``context.write()`` measured cheaper than an async-generator
``Process`` on grpc.aio, so the servicer uses them.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from types import CodeType
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from grpc_health.v1 import health_pb2

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.coalesce import ReplyCoalescer
from extproc.config import Config, ConfigError, LoadedConfig, ServerSettings, load_config
from extproc.health import SERVICE as HEALTH_GRPC_SERVICE
from extproc.health import HealthService
from extproc.observability.gcpause import GcPauses
from extproc.observability.metrics import Registry
from extproc.observability.saturation import streams_in_flight
from extproc.observability.tracing import StreamSpan, StreamTracer
from extproc.plugin import HealthState
from extproc.protocol import codec
from extproc.protocol.events import ImmediateReply, Message, Reply
from extproc.protocol.state import LocalProtocolError, RemoteProtocolError
from extproc.runtime import Runtime, Services
from extproc.stream import StreamMetrics, StreamProcessor

if TYPE_CHECKING:
    from extproc.http2 import Http2Server
    from extproc.observability.watchdog import LoopLagWatchdog

__all__ = ["ExtProcServicer", "Server", "grpc_address"]

log = logging.getLogger("extproc.server")

from_bytes: Final = pb.ProcessingRequest.FromString
_NOTHING: Final = b""

HEALTH_SERVICE = "extproc"
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


#: Young-generation threshold of the cyclic collector (Python's default: 700). The objects of
#: the streams in flight rise and fall by thousands at saturation, and at 700 each rise set
#: off a collection that found them alive and moved them on to be walked again in the older
#: generations: on the benchmark (2026-12-07, http2, both plugins) 218 collections a second,
#: 5 % of the time. At 5,000 a collection comes once the heap grew for real: 0.7 a second,
#: 0.1 % of the time, each one longer (1.4 ms there; grpc.aio 2-2.4 ms). docs/performance.md
YOUNG_THRESHOLD: Final = 5_000


def freeze_heap() -> None:
    """Put what is alive now (modules, protobuf descriptors, grpc, the loaded plugins) out of
    the cyclic collector's reach. Without it every full collection walks the whole heap with the
    event loop stopped: under the benchmark's load, 30-58 ms pauses that freed under 1,000
    objects each (and the plugin timeouts they caused); with it, 5-10 ms. Frozen objects
    are still freed by reference counting; only cycles among them wait for the next
    :func:`refreeze_heap`. Also sets the young generation's threshold
    (:data:`YOUNG_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def refreeze_heap() -> None:
    """After a reload: release what the previous freeze holds (the old plugins' cycles are
    collected now, in one pause), then freeze the new state."""
    gc.unfreeze()
    freeze_heap()


def grpc_address(listen: str) -> str:
    """``unix:/path`` stays as it is; ``host:port`` too (grpc's own syntax)."""
    return listen


def _busy(servicer: ExtProcServicer) -> Callable[[], bool]:
    """For the watchdog: did a stream start since the last call, or is one still open?"""
    seen = servicer.streams_started

    def busy() -> bool:
        nonlocal seen
        started, seen = servicer.streams_started != seen, servicer.streams_started
        return started or servicer.open_streams > 0

    return busy


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        runtime: Runtime,
        config: Config,
        registry: Registry,
        tracer: StreamTracer | None = None,
    ) -> None:
        self.runtime = runtime
        self.tracer = tracer if tracer is not None and tracer.enabled else None
        self.settings = config.server
        self.metrics = StreamMetrics(registry)
        streams = registry.counter("extproc_streams_total", "ext_proc streams by end", ("end",))
        self._ended = {
            k: streams.labels(k) for k in ("ok", "remote_error", "local_error", "idle", "cancelled")
        }
        errors = registry.counter(
            "extproc_protocol_errors_total", "protocol errors by guilty side", ("side",)
        )
        self._extended = registry.counter(
            "extproc_message_timeout_extensions_total",
            "messages for which Envoy was asked to wait longer (override_message_timeout)",
        ).labels()
        self._remote = errors.labels("remote")
        self._local = errors.labels("local")
        self.open_streams = 0
        #: the same count in the worker's :class:`InFlight`, where plugins read it
        self._in_flight = streams_in_flight()
        self.streams_started = 0
        #: woken at each stream's start (it slows down while the worker is idle)
        self.watchdog: LoopLagWatchdog | None = None
        self.coalescer = ReplyCoalescer(config.server.coalesce_replies_ms / 1000.0)
        self._active: dict[asyncio.Task[Any], float] = {}
        self._idled: set[asyncio.Task[Any]] = set()

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> bytes:
        gen = self.runtime.current
        if gen is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not ready")
            return _NOTHING
        gen.pin()
        self.open_streams += 1
        self._in_flight.count += 1
        self.streams_started += 1
        watchdog = self.watchdog
        if watchdog is not None and watchdog.idle:
            watchdog.wake()
        settings = self.settings
        stream = StreamProcessor(
            gen.chain,
            self.metrics,
            allow_mode_override=settings.allow_mode_override,
            max_body_bytes=settings.max_body_bytes,
        )
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        active = self._active
        coalescer = self.coalescer
        extend_ms = settings.max_message_timeout_ms
        end = "ok"
        span: StreamSpan | None = None
        first = True
        reply: Reply | ImmediateReply | None = None
        try:
            while True:
                if task is not None:
                    active[task] = loop.time()  # the idle sweep reads this
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                started = loop.time()
                msg = codec.decode(from_bytes(request))
                if first:
                    first = False
                    if self.tracer is not None:
                        span = self.tracer.start_stream(context.invocation_metadata, msg.headers)
                if span is not None:
                    span.message(msg.phase.value)
                if extend_ms is None or msg.observability_mode:
                    reply = await stream.handle(msg, started)
                else:
                    reply = await self._handle_extending(stream, msg, started, extend_ms, context)
                if reply is not None:
                    data = codec.encode_bytes(msg.phase, reply)
                    held = coalescer.hold(loop)
                    if held is not None:
                        await held  # the round's replies are written in one loop iteration
                    if stream.finished:
                        return data  # the last reply goes out with the status, in one batch
                    await context.write(data)
                elif stream.finished:
                    break
        except (RemoteProtocolError, codec.DecodeError, ProtobufDecodeError) as exc:
            end = "remote_error"
            self._remote.inc()
            log.warning("unexpected message from Envoy", extra={"error": str(exc)})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "protocol error")
        except LocalProtocolError as exc:
            end = "local_error"
            self._local.inc()
            log.error("no valid reply could be sent", extra={"error": str(exc)})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        except asyncio.CancelledError:
            if task is None or task not in self._idled:
                end = "cancelled"
                raise
            end = "idle"  # cancelled by the idle sweep: end the RPC with a clear status
            task.uncancel()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stream idle")
        finally:
            if task is not None:
                active.pop(task, None)
                self._idled.discard(task)
            if span is not None:
                immediate = isinstance(reply, ImmediateReply)
                span.end(
                    end,
                    decision="respond" if immediate else "continue",
                    status_code=reply.status if isinstance(reply, ImmediateReply) else None,
                )
            self._ended[end].inc()
            self.open_streams -= 1
            self._in_flight.count -= 1
            gen.release()
        # Envoy closed the stream first (or, in observability mode, nothing is answered): a
        # unary-response RPC still carries one message with its status, an empty
        # ProcessingResponse, which Envoy ignores once it has stopped processing
        return _NOTHING

    async def sweep_idle(self) -> None:
        """Cancel streams that received no message for ``stream_idle_timeout_s``: one timer
        for the whole process instead of one per stream, re-armed on every message."""
        idle = self.settings.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, min(idle / 4, 5.0)))
            cutoff = loop.time() - idle
            for task, last in list(self._active.items()):
                if last < cutoff and task not in self._idled:
                    self._idled.add(task)
                    task.cancel()

    async def _handle_extending(
        self,
        stream: StreamProcessor,
        msg: Message,
        started: float,
        extend_ms: int,
        context: grpc.aio.ServicerContext,
    ) -> Reply | ImmediateReply | None:
        """Run the chain; if it is still busy when Envoy's ``message_timeout`` is about to
        expire, send ``override_message_timeout`` once so Envoy waits for the answer. A timer,
        not a task: a message that is answered in time costs one call_at and its cancel."""
        loop = asyncio.get_running_loop()
        sent: list[asyncio.Task[None]] = []

        def extend() -> None:
            self._extended.inc()
            extension = codec.encode_timeout_extension(extend_ms).SerializeToString()
            sent.append(loop.create_task(context.write(extension)))

        timer = loop.call_at(started + self.settings.soft_budget_s, extend)
        try:
            return await stream.handle(msg, started)
        finally:
            timer.cancel()
            if sent:
                await sent[0]  # the extension goes out before the answer


class Server:
    """The sidecar process: gRPC server, health, admin endpoints, reload and shutdown."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        config_path: str | None = None,
        listen: str | None = None,
        admin: str | None = None,
        services: Services | None = None,
        span_processors: Sequence[Any] = (),
    ) -> None:
        self.loaded = loaded
        self.config_path = config_path
        settings = loaded.config.server
        self.listen = listen or settings.listen
        self.admin_address = admin if admin is not None else settings.admin
        self.services = services or Services(workers=int(os.environ.get("EXTPROC_WORKERS", "1")))
        self.runtime = Runtime(self.services)
        self.health = HealthService()
        self._server: grpc.aio.Server | None = None
        self._http2: Http2Server | None = None
        self._admin: Any = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.bound_port = 0
        self.servicer: ExtProcServicer | None = None
        self.shutting_down = False
        self.watchdog: Any = None
        self._gc_pauses: GcPauses | None = None
        self.tracer: StreamTracer | None = None
        self._span_processors = tuple(span_processors)
        self.meter_provider: Any = None
        #: what the process exports with until it restarts (reloads do not rebuild exporters)
        self._exporters = (loaded.config.tracing, loaded.config.metrics)
        self._hook_codes: Callable[[], Mapping[CodeType, str]] = dict
        #: freeze the heap once serving and after each reload (the ``serve`` entry point sets
        #: it; in-process embedders and tests keep their own collector settings)
        self.freezes_heap = False

    async def start(self) -> None:
        from extproc.admin import AdminServer
        from extproc.observability.watchdog import LoopLagWatchdog, plugin_hook_codes

        codes_for: dict[int, Mapping[CodeType, str]] = {}

        def hook_codes() -> Mapping[CodeType, str]:
            gen = self.runtime.current
            if gen is None:
                return {}
            if gen.number not in codes_for:
                codes_for.clear()
                codes_for[gen.number] = plugin_hook_codes(gen.chain.plugins())
            return codes_for[gen.number]

        self._hook_codes = hook_codes

        settings = self.loaded.config.server
        await self._connect_redis(self.loaded.config)
        await self.runtime.start(self.loaded)
        self._start_observability()
        assert self.servicer is not None
        if settings.transport == "http2":
            await self._start_http2(settings)
        else:
            await self._start_grpcio(settings)
        await self._set_health()
        if settings.loop_lag_threshold_ms:
            self.watchdog = LoopLagWatchdog(
                self.services.registry,
                settings.loop_lag_threshold_ms / 1000,
                self._hook_codes,
                busy=_busy(self.servicer),
            )
            self.servicer.watchdog = self.watchdog
            self.watchdog.start()
        self._plugins_changed()
        self._gc_pauses = GcPauses(self.services.registry)
        self._gc_pauses.install()
        self._tasks.append(asyncio.ensure_future(self._health_loop()))
        self._tasks.append(asyncio.ensure_future(self.servicer.sweep_idle()))
        if self.admin_address:
            self._admin = AdminServer(self, self.admin_address)
            await self._admin.start()
        log.info(
            "serving",
            extra={
                "listen": self.listen,
                "transport": settings.transport,
                "admin": self.admin_address,
                "generation": 1,
                "plugins": [s.name for s in self.runtime.current.chain.slots]
                if self.runtime.current
                else [],
            },
        )

    def _start_observability(self) -> None:
        from extproc.observability.otel import build_meter_provider
        from extproc.observability.tracing import configure_tracing

        tracing, metrics = self._exporters
        self.meter_provider = build_meter_provider(
            self.services.registry,
            exporters=("prometheus", "otlp") if metrics.otlp_endpoint else ("prometheus",),
            otlp_endpoint=metrics.otlp_endpoint,
            export_interval_s=metrics.export_interval_s,
            service_name=tracing.service_name,
        )
        self.tracer = configure_tracing(
            tracing, span_processors=self._span_processors, set_global=not self._span_processors
        )
        self.servicer = ExtProcServicer(
            self.runtime, self.loaded.config, self.services.registry, self.tracer
        )

    async def _start_http2(self, settings: ServerSettings) -> None:
        from extproc.http2 import Http2Server

        assert self.servicer is not None
        tls = None
        if settings.tls is not None:
            from extproc.tls import ServerTls

            tls = ServerTls(settings.tls)
        server = Http2Server(
            {
                # the grpc.aio signature (request iterator, context); the Call is the context
                f"/{SERVICE_NAME}/Process": functools.partial(self.servicer.Process, None),
                **{
                    f"/{HEALTH_GRPC_SERVICE}/{name}": functools.partial(method, None)
                    for name, method in self.health.methods().items()
                },
            },
            max_concurrent_streams=settings.max_concurrent_streams,
            max_message_bytes=settings.max_message_bytes,
            tls=tls,
        )
        if self.freezes_heap:
            freeze_heap()
        self.bound_port = await server.listen(self.listen)
        self._http2 = server

    async def _start_grpcio(self, settings: ServerSettings) -> None:
        assert self.servicer is not None
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.so_reuseport", 0),
        ]
        # beyond this many open streams new ones get RESOURCE_EXHAUSTED (Envoy: per its
        # failure_mode_allow) instead of queueing without bound
        server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=settings.max_concurrent_streams
        )
        # Our own method handler (same service and method names as the generated one), on
        # bytes both ways: the servicer parses requests itself and writes prebuilt or cached
        # reply bytes, so grpc's (de)serializer hooks are not called per message. Registered
        # as stream-unary although the protocol is a bidirectional stream: on the wire the
        # two are the same (HTTP/2 DATA frames, then trailers), and grpc.aio then sends the
        # handler's return value, the stream's last reply, together with the status in one
        # batch, where a streaming handler needs a write and then a separate status (one
        # completion and one loop wake-up less per stream). Earlier replies are written with
        # context.write(), which grpc.aio allows in this mode too.
        process = grpc.stream_unary_rpc_method_handler(self.servicer.Process)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": process}),)
        )
        # the health service on bytes too (wire-compatible with the generated one)
        health = self.health.methods()
        health_methods = {
            "Check": grpc.stream_unary_rpc_method_handler(health["Check"]),
            "Watch": grpc.stream_stream_rpc_method_handler(health["Watch"]),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_GRPC_SERVICE, health_methods),)
        )
        if settings.tls is not None:
            from extproc.tls import server_credentials

            creds = server_credentials(settings.tls)
            self.bound_port = server.add_secure_port(grpc_address(self.listen), creds)
        else:
            self.bound_port = server.add_insecure_port(grpc_address(self.listen))
        if not self.listen.startswith("unix:") and self.bound_port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        if self.freezes_heap:  # plugins are loaded; before the first stream and the watchdog
            freeze_heap()
        await server.start()
        self._server = server

    def _plugins_changed(self) -> None:
        """Create the per-plugin stall series at 0 so they exist before the first stall (none
        without a watchdog)."""
        if self.watchdog is None:
            return
        stalls = self.services.registry.counter(
            "extproc_loop_stalls_total", "event-loop stalls past the threshold", ("plugin",)
        )
        stalls.labels("(none)")
        stalls.labels("(gc)")
        if self.runtime.current is not None:
            for slot in self.runtime.current.chain.slots:
                stalls.labels(slot.name)

    async def _connect_redis(self, config: Config) -> None:
        if config.redis is None or self.services.redis is not None:
            return
        from extproc.services.redis import RedisTls, make_redis

        settings = config.redis
        self.services.redis = make_redis(
            settings.url,
            secrets=self.services.secrets,
            username_ref=settings.username,
            password_ref=settings.password,
            tls=RedisTls(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
            if settings.tls_ca_file or settings.tls_cert_file
            else None,
            socket_timeout=settings.timeout_ms / 1000,
            connect_timeout=settings.timeout_ms / 1000,
            max_connections=settings.max_connections,
            client_name="extproc",
        )
        self.services.redis_key = config.redis.model_dump_json()

    async def _set_health(self) -> None:
        state, _ = await self.runtime.health()
        serving = state is not HealthState.UNHEALTHY and not self.shutting_down
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(HEALTH_SERVICE, status)

    async def _health_loop(self) -> None:
        while not self.shutting_down:
            await asyncio.sleep(1.0)
            if self.watchdog is not None:
                self.watchdog.wake()  # health_check hooks are plugin code too
            try:
                await self._set_health()
            except Exception:
                log.exception("health update failed")

    async def reload(self) -> bool:
        """Re-read the config file and swap it in; keep the running one on any error."""
        if not self.config_path:
            return False
        try:
            loaded = load_config(self.config_path)
            if self.runtime.current and loaded.digest == self.runtime.current.loaded.digest:
                return True
            if self.watchdog is not None:
                self.watchdog.wake()  # the new plugins' initialize runs on this loop
            await self.runtime.reload(loaded, self.loaded.config.server.shutdown_grace_s)
        except ConfigError as exc:
            self.runtime.reloads_failed += 1
            self.runtime.last_error = str(exc)
            self.runtime._reload_counter.labels("failed").inc()
            log.error(
                "configuration refused; the running one stays",
                extra={"problems": list(exc.problems)},
            )
            return False
        except Exception as exc:
            log.error(
                "configuration failed to start; the running one stays", extra={"error": str(exc)}
            )
            return False
        if loaded.config.server != self.loaded.config.server:
            log.warning(
                "server settings changed: the plugin chain, its time budget and reply "
                "coalescing are reloaded now; listen addresses, the transport, TLS, stream "
                "limits and the loop-lag watchdog apply after a restart"
            )
        if (loaded.config.tracing, loaded.config.metrics) != self._exporters:
            log.warning("tracing and metrics exporter settings apply after a restart")
        if self.servicer is not None:
            self.servicer.coalescer.max_hold = loaded.config.server.coalesce_replies_ms / 1000.0
        self.loaded = loaded
        self._plugins_changed()
        if self.freezes_heap:
            refreeze_heap()
        log.info(
            "configuration reloaded",
            extra={"generation": self.runtime.current.number if self.runtime.current else 0},
        )
        return True

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING first, let Envoy notice, finish in-flight streams,
        then shut the plugins down."""
        if self.shutting_down:
            return
        self.shutting_down = True
        settings = self.loaded.config.server
        await self.health.enter_graceful_shutdown()
        open_streams = self.servicer.open_streams if self.servicer else 0
        log.info("shutting down", extra={"open_streams": open_streams})
        if settings.drain_delay_s:
            await asyncio.sleep(settings.drain_delay_s)
        self.health.end_watches()  # an open Watch would hold the stop for its whole grace
        if self._server is not None:
            await self._server.stop(settings.shutdown_grace_s)
        if self._http2 is not None:
            await self._http2.stop(settings.shutdown_grace_s)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._gc_pauses is not None:
            self._gc_pauses.uninstall()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.stop()
        await self.runtime.shutdown(settings.shutdown_grace_s)
        await self.services.aclose()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)
        if self.meter_provider is not None:
            from extproc.observability.otel import shutdown_meter_provider

            await asyncio.to_thread(shutdown_meter_provider, self.meter_provider)
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    def install_signal_handlers(self, on_reload: Callable[[], Any] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(
            signal.SIGHUP, on_reload or (lambda: asyncio.ensure_future(self.reload()))
        )


async def serve(
    config_path: str, *, listen: str | None = None, admin: str | None = None, watch: bool = True
) -> None:
    from extproc.observability.logging import configure_logging

    loaded = load_config(config_path)
    configure_logging(loaded.config.logging)
    server = Server(loaded, config_path=config_path, listen=listen, admin=admin)
    server.freezes_heap = True
    await server.start()
    server.install_signal_handlers()
    watcher = None
    if watch:
        from extproc.reload import watch_config

        watcher = asyncio.ensure_future(watch_config(config_path, server.reload))
    await server.wait()
    if watcher is not None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
