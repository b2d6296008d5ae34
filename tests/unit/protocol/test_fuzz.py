"""Fuzzing the protocol core: random ProcessingRequest sequences and random bytes.

Whatever Envoy (or a broken peer) sends, the stream processor either answers each message with
exactly one reply that encodes, or raises one of the protocol's own errors.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from google.protobuf import message as pb_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.chain import Chain, Slot
from extproc.observability.metrics import Registry
from extproc.plugin import (
    CONTINUE,
    BodyMode,
    Continue,
    Event,
    Needs,
    Phase,
    Plugin,
    Reject,
    Respond,
)
from extproc.protocol import codec
from extproc.protocol.events import BodySendMode
from extproc.protocol.state import LocalProtocolError, RemoteProtocolError
from extproc.services.breaker import CircuitBreaker
from extproc.stream import StreamMetrics, StreamProcessor

FIELD = {
    Phase.REQUEST_HEADERS: "request_headers",
    Phase.RESPONSE_HEADERS: "response_headers",
    Phase.REQUEST_BODY: "request_body",
    Phase.RESPONSE_BODY: "response_body",
    Phase.REQUEST_TRAILERS: "request_trailers",
    Phase.RESPONSE_TRAILERS: "response_trailers",
}
HEADER_PHASES = (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS)
BODY_PHASES = (Phase.REQUEST_BODY, Phase.RESPONSE_BODY)
TRAILER_PHASES = (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS)
FORBIDDEN = {"host", ":authority", ":method", ":scheme"}
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)

# ------------------------------------------------------------------ plugins


class Echo(Plugin):
    """Copies every header it sees into its mutations, so random keys and values (not UTF-8,
    CR/LF, forbidden names) reach the pre-flight checks and the encoder."""

    name = "echo"
    priority = 100
    needs = Needs(
        request_headers=True, response_headers=True, request_trailers=True, response_trailers=True
    )

    async def _hook(self, event: Event) -> Any:
        headers = getattr(event, "headers", None) or getattr(event, "trailers", None) or {}
        pairs = dict(headers)
        if "x-fuzz-none" in pairs:
            return None  # a bad result: the chain must cope
        if "x-fuzz-raise" in pairs:
            raise RuntimeError("boom")
        return Continue(
            set_headers={f"x-echo-{k}": v for k, v in pairs.items()} | pairs,
            append_headers=pairs,
            remove_headers=tuple(pairs),
            metadata={"seen": len(pairs)},
        )

    on_request = _hook  # type: ignore[assignment]
    on_response = _hook  # type: ignore[assignment]


class Gate(Plugin):
    """Rejects or responds depending on the content, in any phase."""

    name = "gate"
    priority = 50
    needs = Needs(
        request_headers=True,
        request_body=BodyMode.STREAMED,
        request_trailers=True,
        response_headers=True,
        response_body=BodyMode.STREAMED,
        response_trailers=True,
    )

    async def _hook(self, event: Event) -> Any:
        body = getattr(event, "body", b"")
        headers = getattr(event, "headers", None) or getattr(event, "trailers", None) or {}
        if b"deny" in body or "x-deny" in headers:
            return Reject(403, "forbidden", "no")
        if b"teapot" in body:
            return Respond(418, b"short and stout", {"x-tea": "1"}, "tea pot")
        if body:
            return Continue(body=body[::-1])
        return CONTINUE

    on_request = _hook  # type: ignore[assignment]
    on_response = _hook  # type: ignore[assignment]


class Gather(Plugin):
    """Wants whole bodies; replaces them."""

    name = "gather"
    priority = 10
    needs = Needs(
        request_headers=False, request_body=BodyMode.BUFFERED, response_body=BodyMode.BUFFERED
    )

    async def _hook(self, event: Event) -> Any:
        body = getattr(event, "body", b"")
        return Continue(body=b"" if len(body) % 2 else body + b"!", set_headers={"x-len": "1"})

    on_request = _hook  # type: ignore[assignment]
    on_response = _hook  # type: ignore[assignment]


def processor(fail_open: bool) -> StreamProcessor:
    registry = Registry()
    slots = [
        Slot(
            plugin=p,
            name=p.name,
            priority=p.priority,
            timeout=1.0,
            fail_open=fail_open,
            breaker=CircuitBreaker(f"plugin:{p.name}", failure_threshold=10_000),
            phases=p.needs.phases(),
        )
        for p in (Echo(None), Gate(None), Gather(None))
    ]
    chain = Chain(slots, budget=1.0, registry=registry)
    return StreamProcessor(chain, StreamMetrics(registry), max_body_bytes=256)


# ------------------------------------------------------------------ strategies

header_keys = st.one_of(
    st.sampled_from(
        [
            ":path",
            ":status",
            ":method",
            "host",
            ":authority",
            "x-envoy-foo",
            "content-length",
            "x-deny",
            "x-fuzz-none",
            "x-fuzz-raise",
            "x-a",
            "X-Upper",
            "bad key",
            "",
        ]
    ),
    st.text(max_size=12),
)
header_values = st.one_of(
    st.binary(max_size=16),
    st.sampled_from([b"\xff\xfe", b"a\r\nb", b"\x00", b"caf\xe9", b"ok"]),
)
bodies = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"deny", b"teapot", b"x" * 300]),
)
modes = st.sampled_from(list(BodySendMode))


@dataclass
class Spec:
    phase: Phase
    eos: bool
    headers: list[tuple[str, bytes, str | None]]
    body: bytes
    observability: bool
    config: tuple[BodySendMode, BodySendMode, bool] | None


@st.composite
def specs(draw: st.DrawFn, first: bool, observability: bool) -> Spec:
    phase = draw(st.sampled_from(list(Phase)))
    return Spec(
        phase=phase,
        eos=draw(st.booleans()),
        headers=draw(
            st.lists(
                st.tuples(header_keys, header_values, st.none() | st.text(max_size=6)),
                max_size=5,
            )
        ),
        body=draw(bodies),
        observability=observability or (not first and draw(st.integers(0, 9)) == 0),
        config=draw(st.tuples(modes, modes, st.booleans()))
        if first or draw(st.integers(0, 9)) == 0
        else None,
    )


@st.composite
def streams(draw: st.DrawFn) -> list[Spec]:
    observability = draw(st.integers(0, 7)) == 0
    n = draw(st.integers(1, 12))
    return [draw(specs(i == 0, observability)) for i in range(n)]


def to_request(spec: Spec) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(observability_mode=spec.observability)
    part = getattr(req, FIELD[spec.phase])
    if spec.phase in BODY_PHASES:
        part.body = spec.body
        part.end_of_stream = spec.eos
    else:
        target = part.trailers if spec.phase in TRAILER_PHASES else part.headers
        part.SetInParent()
        for key, raw, value in spec.headers:
            hv = target.headers.add()
            hv.key = key
            hv.raw_value = raw
            if value is not None:
                hv.value = value
        if spec.phase in HEADER_PHASES:
            part.end_of_stream = spec.eos
    if spec.config is not None:
        req.protocol_config.request_body_mode = spec.config[0]  # type: ignore[assignment]
        req.protocol_config.response_body_mode = spec.config[1]  # type: ignore[assignment]
        req.protocol_config.send_body_without_waiting_for_header_response = spec.config[2]
    if spec.headers:
        req.attributes["envoy.filters.http.ext_proc"].update({"source.address": "1.2.3.4"})
    return req


# ------------------------------------------------------------------ checks


def check_response(stream: StreamProcessor, phase: Phase, out: pb.ProcessingResponse) -> None:
    wire = out.SerializeToString()
    back = pb.ProcessingResponse.FromString(wire)
    assert back == out
    kind = back.WhichOneof("response")
    assert kind in (FIELD[phase], "immediate_response"), (phase, kind)
    if kind == "immediate_response":
        assert stream.closed
        ir = back.immediate_response
        assert 200 <= ir.status.code <= 599
        assert " " not in ir.details
        assert len(ir.details) <= 64
        mutations = [ir.headers]
    elif phase in TRAILER_PHASES:
        mutations = [getattr(back, kind).header_mutation]
    else:
        common = getattr(back, kind).response
        mutations = [common.header_mutation]
        which = common.body_mutation.WhichOneof("mutation")
        if phase in BODY_PHASES:
            full_duplex = stream.state.body_mode(phase) is BodySendMode.FULL_DUPLEX_STREAMED
            assert (which == "streamed_response") is full_duplex, (phase, which)
        else:
            assert which is None
    if phase not in HEADER_PHASES:
        assert not back.HasField("mode_override")
    for m in mutations:
        for opt in m.set_headers:
            key = opt.header.key
            assert key == key.lower()
            assert key not in FORBIDDEN
            assert not key.startswith("x-envoy-")
            assert not any(c in opt.header.raw_value for c in b"\r\n\x00")
        for key in m.remove_headers:
            assert key not in FORBIDDEN
            assert not key.startswith(":")


async def drive(seq: list[Spec], fail_open: bool) -> None:
    stream = processor(fail_open)
    for spec in seq:
        try:
            wire = pb.ProcessingRequest.FromString(to_request(spec).SerializeToString())
            msg = codec.decode(wire)
            was_closed = stream.closed
            reply = await stream.handle(msg)
        except (RemoteProtocolError, codec.DecodeError):
            return  # the server aborts the stream
        except LocalProtocolError as exc:
            # the only local error the processor may hit: answering after the response started
            assert "started" in str(exc)
            return
        assert not was_closed, "a message after the stream was answered was accepted"
        if stream.state.observability_mode:
            assert reply is None
            continue
        assert reply is not None
        assert stream.state.awaiting_reply is None  # exactly one reply, already accounted
        check_response(stream, msg.phase, codec.encode(msg.phase, reply))
        if stream.closed:
            # anything after an immediate response is refused
            try:
                await stream.handle(msg)
            except RemoteProtocolError:
                pass
            else:
                raise AssertionError("message accepted after an immediate response")
            return


@FUZZ
@given(seq=streams(), fail_open=st.booleans())
def test_random_message_sequences(seq: list[Spec], fail_open: bool) -> None:
    asyncio.run(drive(seq, fail_open))


@st.composite
def envoy_like_streams(draw: st.DrawFn) -> list[Spec]:
    """Well-ordered sequences (what Envoy would really send) with random content and modes."""
    req_mode, resp_mode = draw(modes), draw(modes)
    trailers = draw(st.booleans())
    observability = draw(st.integers(0, 5)) == 0
    config = (req_mode, resp_mode, draw(st.booleans()))
    out: list[Spec] = []

    def hdrs() -> list[tuple[str, bytes, str | None]]:
        return draw(st.lists(st.tuples(header_keys, header_values, st.none()), max_size=4))

    for h, b, t, mode in (
        (Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.REQUEST_TRAILERS, req_mode),
        (Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY, Phase.RESPONSE_TRAILERS, resp_mode),
    ):
        chunks = draw(st.lists(bodies, max_size=4)) if mode is not BodySendMode.NONE else []
        if draw(st.booleans()) or not chunks:
            out.append(Spec(h, not chunks and not trailers, hdrs(), b"", observability, None))
        for i, chunk in enumerate(chunks):
            eos = i == len(chunks) - 1 and not trailers
            out.append(Spec(b, eos, [], chunk, observability, None))
        if trailers:
            out.append(Spec(t, True, hdrs(), b"", observability, None))
    out[0].config = config
    return out


@FUZZ
@given(seq=envoy_like_streams(), fail_open=st.booleans())
def test_envoy_like_sequences_never_raise_remote_errors(seq: list[Spec], fail_open: bool) -> None:
    async def run() -> None:
        stream = processor(fail_open)
        for spec in seq:
            msg = codec.decode(
                pb.ProcessingRequest.FromString(to_request(spec).SerializeToString())
            )
            try:
                reply = await stream.handle(msg)  # a RemoteProtocolError here fails the test
            except LocalProtocolError as exc:
                assert "started" in str(exc)
                return
            if spec.observability:
                assert reply is None
                continue
            assert reply is not None
            check_response(stream, msg.phase, codec.encode(msg.phase, reply))
            if stream.closed:
                return

    asyncio.run(run())


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes_never_raise_unexpected_exceptions(data: bytes) -> None:
    try:
        req = pb.ProcessingRequest.FromString(data)
    except pb_message.DecodeError:
        return
    try:
        msg = codec.decode(req)
    except codec.DecodeError:
        return
    assert msg.phase is Phase(FIELD_TO_PHASE[req.WhichOneof("request")])


FIELD_TO_PHASE = {v: k.value for k, v in FIELD.items()}


@FUZZ
@given(
    seq=st.lists(
        st.tuples(st.sampled_from(list(FIELD.values())), st.binary(max_size=64)), max_size=6
    )
)
def test_mutated_valid_requests_never_raise_unexpected_exceptions(
    seq: list[tuple[str, bytes]],
) -> None:
    """Valid messages with random bytes appended (unknown fields, repeated fields, garbage)."""
    for field, tail in seq:
        req = pb.ProcessingRequest()
        getattr(req, field).SetInParent()
        data = req.SerializeToString() + tail
        try:
            parsed = pb.ProcessingRequest.FromString(data)
        except pb_message.DecodeError:
            continue
        try:
            codec.decode(parsed)
        except codec.DecodeError:
            continue
