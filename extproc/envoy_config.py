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
from collections.abc import Iterable
from typing import Any, Final

import yaml

# the spec lives in its own module; its names are part of this module's interface too
from extproc.envoy_spec import (
    ACCESS_LOG_FORMAT,
    EXTPROC_CLUSTER,
    UPSTREAM_CLUSTER,
    BootstrapSpec,
    DirectResponse,
    EscapedSlashesAction,
    ExtProcSpec,
    HealthCheckSpec,
    ListenerSpec,
    ProcessingModeSpec,
    SidecarSpec,
    TlsSpec,
    UpstreamCluster,
    parse_endpoint,
    processing_mode_for,
)
from extproc.plugin import BodyMode

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
        observability_mode=spec.observability_mode,
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
