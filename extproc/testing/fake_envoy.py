"""FakeEnvoy: plays Envoy's side of the ext_proc protocol, for tests.

It sends exactly the messages Envoy would send for a processing mode (no phase the mode skips,
bodies as one message when BUFFERED, in chunks when STREAMED or FULL_DUPLEX_STREAMED), checks
every answer the way Envoy does (one reply per message, of the matching type or an immediate
response; anything else is *spurious* and fails the exchange, as it would fail the request with
a 500 in Envoy), and applies the mutations, so a test sees what the upstream and the client
would see.

Two ways to drive it:

* ``FakeEnvoy.for_plugins([plugin, ...])`` - in process, no sockets: the plugins run in a real
  :class:`~extproc.chain.Chain` behind the real protocol code, messages go through protobuf
  bytes both ways;
* ``FakeEnvoy.connect("127.0.0.1:50051")`` - over gRPC against a running sidecar.

Like Envoy, it takes a stream the sidecar ends with status OK as "no more messages needed":
the rest of the exchange goes on unchanged, without the sidecar (``Exchange.sidecar_closed``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.chain import Chain, Slot
from extproc.observability.metrics import Registry
from extproc.plugin import Phase, Plugin
from extproc.protocol import codec
from extproc.protocol.events import AppendAction, BodySendMode
from extproc.services.breaker import CircuitBreaker
from extproc.stream import StreamMetrics, StreamProcessor

__all__ = ["EnvoyMode", "Exchange", "FakeEnvoy", "SpuriousResponseError"]


class SpuriousResponseError(AssertionError):
    """The sidecar answered something Envoy would reject (it would answer the client 500)."""


@dataclass(frozen=True, slots=True)
class EnvoyMode:
    """The processing mode Envoy is configured with (``processing_mode`` in the filter)."""

    request_headers: bool = True
    response_headers: bool = False
    request_body: BodySendMode = BodySendMode.NONE
    response_body: BodySendMode = BodySendMode.NONE
    request_trailers: bool = False
    response_trailers: bool = False
    observability_mode: bool = False


@dataclass(slots=True)
class Exchange:
    """What happened to one HTTP request.

    ``status``/``response_headers``/``response_body`` are what the client got;
    ``upstream_headers``/``upstream_body`` what the upstream got (``None`` when the request
    was answered before reaching it).
    """

    status: int = 0
    response_headers: dict[str, list[str]] = field(default_factory=dict)
    response_body: bytes = b""
    upstream_headers: dict[str, list[str]] | None = None
    upstream_body: bytes | None = None
    upstream_trailers: dict[str, list[str]] | None = None
    immediate: bool = False
    details: str = ""
    dynamic_metadata: dict[str, Any] = field(default_factory=dict)
    messages_sent: list[Phase] = field(default_factory=list)
    mode_override: pb.ProcessingResponse | None = None
    #: the sidecar ended the stream (status OK) before the exchange was over
    sidecar_closed: bool = False

    def header(self, name: str) -> str | None:
        values = self.response_headers.get(name.lower())
        return values[0] if values else None

    def upstream_header(self, name: str) -> str | None:
        values = (self.upstream_headers or {}).get(name.lower())
        return values[0] if values else None


Headers = dict[str, list[str]]


def _to_map(headers: Mapping[str, str] | Sequence[tuple[str, str]]) -> Headers:
    out: Headers = {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    for k, v in items:
        out.setdefault(k.lower(), []).append(v)
    return out


def _fill(target: Any, headers: Headers) -> None:
    for key, values in headers.items():
        for value in values:
            hv = target.headers.add()
            hv.key = key
            hv.raw_value = value.encode("utf-8", "surrogateescape")


def _apply(headers: Headers, mutation: Any) -> None:
    """Apply a HeaderMutation the way Envoy does: removes first, then sets."""
    for key in mutation.remove_headers:
        headers.pop(key.lower(), None)
    for opt in mutation.set_headers:
        key = opt.header.key.lower()
        value = (opt.header.raw_value or opt.header.value.encode()).decode(
            "utf-8", "surrogateescape"
        )
        action = opt.append_action
        if action == AppendAction.APPEND_IF_EXISTS_OR_ADD:
            headers.setdefault(key, []).append(value)
        elif action == AppendAction.ADD_IF_ABSENT:
            headers.setdefault(key, [value])
        elif action == AppendAction.OVERWRITE_IF_EXISTS_OR_ADD or (
            action == AppendAction.OVERWRITE_IF_EXISTS and key in headers
        ):
            headers[key] = [value]


_EXPECTED = {
    Phase.REQUEST_HEADERS: "request_headers",
    Phase.RESPONSE_HEADERS: "response_headers",
    Phase.REQUEST_BODY: "request_body",
    Phase.RESPONSE_BODY: "response_body",
    Phase.REQUEST_TRAILERS: "request_trailers",
    Phase.RESPONSE_TRAILERS: "response_trailers",
}


class _Closed:
    """The sidecar ended the stream with status OK: no more messages are needed."""


CLOSED = _Closed()


class _Transport:
    async def open(self) -> None: ...
    async def send(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | _Closed | None: ...
    async def close(self) -> None: ...


class _InProcess(_Transport):
    def __init__(self, chain: Chain, metrics: StreamMetrics, allow_mode_override: bool) -> None:
        self.chain = chain
        self.metrics = metrics
        self.allow = allow_mode_override
        self.stream: StreamProcessor | None = None

    async def open(self) -> None:
        self.stream = StreamProcessor(self.chain, self.metrics, allow_mode_override=self.allow)

    async def send(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | _Closed | None:
        assert self.stream is not None
        if self.stream.finished:  # what the server does: end the RPC, read nothing more
            return CLOSED
        wire = pb.ProcessingRequest.FromString(req.SerializeToString())
        msg = codec.decode(wire)
        reply = await self.stream.handle(msg)
        if reply is None:
            return None
        # the bytes the server would write (prebuilt and cached replies included)
        parsed: pb.ProcessingResponse = pb.ProcessingResponse.FromString(
            codec.encode_bytes(msg.phase, reply)
        )
        return parsed


class _Grpc(_Transport):
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel: Any = None
        self.call: Any = None
        self.extensions = 0

    async def open(self) -> None:
        import grpc

        from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as g

        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.target)
        self.call = g.ExternalProcessorStub(self.channel).Process()  # type: ignore[no-untyped-call]

    async def send(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | _Closed | None:
        import grpc

        if self.call.done():
            return await self._ended()
        try:
            await self.call.write(req)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # the call ended between done() and the write; grpc then replaces the sidecar's
            # status with its own INTERNAL, so it cannot be read: taken as ended, as Envoy
            # takes a stream the sidecar ended with OK
            return CLOSED
        if req.observability_mode:
            return None
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            return await self._ended()
        if resp.WhichOneof("response") is None:
            if not resp.HasField("override_message_timeout"):
                raise SpuriousResponseError("a response with neither a reply nor a timeout")
            self.extensions += 1  # Envoy takes one per message, then waits longer
            resp = await self.call.read()
        if resp is grpc.aio.EOF:
            return await self._ended()
        assert isinstance(resp, pb.ProcessingResponse)
        return resp

    async def _ended(self) -> _Closed:
        """The call is over: fine with status OK (Envoy goes on without the sidecar); any
        other status fails the exchange, as it fails the request in Envoy."""
        import grpc

        code = await self.call.code()
        if code is not grpc.StatusCode.OK:
            raise SpuriousResponseError(f"the sidecar ended the stream with {code.name}")
        return CLOSED

    async def close(self) -> None:
        if self.call is not None:
            await self.call.done_writing()
            self.call = None

    async def aclose(self) -> None:
        await self.close()
        if self.channel is not None:
            await self.channel.close()


class FakeEnvoy:
    """Sends HTTP exchanges through the ext_proc protocol like Envoy would."""

    def __init__(self, transport: _Transport, mode: EnvoyMode, chunk_size: int = 16384) -> None:
        self.transport = transport
        self.mode = mode
        self.chunk_size = chunk_size

    @classmethod
    def for_plugins(
        cls,
        plugins: Sequence[Plugin],
        mode: EnvoyMode | None = None,
        *,
        timeout: float = 1.0,
        fail_open: bool = False,
        budget: float = 0.18,
        registry: Registry | None = None,
        allow_mode_override: bool = False,
    ) -> FakeEnvoy:
        """In process: the given (already initialized) plugins in a real chain."""
        registry = registry or Registry()
        slots = [
            Slot(
                plugin=p,
                name=p.name or type(p).__name__,
                priority=p.priority,
                timeout=timeout,
                fail_open=fail_open,
                breaker=CircuitBreaker(f"plugin:{p.name}", failure_threshold=1000),
                needs=p.needs_for(p.config),
            )
            for p in plugins
        ]
        if mode is None:
            mode = mode_for(plugins)
        chain = Chain(slots, budget=budget, registry=registry)
        return cls(_InProcess(chain, StreamMetrics(registry), allow_mode_override), mode)

    @classmethod
    def connect(cls, target: str, mode: EnvoyMode | None = None) -> FakeEnvoy:
        """Over gRPC, against a running sidecar."""
        return cls(_Grpc(target), mode or EnvoyMode())

    async def aclose(self) -> None:
        if isinstance(self.transport, _Grpc):
            await self.transport.aclose()

    def _chunks(self, body: bytes, mode: BodySendMode) -> list[bytes]:
        if mode in (BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL, BodySendMode.GRPC):
            return [body]
        size = self.chunk_size
        return [body[i : i + size] for i in range(0, len(body), size)] or [b""]

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        trailers: Mapping[str, str] | None = None,
        *,
        authority: str = "example.com",
        attributes: Mapping[str, Any] | None = None,
        upstream_status: int = 200,
        upstream_headers: Mapping[str, str] | None = None,
        upstream_body: bytes = b"ok",
        upstream_trailers: Mapping[str, str] | None = None,
    ) -> Exchange:
        """One HTTP request through the filter; the upstream answers with ``upstream_*``."""
        await self.transport.open()
        try:
            return await self._exchange(
                method, path, headers, body, trailers, authority, attributes,
                upstream_status, upstream_headers, upstream_body, upstream_trailers,
            )  # fmt: skip
        finally:
            await self.transport.close()

    async def _exchange(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        body: bytes,
        trailers: Mapping[str, str] | None,
        authority: str,
        attributes: Mapping[str, Any] | None,
        upstream_status: int,
        upstream_headers: Mapping[str, str] | None,
        upstream_body: bytes,
        upstream_trailers: Mapping[str, str] | None,
    ) -> Exchange:
        mode = self.mode
        ex = Exchange()
        req_headers = {
            ":method": [method], ":path": [path], ":authority": [authority], ":scheme": ["http"],
            **_to_map(headers),
        }  # fmt: skip
        if body and "content-length" not in req_headers:
            req_headers["content-length"] = [str(len(body))]
        first = True

        def new(phase: Phase) -> pb.ProcessingRequest:
            nonlocal first
            r = pb.ProcessingRequest()
            if first:
                r.protocol_config.request_body_mode = mode.request_body  # type: ignore[assignment]
                r.protocol_config.response_body_mode = mode.response_body  # type: ignore[assignment]
                if attributes:
                    r.attributes["envoy.filters.http.ext_proc"].update(dict(attributes))
                first = False
            r.observability_mode = mode.observability_mode
            return r

        async def send(phase: Phase, r: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
            if ex.sidecar_closed:  # Envoy sends nothing more, the exchange goes on unchanged
                return None
            ex.messages_sent.append(phase)
            resp = await self.transport.send(r)
            if isinstance(resp, _Closed):
                ex.messages_sent.pop()
                ex.sidecar_closed = True
                return None
            if resp is None:
                return None
            kind = resp.WhichOneof("response")
            if kind == "immediate_response":
                ir = resp.immediate_response
                ex.immediate = True
                ex.status = ir.status.code or 200
                ex.response_headers = {}
                _apply(ex.response_headers, ir.headers)
                ex.response_body = ir.body
                ex.details = ir.details
                return resp
            if kind != _EXPECTED[phase]:
                raise SpuriousResponseError(f"answered {phase.value} with {kind}")
            if resp.HasField("mode_override") and phase not in (
                Phase.REQUEST_HEADERS,
                Phase.RESPONSE_HEADERS,
            ):
                raise SpuriousResponseError(f"mode_override on a {phase.value} reply")
            if resp.HasField("mode_override"):
                ex.mode_override = resp
            if resp.HasField("dynamic_metadata"):
                ex.dynamic_metadata.update(codec.struct_to_dict(resp.dynamic_metadata))
            return resp

        async def side(
            prefix: str,
            headers: Headers,
            send_headers: bool,
            content: bytes,
            body_mode: BodySendMode,
            trailer_map: Headers | None,
            send_trailers: bool,
        ) -> bytes | None:
            """One direction (request or response) as Envoy sends it; mutates ``headers``
            and ``trailer_map`` in place and returns the body that goes on, or ``None``
            when an immediate response ended the exchange."""
            phases = {k: Phase(f"{prefix}_{k}") for k in ("headers", "body", "trailers")}
            if send_headers:
                r = new(phases["headers"])
                part = getattr(r, f"{prefix}_headers")
                _fill(part.headers, headers)
                part.end_of_stream = not (content or trailer_map is not None)
                resp = await send(phases["headers"], r)
                if ex.immediate:
                    return None
                if resp is not None:
                    _apply(headers, getattr(resp, f"{prefix}_headers").response.header_mutation)
            passed = content
            if content and body_mode is not BodySendMode.NONE:
                out = bytearray()
                chunks = self._chunks(content, body_mode)
                for i, chunk in enumerate(chunks):
                    r = new(phases["body"])
                    part = getattr(r, f"{prefix}_body")
                    part.body = chunk
                    part.end_of_stream = i == len(chunks) - 1 and trailer_map is None
                    resp = await send(phases["body"], r)
                    if ex.immediate:
                        return None
                    out += _body_after(
                        chunk, resp, body_mode, headers,
                        lambda p: getattr(p, f"{prefix}_body").response,
                    )  # fmt: skip
                passed = bytes(out)
            if trailer_map is not None and send_trailers:
                r = new(phases["trailers"])
                _fill(getattr(r, f"{prefix}_trailers").trailers, trailer_map)
                resp = await send(phases["trailers"], r)
                if ex.immediate:
                    return None
                if resp is not None:
                    _apply(trailer_map, getattr(resp, f"{prefix}_trailers").header_mutation)
            return passed

        up_trailers = _to_map(trailers) if trailers is not None else None
        sent_body = await side(
            "request", req_headers, mode.request_headers, body, mode.request_body,
            up_trailers, mode.request_trailers,
        )  # fmt: skip
        if sent_body is None:
            return ex
        ex.upstream_headers = req_headers
        ex.upstream_body = sent_body
        ex.upstream_trailers = up_trailers
        resp_headers = {":status": [str(upstream_status)], **_to_map(upstream_headers or {})}
        down_trailers = _to_map(upstream_trailers) if upstream_trailers is not None else None
        client_body = await side(
            "response", resp_headers, mode.response_headers, upstream_body, mode.response_body,
            down_trailers, mode.response_trailers,
        )  # fmt: skip
        if client_body is None:
            return ex
        ex.status = int(resp_headers.get(":status", ["0"])[0])
        ex.response_headers = {k: v for k, v in resp_headers.items() if not k.startswith(":")}
        ex.response_body = client_body
        return ex

    async def requests(self, n: int, **kwargs: Any) -> AsyncIterator[Exchange]:
        for _ in range(n):
            yield await self.request(**kwargs)


def _body_after(
    chunk: bytes,
    resp: pb.ProcessingResponse | None,
    mode: BodySendMode,
    headers: Headers,
    common_of: Any,
) -> bytes:
    if resp is None:
        return chunk
    common = common_of(resp)
    _apply(headers, common.header_mutation)
    mutation = common.body_mutation
    which = mutation.WhichOneof("mutation")
    if mode is BodySendMode.FULL_DUPLEX_STREAMED:
        if which != "streamed_response":
            raise SpuriousResponseError(
                "FULL_DUPLEX_STREAMED body answered without streamed_response: the upstream "
                "would get an empty body"
            )
        return bytes(mutation.streamed_response.body)
    if which == "streamed_response":
        raise SpuriousResponseError("streamed_response outside FULL_DUPLEX_STREAMED")
    if which == "body":
        length = [str(len(mutation.body))]
        if mode is BodySendMode.BUFFERED and headers.get("content-length", length) != length:
            raise SpuriousResponseError("changed BUFFERED body without matching content-length")
        return bytes(mutation.body)
    if which == "clear_body":
        return b""
    return chunk


def mode_for(plugins: Sequence[Plugin]) -> EnvoyMode:
    """The mode ``extproc envoy-config`` would generate for these plugins."""
    from extproc.plugin import BodyMode

    def body(modes: list[BodyMode]) -> BodySendMode:
        if BodyMode.BUFFERED in modes:
            return BodySendMode.BUFFERED
        if BodyMode.STREAMED in modes:
            return BodySendMode.STREAMED
        return BodySendMode.NONE

    needs = [p.needs_for(p.config) for p in plugins]
    req_body = body([n.request_body for n in needs])
    resp_body = body([n.response_body for n in needs])
    return EnvoyMode(
        request_headers=True,
        response_headers=any(n.response_headers for n in needs)
        or resp_body is not BodySendMode.NONE,
        request_body=req_body,
        response_body=resp_body,
        request_trailers=any(n.request_trailers for n in needs),
        response_trailers=any(n.response_trailers for n in needs),
    )
