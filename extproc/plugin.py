"""The plugin API (version 1).

A plugin is a class with a ``name``, a ``version``, a ``priority`` and the phases it needs
(:class:`Needs`). The server builds one instance per configuration generation, calls
``initialize`` once, then ``on_request`` / ``on_response`` for every message of every phase the
plugin declared, and ``shutdown`` when the generation is retired.

Hooks receive typed, frozen events and return a result:

* :data:`CONTINUE` / :class:`Continue` - go on, optionally with header (and body) mutations;
* :class:`Respond` - answer the client now with this status, headers and body;
* :class:`Reject` - answer with a safe JSON error (``{"error": ..., "message": ...}``).

Plugins never see gRPC or protobuf: this module, :mod:`extproc.context` and the events are the
whole surface, and it follows semantic versioning through :data:`API_VERSION`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeVar, overload

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from extproc.context import PluginContext, RequestContext

__all__ = [
    "API_VERSION",
    "CONTINUE",
    "BodyMode",
    "Continue",
    "ErrorEvent",
    "ErrorKind",
    "Event",
    "Headers",
    "HealthState",
    "HealthStatus",
    "HttpRequest",
    "Needs",
    "Phase",
    "Plugin",
    "PluginConfig",
    "Reject",
    "RequestBody",
    "RequestEvent",
    "RequestHeaders",
    "RequestTrailers",
    "Respond",
    "ResponseBody",
    "ResponseEvent",
    "ResponseHeaders",
    "ResponseTrailers",
    "Result",
]

#: The plugin API version. A plugin declares the major version it was written for in
#: ``Plugin.api_version``; the loader refuses a plugin whose major version differs.
API_VERSION: Final = "1.0"

_T = TypeVar("_T")
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


class Phase(enum.Enum):
    """The six places in an HTTP exchange where Envoy can call us."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"

    # members are singletons: identity hashing is exact, and C-speed (Enum's own __hash__ is
    # a Python call, and phases key dicts on the hot path)
    __hash__ = object.__hash__

    @property
    def is_request(self) -> bool:
        return self in _REQUEST_PHASES


_REQUEST_PHASES: Final = frozenset(
    {Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.REQUEST_TRAILERS}
)


class BodyMode(enum.Enum):
    """How a plugin wants a body: not at all, as one event, or one event per chunk."""

    NONE = "none"
    BUFFERED = "buffered"
    STREAMED = "streamed"


@dataclass(frozen=True, slots=True)
class Needs:
    """The phases a plugin declares. The server asks Envoy only for the union of them, and never
    calls a plugin for a phase it did not declare."""

    request_headers: bool = True
    request_body: BodyMode = BodyMode.NONE
    request_trailers: bool = False
    response_headers: bool = False
    response_body: BodyMode = BodyMode.NONE
    response_trailers: bool = False

    def phases(self) -> frozenset[Phase]:
        out = set()
        if self.request_headers:
            out.add(Phase.REQUEST_HEADERS)
        if self.request_body is not BodyMode.NONE:
            out.add(Phase.REQUEST_BODY)
        if self.request_trailers:
            out.add(Phase.REQUEST_TRAILERS)
        if self.response_headers:
            out.add(Phase.RESPONSE_HEADERS)
        if self.response_body is not BodyMode.NONE:
            out.add(Phase.RESPONSE_BODY)
        if self.response_trailers:
            out.add(Phase.RESPONSE_TRAILERS)
        return frozenset(out)


class Headers(Mapping[str, str]):
    """Read-only HTTP headers with lower-case keys.

    ``headers[key]`` is the first value; :meth:`get_all` gives every value in arrival order
    (Envoy sends repeated headers as separate entries). Values that are not valid UTF-8 are
    decoded with ``surrogateescape`` so that they round-trip to the same bytes.
    """

    __slots__ = ("_first", "_items", "_repeated")

    def __init__(self, items: tuple[tuple[str, str], ...] = ()) -> None:
        self._items = items
        # the first value of each key wins: build from the end so earlier entries overwrite
        self._first: dict[str, str] = dict(reversed(items))
        self._repeated = len(self._first) != len(items)  # else get_all needs no scan

    @classmethod
    def of(cls, mapping: Mapping[str, str] | None = None, **kwargs: str) -> Headers:
        """Build headers from a mapping (keys are lower-cased): handy in tests."""
        pairs = dict(mapping or {}, **kwargs)
        return cls(tuple((k.lower(), v) for k, v in pairs.items()))

    def __getitem__(self, key: str) -> str:
        return self._first[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)

    def __contains__(self, key: object) -> bool:
        return key in self._first

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, /, default: str | _T) -> str | _T: ...
    def get(self, key: str, /, default: Any = None) -> Any:  # C-speed, unlike Mapping.get
        return self._first.get(key, default)

    def __hash__(self) -> int:
        return hash(self._items)

    def raw(self, key: str) -> bytes | None:
        """The first value as the bytes Envoy sent (values need not be UTF-8)."""
        value = self._first.get(key)
        return None if value is None else value.encode("utf-8", "surrogateescape")

    def get_all(self, key: str) -> tuple[str, ...]:
        if not self._repeated:
            value = self._first.get(key)
            return () if value is None else (value,)
        return tuple(v for k, v in self._items if k == key)

    def items_all(self) -> tuple[tuple[str, str], ...]:
        """Every (key, value) pair, repeated keys included, in arrival order."""
        return self._items

    def __repr__(self) -> str:  # never print values: they may carry credentials
        return f"Headers(keys={sorted(self._first)!r})"


_NO_HEADERS: Final = Headers()


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What is known about the HTTP request, from its headers and Envoy's attributes.

    ``path`` is the ``:path`` as Envoy forwards it (after Envoy's own normalisation), query
    included; ``route_path`` is the same without the query string, the one to match rules on.
    """

    method: str = ""
    path: str = ""
    authority: str = ""
    scheme: str = ""
    request_id: str = ""
    headers: Headers = _NO_HEADERS
    attributes: Mapping[str, Any] = field(default_factory=_empty)
    metadata: Mapping[str, Any] = field(default_factory=_empty)

    @property
    def route_path(self) -> str:
        return self.path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    request: HttpRequest
    context: RequestContext
    end_of_stream: bool = False
    phase: ClassVar[Phase] = Phase.REQUEST_HEADERS

    @property
    def headers(self) -> Headers:
        return self.request.headers


@dataclass(frozen=True, slots=True)
class RequestBody:
    """A request body: the whole body for a BUFFERED plugin, one chunk for a STREAMED one."""

    request: HttpRequest
    context: RequestContext
    body: bytes
    end_of_stream: bool
    phase: ClassVar[Phase] = Phase.REQUEST_BODY


@dataclass(frozen=True, slots=True)
class RequestTrailers:
    request: HttpRequest
    context: RequestContext
    trailers: Headers
    phase: ClassVar[Phase] = Phase.REQUEST_TRAILERS


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    request: HttpRequest
    context: RequestContext
    status: int
    headers: Headers
    end_of_stream: bool = False
    phase: ClassVar[Phase] = Phase.RESPONSE_HEADERS


@dataclass(frozen=True, slots=True)
class ResponseBody:
    request: HttpRequest
    context: RequestContext
    body: bytes
    end_of_stream: bool
    phase: ClassVar[Phase] = Phase.RESPONSE_BODY


@dataclass(frozen=True, slots=True)
class ResponseTrailers:
    request: HttpRequest
    context: RequestContext
    trailers: Headers
    phase: ClassVar[Phase] = Phase.RESPONSE_TRAILERS


RequestEvent = RequestHeaders | RequestBody | RequestTrailers
ResponseEvent = ResponseHeaders | ResponseBody | ResponseTrailers
Event = RequestEvent | ResponseEvent


#: why a hook failed (``ErrorEvent.kind``)
ErrorKind = Literal["exception", "timeout", "breaker_open", "bad_result"]


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Given to ``on_error`` when one of the plugin's own hooks failed.

    ``kind`` is ``"exception"``, ``"timeout"`` (its deadline expired), ``"breaker_open"``
    (skipped because it failed too often lately) or ``"bad_result"`` (it returned something
    that is not a result).
    """

    phase: Phase
    kind: ErrorKind
    error: BaseException | None
    request: HttpRequest
    context: RequestContext


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Continue:
    """Go on. Header mutations apply to the headers of the phase being processed (request
    headers in request phases, response headers in response phases); ``body`` replaces the body
    chunk of a body phase. ``metadata`` becomes Envoy dynamic metadata under the plugin's
    namespace (``extproc.<plugin name>``)."""

    set_headers: Mapping[str, str] = field(default_factory=_empty)
    #: another value for a header: a mapping, or (key, value) pairs to repeat a key
    #: (two ``set-cookie`` values, say)
    append_headers: Mapping[str, str] | Sequence[tuple[str, str]] = field(default_factory=_empty)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    metadata: Mapping[str, Any] | None = None

    @property
    def is_noop(self) -> bool:
        return not (
            self.set_headers
            or self.append_headers
            or self.remove_headers
            or self.body is not None
            or self.metadata
        )


#: The plain "go on": no mutations.
CONTINUE: Final = Continue()


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client now, without reaching (or instead of) the upstream."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=_empty)
    #: a short reason code for Envoy's access log (``%RESPONSE_CODE_DETAILS%``)
    details: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"Respond.status must be 200..599, got {self.status}")


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the request with a JSON error body that carries only what is given here.

    ``error`` is a stable machine-readable word (``unauthorized``, ``rate_limited``), ``message``
    a short human sentence: never put exception text or internals in either.
    """

    status: int
    error: str
    message: str = ""
    headers: Mapping[str, str] = field(default_factory=_empty)
    details: str = ""
    #: more fields for the JSON body (validation errors, say); ``error`` and ``message`` win
    extra: Mapping[str, Any] = field(default_factory=_empty)

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"Reject.status must be 400..599, got {self.status}")

    def to_respond(self) -> Respond:
        doc = {**self.extra, "error": self.error, "message": self.message}
        body = json.dumps(doc).encode()
        headers = {"content-type": "application/json", **self.headers}
        return Respond(self.status, body, headers, self.details or self.error)


Result = Continue | Respond | Reject


# ---------------------------------------------------------------- health


class HealthState(enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # serving, but something it depends on is impaired
    UNHEALTHY = "unhealthy"  # cannot serve correctly: readiness fails


@dataclass(frozen=True, slots=True)
class HealthStatus:
    state: HealthState = HealthState.HEALTHY
    detail: str = ""
    info: Mapping[str, Any] = field(default_factory=_empty)

    @classmethod
    def healthy(cls, detail: str = "") -> HealthStatus:
        return cls(HealthState.HEALTHY, detail)

    @classmethod
    def degraded(cls, detail: str) -> HealthStatus:
        return cls(HealthState.DEGRADED, detail)

    @classmethod
    def unhealthy(cls, detail: str) -> HealthStatus:
        return cls(HealthState.UNHEALTHY, detail)


# ---------------------------------------------------------------- plugin


class PluginConfig(BaseModel):
    """Base class of a plugin's configuration schema: unknown keys are errors, and a validated
    config is immutable. Give every field a type, a default, bounds and a description."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """Base class of every plugin. Override what you need; the defaults do nothing.

    Contracts of the hooks:

    * ``initialize`` runs once per generation before any request; it may do I/O. Raising makes
      the new configuration fail to load (the running one stays), so a plugin whose dependency
      is merely unavailable should start degraded instead of raising.
    * ``on_request`` / ``on_response`` run on the event loop, concurrently for many requests:
      they must not block (no ``time.sleep``, no blocking sockets, no CPU work longer than a
      fraction of a millisecond) and must return a :data:`Result`.
    * ``on_error`` is informational: it runs after the failure policy has decided.
    * ``health_check`` is called by the admin endpoints and gRPC health: keep it cheap.
    * ``shutdown`` runs once, after the generation's last stream has ended.
    """

    #: the name it is registered and configured under
    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.0.0"
    #: the plugin API major version this plugin was written against
    api_version: ClassVar[str] = "1"
    #: higher runs first (authentication ~1000, rate limiting ~900, header rewriting ~100)
    priority: ClassVar[int] = 0
    needs: ClassVar[Needs] = Needs()
    #: Envoy attributes the plugin reads, e.g. ``("source.address",)``
    attributes: ClassVar[tuple[str, ...]] = ()
    #: the pydantic schema of the plugin's ``config:`` section
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: True when the hooks let a cancellation end them promptly (no ``except BaseException``
    #: or ``except CancelledError`` that goes on waiting, no slow ``finally``). The chain then
    #: runs them inline - no task per call, and no timer for a call that does not wait - and
    #: enforces the deadline by cancelling. Left False, every call runs in a task of its own so
    #: the deadline holds whatever the hook does (a few microseconds more per call).
    cancellation_safe: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def needs_for(cls, config: Any) -> Needs:
        """The phases this plugin needs *with this configuration* (default: ``needs``).

        Override it when part of the configuration needs a phase the rest does not - say,
        response headers only when response rules are configured - so Envoy is not asked for
        messages no rule uses. The server and ``extproc envoy-config`` both ask this."""
        return cls.needs

    async def initialize(self, context: PluginContext) -> None:
        """Acquire resources. ``context`` stays valid until ``shutdown``."""

    async def on_request(self, event: RequestEvent) -> Result:
        return CONTINUE

    async def on_response(self, event: ResponseEvent) -> Result:
        return CONTINUE

    async def on_error(self, event: ErrorEvent) -> None:
        """Called after one of this plugin's hooks failed or timed out."""

    async def health_check(self) -> HealthStatus:
        return HealthStatus.healthy()

    def metrics(self) -> Mapping[str, float]:
        """Plugin-specific gauges reported on ``/status`` (counters go through
        ``context.metrics``)."""
        return {}

    async def shutdown(self) -> None:
        """Release resources (flush batches, close clients)."""

    def take_over(self, previous: Plugin) -> None:
        """Called on the new instance, before ``initialize``, when a reload left this plugin's
        configuration section unchanged: take state worth keeping (key sets, caches, counters)
        from the instance of the previous generation."""
