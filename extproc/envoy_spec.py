"""The spec of an Envoy bootstrap for an extproc sidecar: frozen dataclasses whose defaults are
the production settings of ``envoy/envoy.yaml``, and the processing mode the configured
plugins need. :mod:`extproc.envoy_config` renders it; this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from extproc.plugin import BodyMode, Needs

__all__ = [
    "ACCESS_LOG_FORMAT",
    "EXTPROC_CLUSTER",
    "UPSTREAM_CLUSTER",
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
    "parse_endpoint",
    "processing_mode_for",
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
    (our plugins write ``extproc.<plugin name>``). ``observability_mode``: Envoy sends the
    messages without waiting for answers (the sidecar watches, never changes anything).
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
    observability_mode: bool = False

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
