"""The sidecar's YAML configuration: one file, each plugin section checked by its own schema.

Errors name the file, the line, the key and the reason, all of them at once (each plugin's
section is checked even when the server settings are wrong), in the file's order; a key the
schema does not know gets the key it was probably meant to be, else the keys allowed there::

    extproc.yaml:14: plugins[1].config.providers.main.issuer: Field required
    extproc.yaml:31: plugins[2].config.rules[0].limits[0].requets: Extra inputs are not
    permitted; did you mean 'requests'?
"""

from __future__ import annotations

import difflib
import hashlib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from extproc.plugin import Plugin, PluginConfig
from extproc.rollout import RolloutSettings

__all__ = [
    "Config",
    "ConfigError",
    "LoadedConfig",
    "LoggingSettings",
    "MetricsSettings",
    "PluginEntry",
    "RedisSettings",
    "ServerSettings",
    "TlsSettings",
    "TracingSettings",
    "instance_name",
    "load_config",
    "parse_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Strict):
    cert_file: str = Field(description="PEM certificate chain the sidecar presents")
    key_file: str = Field(description="PEM private key of that certificate")
    client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle: when set, clients (Envoy) must present a certificate "
        "it signed (mTLS)",
    )


class ServerSettings(_Strict):
    listen: str = Field(
        "127.0.0.1:50051", description="gRPC address: host:port or unix:/path/to.sock"
    )
    admin: str | None = Field(
        "127.0.0.1:9180", description="admin HTTP address (/healthz /readyz /metrics /status)"
    )
    message_timeout_ms: int = Field(
        200, ge=10, le=60_000, description="Envoy's ext_proc message_timeout"
    )
    budget_margin_ms: int = Field(
        20, ge=0, le=10_000, description="kept back from message_timeout for transport and Envoy"
    )
    max_message_timeout_ms: int | None = Field(
        None, ge=10, le=600_000, description="Envoy's max_message_timeout, if set there"
    )
    allow_mode_override: bool = Field(False, description="Envoy's allow_mode_override")
    max_concurrent_streams: int = Field(
        10_000, ge=1, le=1_000_000, description="streams served at once per worker"
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="largest gRPC message"
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=0, description="largest body buffered for a plugin (413 beyond)"
    )
    stream_idle_timeout_s: float = Field(
        300.0, gt=0, description="a stream with no message for this long is closed"
    )
    shutdown_grace_s: float = Field(
        15.0, ge=0, le=600, description="time in-flight streams get to finish on SIGTERM"
    )
    drain_delay_s: float = Field(
        2.0,
        ge=0,
        le=120,
        description="on SIGTERM, NOT_SERVING is reported this long (so Envoy's health check "
        "moves new streams elsewhere) before the listener closes",
    )
    tls: TlsSettings | None = Field(
        None, description="serve gRPC over TLS (files are re-read when they change)"
    )
    loop_lag_threshold_ms: float = Field(
        50.0,
        ge=0,
        description="an event-loop stall longer than this is reported, naming the plugin hook "
        "that blocked; 0: no watchdog (no heartbeat, no thread, no loop-lag metrics)",
    )
    transport: Literal["grpcio", "http2"] = Field(
        "grpcio",
        description="grpcio: grpc.aio; http2: extproc's own gRPC-over-HTTP/2 on asyncio, "
        "a quarter to a half of grpc.aio's CPU per request",
    )
    coalesce_replies_ms: float = Field(
        3.0,
        ge=0,
        le=20,
        description="when the worker's CPU is saturated, a reply waits up to this long (scaled"
        " by how saturated) so replies of many streams are written together; 0: never",
    )

    @model_validator(mode="after")
    def _budget_fits(self) -> ServerSettings:
        if self.budget_margin_ms >= self.message_timeout_ms:
            raise ValueError("budget_margin_ms must be smaller than message_timeout_ms")
        return self

    @model_validator(mode="after")
    def _max_timeout_above(self) -> ServerSettings:
        if (
            self.max_message_timeout_ms is not None
            and self.max_message_timeout_ms <= self.message_timeout_ms
        ):
            raise ValueError("max_message_timeout_ms must be larger than message_timeout_ms")
        return self

    @property
    def soft_budget_s(self) -> float:
        """Time a message may take before Envoy's ``message_timeout`` needs extending."""
        return (self.message_timeout_ms - self.budget_margin_ms) / 1000

    @property
    def budget_s(self) -> float:
        """Time a message may spend in the plugin chain: up to ``max_message_timeout`` when
        Envoy allows extending it (``override_message_timeout``), else ``message_timeout``,
        minus the margin."""
        limit = self.max_message_timeout_ms or self.message_timeout_ms
        return (limit - self.budget_margin_ms) / 1000


class RedisSettings(_Strict):
    url: str = Field(description="redis://host:port/db, rediss://... or unix:///path.sock")
    username: str | None = Field(
        None, description="ACL user: secret reference (env:NAME, file:/path)"
    )
    password: str | None = Field(None, description="secret reference: env:NAME or file:/path")
    timeout_ms: int = Field(50, ge=1, le=10_000, description="connect and command timeout")
    max_connections: int = Field(64, ge=1, le=10_000, description="pool size per worker")
    tls_ca_file: str | None = Field(None, description="CA bundle for rediss://")
    tls_cert_file: str | None = Field(None, description="client certificate for rediss://")
    tls_key_file: str | None = Field(None, description="client key for rediss://")


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    sensitive_headers: tuple[str, ...] = Field(
        ("authorization", "cookie", "set-cookie", "proxy-authorization", "x-api-key"),
        description="header values never logged",
    )


def _otlp_url(value: str | None) -> str | None:
    """An OTLP/gRPC endpoint must say whether it is TLS: the OpenTelemetry exporter takes
    ``collector:4317`` (no scheme) as TLS, which a plaintext collector refuses, so every
    export would fail quietly."""
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or not rest.strip("/"):
        raise ValueError(
            f"{value!r}: write http://HOST:PORT (plaintext gRPC, e.g. a collector next to the "
            "sidecar) or https://HOST:PORT (TLS)"
        )
    return value


class TracingSettings(_Strict):
    exporter: Literal["none", "console", "otlp"] = "none"
    sample_ratio: float = Field(0.01, ge=0.0, le=1.0, description="share of streams traced")
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC collector: http://host:4317 (plaintext) or https://host:4317",
    )
    service_name: str = "extproc"

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _otlp_url(value)


class MetricsSettings(_Strict):
    """Prometheus text on the admin ``/metrics`` always; OTLP push besides when configured."""

    otlp_endpoint: str | None = Field(
        None,
        description="also push metrics to this OTLP/gRPC collector: http://host:4317 "
        "(plaintext) or https://host:4317",
    )
    export_interval_s: float = Field(
        60.0, ge=1.0, le=3600.0, description="seconds between OTLP pushes"
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _otlp_url(value)


class PluginEntry(_Strict):
    plugin: str = Field(description="registered plugin name (entry point in extproc.plugins)")
    name: str | None = Field(None, description="instance name, defaults to the plugin name")
    enabled: bool = True
    priority: int | None = Field(None, description="overrides the plugin's own priority")
    timeout_ms: int = Field(50, ge=1, le=600_000, description="deadline per call")
    fail: Literal["open", "closed"] = Field(
        "closed", description="on error or timeout: continue (open) or answer 5xx (closed)"
    )
    shadow: bool = Field(False, description="report-only: decisions are logged, not applied")
    rollout: RolloutSettings = Field(
        default_factory=RolloutSettings,
        description="run for a share of requests or only for requests with a header",
    )
    isolate: bool | None = Field(
        None,
        description="run each call in its own task (hard deadline); default: unless the "
        "plugin declares cancellation_safe",
    )
    breaker_failures: int = Field(
        20, ge=1, description="consecutive failures that open the plugin's breaker"
    )
    breaker_reset_s: float = Field(5.0, gt=0, description="time before a trial call")
    config: dict[str, Any] = Field(default_factory=dict, description="the plugin's own section")

    @property
    def instance(self) -> str:
        """The instance name before the plugin class is known (``name`` or ``plugin``)."""
        return self.name or self.plugin


def instance_name(entry: PluginEntry, cls: type[Plugin]) -> str:
    """The name an instance is known by in metrics, logs and ``/status``: the configured
    ``name``, else the plugin's own ``name`` (so ``plugin: pkg.mod:Class`` reads well)."""
    return entry.name or cls.name or entry.plugin


class Config(_Strict):
    version: Literal[1] = 1
    server: ServerSettings = Field(default_factory=ServerSettings)
    redis: RedisSettings | None = None
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    plugins: tuple[PluginEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A fully validated configuration: the settings plus each plugin's class and config."""

    config: Config
    plugins: tuple[tuple[PluginEntry, type[Plugin], PluginConfig], ...]
    source: str
    digest: str

    def section_digest(self, index: int) -> str:
        """Identity of one plugin section, to decide whether state can be handed over."""
        _entry, cls, cfg = self.plugins[index]
        payload = f"{cls.__module__}.{cls.__qualname__}:{cls.version}:{cfg.model_dump_json()}"
        payload += f":{self.config.redis.model_dump_json() if self.config.redis else ''}"
        return hashlib.sha256(payload.encode()).hexdigest()


class ConfigError(Exception):
    """The configuration is not valid. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------- line numbers


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of the YAML document to its 1-based line."""
    out: dict[tuple[str | int, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else str(key)
                out[(*path, k)] = key.start_mark.line + 1
                walk(value, (*path, k))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return out


def _where(lines: dict[tuple[str | int, ...], int], path: Iterable[str | int]) -> int:
    p = tuple(path)
    while p and p not in lines:
        p = p[:-1]
    return lines.get(p, 1)


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _members(t: Any) -> list[Any]:
    """The types an annotation may hold: ``X | None``, ``Union[...]`` and ``Annotated[X, ...]``
    taken apart."""
    origin = typing.get_origin(t)
    if origin is typing.Annotated:
        return _members(typing.get_args(t)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(t) for m in _members(arg)]
    return [t]


def _step(t: Any, part: str | int) -> Any:
    """The type found at ``part`` (a key or an index of a validation error's location) in a
    value of type ``t``; None when the annotations do not say."""
    for m in _members(t):
        origin = typing.get_origin(m)
        args = typing.get_args(m)
        if isinstance(part, int):
            if origin in (list, tuple, Sequence, set, frozenset) and args:
                return args[0]
        elif isinstance(m, type) and issubclass(m, BaseModel):
            if m.__name__ == part:  # a union's member, named in the location
                return m
            for name, field in m.model_fields.items():
                if part in (name, field.alias):
                    return field.annotation
        elif origin in (dict, Mapping) and len(args) == 2:
            return args[1]
    return None


def _keys_at(model: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """The keys ``model`` accepts in the mapping at ``path``: what a misspelt key could have
    meant (none when the annotations do not lead to a model there)."""
    t: Any = model
    for part in path:
        t = _step(t, part)
        if t is None:
            return []
    for m in _members(t):
        if isinstance(m, type) and issubclass(m, BaseModel):
            return [field.alias or name for name, field in m.model_fields.items()]
    return []


def _unknown_key(model: type[BaseModel], loc: Sequence[str | int]) -> str:
    """The hint after "Extra inputs are not permitted": the key meant, or the keys there."""
    try:
        known = _keys_at(model, loc[:-1])
    except TypeError:  # an annotation this walk does not understand: no hint, the error stays
        return ""
    if not known:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.75)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (the keys here: {', '.join(sorted(known))})"


def _problems(
    exc: ValidationError,
    source: str,
    lines: dict[tuple[str | int, ...], int],
    prefix: tuple[str | int, ...],
    model: type[BaseModel],
) -> list[tuple[int, str]]:
    out = []
    errors = exc.errors(include_url=False, include_input=False)
    inside = {err["loc"][:n] for err in errors for n in range(len(err["loc"]))}
    for err in errors:
        if err["type"] == "too_short" and err["loc"] in inside:
            continue  # a list whose invalid items were left out: those items' errors tell
        loc = (*prefix, *(p for p in err["loc"] if not (isinstance(p, str) and "[" in p)))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg += _unknown_key(model, err["loc"])
        line = _where(lines, loc)
        out.append((line, f"{source}:{line}: {_dotted(loc)}: {msg}"))
    return out


def _entries(data: Mapping[str, Any]) -> list[tuple[int, PluginEntry]]:
    """The plugin entries that are valid on their own, by index, when the file as a whole is
    not: their plugins' sections are checked too, so one pass shows every problem."""
    raw = data.get("plugins")
    out = []
    for i, item in enumerate(raw if isinstance(raw, list) else ()):
        try:
            out.append((i, PluginEntry.model_validate(item)))
        except ValidationError:  # the file's own validation reported it
            continue
    return out


# ---------------------------------------------------------------- loading


def parse_config(text: str, source: str = "<config>", resolve: Any = None) -> LoadedConfig:
    """Validate a configuration text. ``resolve(name) -> type[Plugin]`` finds plugin classes
    (the registry's by default). Raises :class:`ConfigError` listing every problem."""
    if resolve is None:
        from extproc.registry import resolve_plugin

        resolve = resolve_plugin
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{source}:{line}: YAML syntax error: {reason}"]) from None
    if data is None:
        data = {}
    lines = _line_index(text)
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}:1: the top level must be a mapping"])
    problems: list[tuple[int, str]] = []  # (line, problem)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems(exc, source, lines, (), Config))
    loaded: list[tuple[PluginEntry, type[Plugin], PluginConfig]] = []
    # without valid server settings there is no budget to check the deadlines against
    budget_ms = round(config.server.budget_s * 1000) if config is not None else None
    margin_ms = config.server.budget_margin_ms if config is not None else 0
    entries = list(enumerate(config.plugins)) if config is not None else _entries(data)
    seen: set[str] = set()
    for i, entry in entries:
        where = ("plugins", i)
        try:
            cls = resolve(entry.plugin)
        except LookupError as exc:
            line = _where(lines, (*where, "plugin"))
            problems.append((line, f"{source}:{line}: {_dotted((*where, 'plugin'))}: {exc}"))
            continue
        try:
            plugin_config = cls.Config.model_validate(entry.config)
        except ValidationError as exc:
            problems.extend(_problems(exc, source, lines, (*where, "config"), cls.Config))
            continue
        if budget_ms is not None and entry.timeout_ms > budget_ms:
            line = _where(lines, (*where, "timeout_ms"))
            problems.append(
                (
                    line,
                    f"{source}:{line}: {_dotted((*where, 'timeout_ms'))}: {entry.timeout_ms} ms "
                    f"cannot fit the message budget of {budget_ms} ms ((max_)message_timeout_ms "
                    f"- budget_margin_ms {margin_ms})",
                )
            )
            continue
        name = instance_name(entry, cls)
        if name in seen:
            line = _where(lines, where)
            problems.append(
                (
                    line,
                    f"{source}:{line}: {_dotted(where)}: two plugins are named {name!r}: give one "
                    f"a distinct `name`",
                )
            )
            continue
        seen.add(name)
        loaded.append((entry, cls, plugin_config))
    if problems or config is None:
        raise ConfigError(source, [p for _, p in sorted(problems, key=lambda lp: lp[0])])
    digest = hashlib.sha256(text.encode()).hexdigest()
    return LoadedConfig(config, tuple(loaded), source, digest)


def load_config(path: str | Path, resolve: Any = None) -> LoadedConfig:
    """Read and validate a configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [f"{p}: cannot read: {exc}"]) from None
    return parse_config(text, str(p), resolve)
