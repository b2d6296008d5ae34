"""Render an Envoy 1.40 bootstrap for an extproc sidecar.

The bootstrap is built with envoy-data-plane's typed (betterproto2) classes, so a misspelt
field or a wrong type fails here, in Python, rather than when Envoy loads the file; typed
``Any`` fields (``typed_config``) come out with their ``@type``. Field names are written in
proto (snake_case) form, the form Envoy's documentation and ``envoy/envoy.yaml`` use.

The spec is a tree of frozen dataclasses whose defaults are the production settings of
``envoy/envoy.yaml``::

    spec = BootstrapSpec(
        ext_proc=ExtProcSpec(processing_mode=processing_mode_for(p.needs for p in plugins)),
        sidecar=SidecarSpec(endpoints=("unix:/run/extproc/0.sock", "unix:/run/extproc/1.sock")),
    )
    text = render_yaml(spec)

envoy-data-plane is slow (hundreds of µs per message): it is used here, for configuration
only, and never on the request path.
"""

from __future__ import annotations

import datetime
import importlib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import yaml

from extproc.plugin import BodyMode, Needs

__all__ = [
    "ACCESS_LOG_FORMAT",
    "BootstrapSpec",
    "DirectResponse",
    "EscapedSlashesAction",
    "ExtProcSpec",
    "HealthCheckSpec",
    "ListenerSpec",
    "ProcessingModeSpec",
    "SidecarSpec",
    "TlsSpec",
    "UpstreamCluster",
    "build_bootstrap",
    "parse_endpoint",
    "processing_mode_for",
    "render",
    "render_yaml",
]

EXTPROC_CLUSTER: Final = "extproc"
UPSTREAM_CLUSTER: Final = "demo_upstream"

EscapedSlashesAction = Literal[
    "REJECT_REQUEST", "UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD", "KEEP_UNCHANGED"
]

#: The JSON access log line (one per request, to stdout). ``details`` says why a response was
#: sent (``ext_proc_error_gRPC_error_14``, a plugin's ``Respond.details`` ...).
ACCESS_LOG_FORMAT: Final[Mapping[str, str]] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "upstream": "%UPSTREAM_HOST%",
    "duration_ms": "%DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
}


# ---------------------------------------------------------------------------- the spec


@dataclass(frozen=True, slots=True)
class ProcessingModeSpec:
    """What Envoy sends to the sidecar (Envoy's ``ProcessingMode``).

    Headers and trailers are sent (``SEND``) or not (``SKIP``); bodies are ``NONE``,
    ``BUFFERED`` (one message with the whole body) or ``STREAMED`` (one per chunk).
    """

    request_headers: bool = True
    response_headers: bool = False
    request_body: BodyMode = BodyMode.NONE
    response_body: BodyMode = BodyMode.NONE
    request_trailers: bool = False
    response_trailers: bool = False


def _body_mode(modes: Iterable[BodyMode]) -> BodyMode:
    wanted = set(modes)
    if BodyMode.BUFFERED in wanted:
        return BodyMode.BUFFERED
    if BodyMode.STREAMED in wanted:
        return BodyMode.STREAMED
    return BodyMode.NONE


def processing_mode_for(needs: Iterable[Needs]) -> ProcessingModeSpec:
    """The smallest processing mode that serves every plugin: the union of their phases.

    * request headers are sent if any plugin needs any request phase (the stream then opens
      with what the request is);
    * a body is ``BUFFERED`` if any plugin wants it buffered, else ``STREAMED`` if any wants
      it streamed, else not sent (decided separately for request and response);
    * trailers are sent if any plugin wants them;
    * response headers are sent only if a plugin needs the response headers or body.
    """
    all_needs = tuple(needs)
    request_body = _body_mode(n.request_body for n in all_needs)
    response_body = _body_mode(n.response_body for n in all_needs)
    request_trailers = any(n.request_trailers for n in all_needs)
    return ProcessingModeSpec(
        request_headers=any(
            n.request_headers or n.request_body is not BodyMode.NONE or n.request_trailers
            for n in all_needs
        ),
        response_headers=any(
            n.response_headers or n.response_body is not BodyMode.NONE for n in all_needs
        ),
        request_body=request_body,
        response_body=response_body,
        request_trailers=request_trailers,
        response_trailers=any(n.response_trailers for n in all_needs),
    )


@dataclass(frozen=True, slots=True)
class UpstreamCluster:
    """Route every request to one upstream ``host:port`` (the ``demo_upstream`` cluster)."""

    host: str = "127.0.0.1"
    port: int = 8080
    connect_timeout_ms: int = 1000
    #: the route timeout (whole response), 0 for none
    timeout_s: float = 30.0
    max_requests: int = 10_000

    def __post_init__(self) -> None:
        _check_port(self.port, "UpstreamCluster.port")


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """Answer every request from Envoy itself (no upstream): for benchmarks and tests."""

    status: int = 200
    body: str = "ok\n"

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"DirectResponse.status must be 200..599, got {self.status}")


@dataclass(frozen=True, slots=True)
class TlsSpec:
    """TLS from Envoy to the sidecar: Envoy checks the sidecar's certificate against
    ``ca_file`` and, for mTLS, presents ``cert_file``/``key_file`` (empty: no client
    certificate). With ``server_name`` set, it is sent as SNI and
    the sidecar's certificate must carry it as a DNS SAN."""

    cert_file: str
    key_file: str
    ca_file: str
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """Active gRPC health checking (``grpc.health.v1.Health/Check``) of each sidecar endpoint.

    ``service_name`` ``""`` asks for the whole server. ``panic_threshold_percent`` 0 keeps
    Envoy from sending streams to endpoints that report NOT_SERVING even when all of them do
    (Envoy's default of 50 would ignore health then).
    """

    service_name: str = ""
    interval_ms: int = 2000
    timeout_ms: int = 1000
    no_traffic_interval_ms: int = 2000
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    panic_threshold_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    """The ``extproc`` cluster: where the sidecar listens and how Envoy talks to it.

    ``endpoints`` are ``host:port`` (TCP; ``[::1]:50051`` for IPv6) or ``unix:/path.sock``;
    list one per worker (``extproc serve --workers N``) and Envoy spreads streams over them
    (LEAST_REQUEST). ``max_requests`` bounds concurrent streams (one per in-flight HTTP
    request): Envoy's default of 1024 fails streams past it, so it is sized far above.
    """

    endpoints: tuple[str, ...] = ("127.0.0.1:50051",)
    tls: TlsSpec | None = None
    health_check: HealthCheckSpec | None = field(default_factory=HealthCheckSpec)
    connect_timeout_ms: int = 250
    max_requests: int = 100_000
    #: HTTP/2 PING interval and timeout on idle connections (0 disables)
    keepalive_interval_s: int = 30
    keepalive_timeout_s: int = 5

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("SidecarSpec.endpoints must list at least one address")
        for endpoint in self.endpoints:
            parse_endpoint(endpoint)


@dataclass(frozen=True, slots=True)
class ExtProcSpec:
    """The ``envoy.filters.http.ext_proc`` filter.

    ``failure_mode_allow`` False fails closed: when the sidecar is unreachable, errs, times out
    or answers out of protocol, the client gets 500 (504 on timeout). ``max_message_timeout_ms``
    is the ceiling of the sidecar's ``override_message_timeout`` (``None`` disables it).
    ``allowed_override_modes`` only matters with ``allow_mode_override``.
    ``receiving_namespaces`` are the dynamic-metadata namespaces Envoy accepts from the sidecar
    (our plugins write ``extproc.<plugin name>``).
    """

    processing_mode: ProcessingModeSpec = field(default_factory=ProcessingModeSpec)
    message_timeout_ms: int = 200
    max_message_timeout_ms: int | None = 1000
    failure_mode_allow: bool = False
    allow_mode_override: bool = False
    allowed_override_modes: tuple[ProcessingModeSpec, ...] = ()
    request_attributes: tuple[str, ...] = ("source.address", "request.id")
    receiving_namespaces: tuple[str, ...] = ()
    stat_prefix: str = "extproc"

    def __post_init__(self) -> None:
        if self.message_timeout_ms < 0:
            raise ValueError("ExtProcSpec.message_timeout_ms must be >= 0")
        if self.max_message_timeout_ms is not None and (
            self.max_message_timeout_ms < self.message_timeout_ms
        ):
            raise ValueError("ExtProcSpec.max_message_timeout_ms must be >= message_timeout_ms")
        if self.allowed_override_modes and not self.allow_mode_override:
            raise ValueError("allowed_override_modes needs allow_mode_override=True")


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """The downstream listener and its HTTP connection manager.

    Paths are normalised before any filter runs (RFC 3986, merged slashes) so plugins match
    on the path the upstream acts on; encoded slashes are rejected by default (see
    ``envoy/envoy.yaml`` for the trade-offs). ``use_remote_address`` with
    ``xff_num_trusted_hops`` 0 is right at the edge; behind a trusted L7 load balancer use 1.
    """

    address: str = "127.0.0.1"
    port: int = 10000
    use_remote_address: bool = True
    xff_num_trusted_hops: int = 0
    normalize_path: bool = True
    merge_slashes: bool = True
    escaped_slashes_action: EscapedSlashesAction = "REJECT_REQUEST"
    access_log: bool = True
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    request_timeout_s: int = 60
    stream_idle_timeout_s: int = 300
    max_downstream_connections: int = 50_000

    def __post_init__(self) -> None:
        _check_port(self.port, "ListenerSpec.port")


@dataclass(frozen=True, slots=True)
class BootstrapSpec:
    """A whole bootstrap: listener -> ext_proc -> router -> upstream (or a direct response),
    the sidecar cluster, and the admin interface (always on 127.0.0.1)."""

    listener: ListenerSpec = field(default_factory=ListenerSpec)
    upstream: UpstreamCluster | DirectResponse = field(default_factory=UpstreamCluster)
    sidecar: SidecarSpec = field(default_factory=SidecarSpec)
    ext_proc: ExtProcSpec = field(default_factory=ExtProcSpec)
    admin_port: int = 9901
    node_id: str = "extproc-envoy"

    def __post_init__(self) -> None:
        _check_port(self.admin_port, "BootstrapSpec.admin_port")


def _check_port(port: int, what: str) -> None:
    # 0 is allowed: the OS picks one (tests read it back from the admin interface)
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} must be 0..65535, got {port}")


def parse_endpoint(endpoint: str) -> tuple[str, int] | str:
    """``"host:port"`` -> ``(host, port)``; ``"unix:/path.sock"`` -> ``"/path.sock"``."""
    if endpoint.startswith("unix:"):
        path = endpoint.removeprefix("unix:")
        if not path:
            raise ValueError(f"empty Unix socket path in {endpoint!r}")
        return path
    host, sep, port_text = endpoint.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"sidecar endpoint must be host:port or unix:/path, got {endpoint!r}")
    return host, int(port_text)


# ---------------------------------------------------------------------------- rendering


def render_yaml(spec: BootstrapSpec | None = None) -> str:
    """The bootstrap as YAML text, ready for ``envoy -c``."""
    return yaml.safe_dump(render(spec), sort_keys=False)


def render(spec: BootstrapSpec | None = None) -> dict[str, Any]:
    """The bootstrap as plain data (dicts, lists, str, numbers) for ``yaml.safe_dump``."""
    import betterproto2

    data: dict[str, Any] = build_bootstrap(spec or BootstrapSpec()).to_dict(
        casing=betterproto2.Casing.SNAKE
    )
    return data


def _import_envoy_data_plane() -> None:
    """Import envoy-data-plane once, lazily (it is an optional dependency, and slow to import:
    ``processing_mode_for`` does not need it). Its generated classes trip pydantic 2.12's
    deprecation of classmethod ``model_validator``s at import time; that warning is theirs, and
    must not fail a ``-W error`` run of ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in _ENVOY_DATA_PLANE_MODULES:
            importlib.import_module(f"envoy_data_plane.{module}")


_ENVOY_DATA_PLANE_MODULES: Final = (
    "google.protobuf",
    "envoy.type.v3",
    "envoy.type.matcher.v3",
    "envoy.config.core.v3",
    "envoy.config.accesslog.v3",
    "envoy.config.bootstrap.v3",
    "envoy.config.cluster.v3",
    "envoy.config.endpoint.v3",
    "envoy.config.listener.v3",
    "envoy.config.overload.v3",
    "envoy.config.route.v3",
    "envoy.extensions.access_loggers.stream.v3",
    "envoy.extensions.filters.http.ext_proc.v3",
    "envoy.extensions.filters.http.router.v3",
    "envoy.extensions.filters.network.http_connection_manager.v3",
    "envoy.extensions.resource_monitors.downstream_connections.v3",
    "envoy.extensions.transport_sockets.tls.v3",
    "envoy.extensions.upstreams.http.v3",
)


def build_bootstrap(spec: BootstrapSpec) -> Any:
    """The typed ``envoy.config.bootstrap.v3.Bootstrap`` message for ``spec``."""
    _import_envoy_data_plane()
    from envoy_data_plane.envoy.config.bootstrap import v3 as bootstrap
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.config.overload import v3 as overload
    from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections import (
        v3 as downstream_connections,
    )

    clusters = [_sidecar_cluster(spec.sidecar)]
    if isinstance(spec.upstream, UpstreamCluster):
        clusters.append(_upstream_cluster(spec.upstream))
    max_connections = downstream_connections.DownstreamConnectionsConfig(
        max_active_downstream_connections=spec.listener.max_downstream_connections
    )
    return bootstrap.Bootstrap(
        node=core.Node(id=spec.node_id, cluster="extproc"),
        admin=bootstrap.Admin(address=_socket_address("127.0.0.1", spec.admin_port)),
        overload_manager=overload.OverloadManager(
            resource_monitors=[
                overload.ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=_pack(max_connections),
                )
            ]
        ),
        static_resources=bootstrap.BootstrapStaticResources(
            listeners=[_listener(spec)], clusters=clusters
        ),
    )


def _pack(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    return AnyMessage.pack(message)


def _ms(value: float) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=value)


def _socket_address(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core import v3 as core

    return core.Address(socket_address=core.SocketAddress(address=host, port_value=port))


def _endpoint_address(endpoint: str) -> Any:
    from envoy_data_plane.envoy.config.core import v3 as core

    parsed = parse_endpoint(endpoint)
    if isinstance(parsed, str):
        return core.Address(pipe=core.Pipe(path=parsed))
    return _socket_address(*parsed)


def _load_assignment(name: str, addresses: Iterable[Any]) -> Any:
    from envoy_data_plane.envoy.config.endpoint import v3 as endpoint

    return endpoint.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=address))
                    for address in addresses
                ]
            )
        ],
    )


def _thresholds(max_requests: int) -> Any:
    from envoy_data_plane.envoy.config.cluster import v3 as cluster

    return cluster.CircuitBreakers(
        thresholds=[
            cluster.CircuitBreakersThresholds(
                max_connections=max_requests,
                max_pending_requests=max_requests,
                max_requests=max_requests,
                max_retries=3,
            )
        ]
    )


def _listener(spec: BootstrapSpec) -> Any:
    from envoy_data_plane.envoy.config.listener import v3 as listener

    options = spec.listener
    return listener.Listener(
        name="ingress",
        address=_socket_address(options.address, options.port),
        per_connection_buffer_limit_bytes=options.per_connection_buffer_limit_bytes,
        filter_chains=[
            listener.FilterChain(
                filters=[
                    listener.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_pack(_http_connection_manager(spec)),
                    )
                ]
            )
        ],
    )


def _http_connection_manager(spec: BootstrapSpec) -> Any:
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import (
        v3 as hcm,
    )

    options = spec.listener
    return hcm.HttpConnectionManager(
        stat_prefix="ingress_http",
        codec_type=hcm.HttpConnectionManagerCodecType.AUTO,
        use_remote_address=options.use_remote_address,
        xff_num_trusted_hops=options.xff_num_trusted_hops,
        generate_request_id=True,
        always_set_request_id_in_response=True,
        normalize_path=options.normalize_path,
        merge_slashes=options.merge_slashes,
        path_with_escaped_slashes_action=hcm.HttpConnectionManagerPathWithEscapedSlashesAction[
            options.escaped_slashes_action
        ],
        request_headers_timeout=_ms(10_000),
        stream_idle_timeout=_ms(options.stream_idle_timeout_s * 1000),
        request_timeout=_ms(options.request_timeout_s * 1000),
        common_http_protocol_options=core.HttpProtocolOptions(
            idle_timeout=_ms(3_600_000),
            headers_with_underscores_action=(
                core.HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST
            ),
        ),
        access_log=[_access_log(spec.ext_proc)] if options.access_log else [],
        route_config=_route_config(spec.upstream),
        http_filters=[
            hcm.HttpFilter(
                name="envoy.filters.http.ext_proc", typed_config=_pack(_ext_proc(spec.ext_proc))
            ),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router.Router())),
        ],
    )


def _access_log(ext_proc: ExtProcSpec) -> Any:
    from envoy_data_plane.envoy.config.accesslog import v3 as accesslog
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.extensions.access_loggers.stream import v3 as stream
    from envoy_data_plane.google.protobuf import Struct

    log_format = dict(ACCESS_LOG_FORMAT)
    for namespace in ext_proc.receiving_namespaces:
        log_format[f"meta_{namespace.rpartition('.')[2]}"] = f"%DYNAMIC_METADATA({namespace})%"
    stdout = stream.StdoutAccessLog(
        log_format=core.SubstitutionFormatString(json_format=Struct.from_dict(log_format))
    )
    return accesslog.AccessLog(name="envoy.access_loggers.stdout", typed_config=_pack(stdout))


def _route_config(upstream: UpstreamCluster | DirectResponse) -> Any:
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.config.route import v3 as route

    match = route.RouteMatch(prefix="/")
    if isinstance(upstream, DirectResponse):
        routed = route.Route(
            match=match,
            direct_response=route.DirectResponseAction(
                status=upstream.status, body=core.DataSource(inline_string=upstream.body)
            ),
        )
    else:
        routed = route.Route(
            match=match,
            route=route.RouteAction(
                cluster=UPSTREAM_CLUSTER, timeout=_ms(upstream.timeout_s * 1000)
            ),
        )
    return route.RouteConfiguration(
        name="local_route",
        virtual_hosts=[route.VirtualHost(name="default", domains=["*"], routes=[routed])],
    )


def _processing_mode(mode: ProcessingModeSpec) -> Any:
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc

    send = ext_proc.ProcessingModeHeaderSendMode.SEND
    skip = ext_proc.ProcessingModeHeaderSendMode.SKIP
    bodies = {
        BodyMode.NONE: ext_proc.ProcessingModeBodySendMode.NONE,
        BodyMode.BUFFERED: ext_proc.ProcessingModeBodySendMode.BUFFERED,
        BodyMode.STREAMED: ext_proc.ProcessingModeBodySendMode.STREAMED,
    }
    return ext_proc.ProcessingMode(
        request_header_mode=send if mode.request_headers else skip,
        response_header_mode=send if mode.response_headers else skip,
        request_body_mode=bodies[mode.request_body],
        response_body_mode=bodies[mode.response_body],
        request_trailer_mode=send if mode.request_trailers else skip,
        response_trailer_mode=send if mode.response_trailers else skip,
    )


def _ext_proc(spec: ExtProcSpec) -> Any:
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc

    metadata_options = None
    if spec.receiving_namespaces:
        metadata_options = ext_proc.MetadataOptions(
            receiving_namespaces=ext_proc.MetadataOptionsMetadataNamespaces(
                untyped=list(spec.receiving_namespaces)
            )
        )
    max_timeout = spec.max_message_timeout_ms
    return ext_proc.ExternalProcessor(
        grpc_service=core.GrpcService(
            envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=EXTPROC_CLUSTER)
        ),
        stat_prefix=spec.stat_prefix,
        failure_mode_allow=spec.failure_mode_allow,
        processing_mode=_processing_mode(spec.processing_mode),
        message_timeout=_ms(spec.message_timeout_ms),
        max_message_timeout=_ms(max_timeout) if max_timeout is not None else None,
        allow_mode_override=spec.allow_mode_override,
        allowed_override_modes=[_processing_mode(m) for m in spec.allowed_override_modes],
        metadata_options=metadata_options,
        request_attributes=list(spec.request_attributes),
    )


def _sidecar_cluster(spec: SidecarSpec) -> Any:
    from envoy_data_plane.envoy.config.cluster import v3 as cluster
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http
    from envoy_data_plane.envoy.type import v3 as types

    http2 = core.Http2ProtocolOptions()
    if spec.keepalive_interval_s > 0:
        http2 = core.Http2ProtocolOptions(
            connection_keepalive=core.KeepaliveSettings(
                interval=_ms(spec.keepalive_interval_s * 1000),
                timeout=_ms(spec.keepalive_timeout_s * 1000),
            )
        )
    protocol_options = upstream_http.HttpProtocolOptions(
        explicit_http_config=upstream_http.HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=http2
        )
    )
    health_checks = []
    common_lb_config = None
    if spec.health_check is not None:
        check = spec.health_check
        health_checks.append(
            core.HealthCheck(
                timeout=_ms(check.timeout_ms),
                interval=_ms(check.interval_ms),
                no_traffic_interval=_ms(check.no_traffic_interval_ms),
                unhealthy_threshold=check.unhealthy_threshold,
                healthy_threshold=check.healthy_threshold,
                grpc_health_check=core.HealthCheckGrpcHealthCheck(service_name=check.service_name),
            )
        )
        common_lb_config = cluster.ClusterCommonLbConfig(
            healthy_panic_threshold=types.Percent(value=check.panic_threshold_percent)
        )
    return cluster.Cluster(
        name=EXTPROC_CLUSTER,
        type=cluster.ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(spec.connect_timeout_ms),
        lb_policy=cluster.ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=_load_assignment(
            EXTPROC_CLUSTER, (_endpoint_address(e) for e in spec.endpoints)
        ),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(protocol_options)
        },
        circuit_breakers=_thresholds(spec.max_requests),
        upstream_connection_options=cluster.UpstreamConnectionOptions(
            tcp_keepalive=core.TcpKeepalive(
                keepalive_time=60, keepalive_interval=10, keepalive_probes=3
            )
        ),
        health_checks=health_checks,
        common_lb_config=common_lb_config,
        transport_socket=_tls_socket(spec.tls) if spec.tls is not None else None,
    )


def _tls_socket(tls: TlsSpec) -> Any:
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls_v3
    from envoy_data_plane.envoy.type.matcher import v3 as matcher

    validation = tls_v3.CertificateValidationContext(
        trusted_ca=core.DataSource(filename=tls.ca_file),
        match_typed_subject_alt_names=(
            [
                tls_v3.SubjectAltNameMatcher(
                    san_type=tls_v3.SubjectAltNameMatcherSanType.DNS,
                    matcher=matcher.StringMatcher(exact=tls.server_name),
                )
            ]
            if tls.server_name
            else []
        ),
    )
    context = tls_v3.UpstreamTlsContext(
        common_tls_context=tls_v3.CommonTlsContext(
            tls_certificates=[
                tls_v3.TlsCertificate(
                    certificate_chain=core.DataSource(filename=tls.cert_file),
                    private_key=core.DataSource(filename=tls.key_file),
                )
            ]
            if tls.cert_file
            else [],
            validation_context=validation,
            alpn_protocols=["h2"],
        ),
        sni=tls.server_name,
    )
    return core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(context))


def _upstream_cluster(spec: UpstreamCluster) -> Any:
    from envoy_data_plane.envoy.config.cluster import v3 as cluster

    return cluster.Cluster(
        name=UPSTREAM_CLUSTER,
        type=cluster.ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(spec.connect_timeout_ms),
        lb_policy=cluster.ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=_load_assignment(UPSTREAM_CLUSTER, [_socket_address(spec.host, spec.port)]),
        circuit_breakers=_thresholds(spec.max_requests),
    )
