"""ProcessingRequest -> Message and Reply -> ProcessingResponse (``extproc.protocol.codec``)."""

from __future__ import annotations

import pytest

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.plugin import Phase
from extproc.protocol import codec
from extproc.protocol.events import (
    AppendAction,
    BodySendMode,
    HeaderMutation,
    HeaderSendMode,
    ImmediateReply,
    ModeOverride,
    ProtocolConfig,
    Reply,
)

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


def wire(req: pb.ProcessingRequest) -> pb.ProcessingRequest:
    """Through bytes, as the transport would hand it over."""
    return pb.ProcessingRequest.FromString(req.SerializeToString())


def rewire(resp: pb.ProcessingResponse) -> pb.ProcessingResponse:
    return pb.ProcessingResponse.FromString(resp.SerializeToString())


def header_map(phase: Phase, req: pb.ProcessingRequest) -> object:
    part = getattr(req, FIELD[phase])
    return part.trailers if phase in TRAILER_PHASES else part.headers


def add(target: object, key: str, raw: bytes | None = None, value: str | None = None) -> None:
    hv = target.headers.add()  # type: ignore[attr-defined]
    hv.key = key
    if raw is not None:
        hv.raw_value = raw
    if value is not None:
        hv.value = value


# ------------------------------------------------------------------ decode


@pytest.mark.parametrize("phase", [*HEADER_PHASES, *TRAILER_PHASES])
def test_decode_headers_from_raw_value(phase: Phase) -> None:
    req = pb.ProcessingRequest()
    hm = header_map(phase, req)
    add(hm, "x-a", b"1")
    add(hm, "x-a", b"2")
    add(hm, "x-b", b"b")
    msg = codec.decode(wire(req))
    assert msg.phase is phase
    assert msg.headers is not None
    assert msg.headers["x-a"] == "1"
    assert msg.headers.get_all("x-a") == ("1", "2")
    assert msg.headers.items_all() == (("x-a", "1"), ("x-a", "2"), ("x-b", "b"))
    assert msg.body == b""


@pytest.mark.parametrize("phase", [*HEADER_PHASES, *TRAILER_PHASES])
@pytest.mark.parametrize(
    "raw", [b"\xff\xfe", b"caf\xe9", b"ok\x80\x81end", "caf\u00e9".encode(), b"\xc3"]
)
def test_decode_non_utf8_raw_value_round_trips_through_surrogateescape(
    phase: Phase, raw: bytes
) -> None:
    req = pb.ProcessingRequest()
    add(header_map(phase, req), "x-bin", raw)
    msg = codec.decode(wire(req))
    assert msg.headers is not None
    value = msg.headers["x-bin"]
    assert value.encode("utf-8", "surrogateescape") == raw


@pytest.mark.parametrize("phase", [*HEADER_PHASES, *TRAILER_PHASES])
def test_decode_falls_back_to_value_when_raw_value_is_empty(phase: Phase) -> None:
    req = pb.ProcessingRequest()
    hm = header_map(phase, req)
    add(hm, "x-old", value="legacy")
    add(hm, "x-both", raw=b"raw", value="ignored")
    add(hm, "x-empty")
    msg = codec.decode(wire(req))
    assert msg.headers is not None
    assert msg.headers["x-old"] == "legacy"
    assert msg.headers["x-both"] == "raw"
    assert msg.headers["x-empty"] == ""


@pytest.mark.parametrize("phase", HEADER_PHASES)
@pytest.mark.parametrize("eos", [False, True])
def test_decode_headers_end_of_stream(phase: Phase, eos: bool) -> None:
    req = pb.ProcessingRequest()
    getattr(req, FIELD[phase]).end_of_stream = eos
    msg = codec.decode(wire(req))
    assert msg.phase is phase
    assert msg.end_of_stream is eos
    assert msg.headers is not None
    assert len(msg.headers) == 0


@pytest.mark.parametrize("phase", BODY_PHASES)
@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("body", [b"", b"hello", bytes(range(256)) * 10])
def test_decode_body(phase: Phase, eos: bool, body: bytes) -> None:
    req = pb.ProcessingRequest()
    part = getattr(req, FIELD[phase])
    part.body = body
    part.end_of_stream = eos
    msg = codec.decode(wire(req))
    assert msg.phase is phase
    assert msg.body == body
    assert isinstance(msg.body, bytes)
    assert msg.end_of_stream is eos
    assert msg.headers is None


@pytest.mark.parametrize("phase", TRAILER_PHASES)
def test_decode_trailers_end_the_stream(phase: Phase) -> None:
    req = pb.ProcessingRequest()
    getattr(req, FIELD[phase]).SetInParent()
    msg = codec.decode(wire(req))
    assert msg.phase is phase
    assert msg.end_of_stream is True
    assert msg.headers is not None


def test_decode_empty_request_is_a_decode_error() -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode(pb.ProcessingRequest())
    with pytest.raises(codec.DecodeError):
        codec.decode(wire(pb.ProcessingRequest(observability_mode=True)))


def test_decode_flattens_attributes_from_the_top_level_map() -> None:
    req = pb.ProcessingRequest()
    req.request_headers.SetInParent()
    req.attributes["envoy.filters.http.ext_proc"].update(
        {
            "source.address": "10.0.0.1:5555",
            "request.size": 42,
            "connection.mtls": True,
            "nested": {"a": {"b": "c"}},
            "list": ["x", 1, None],
            "none": None,
        }
    )
    req.attributes["other.filter"].update({"other.key": "v"})
    msg = codec.decode(wire(req))
    assert msg.attributes == {
        "source.address": "10.0.0.1:5555",
        "request.size": 42.0,
        "connection.mtls": True,
        "nested": {"a": {"b": "c"}},
        "list": ["x", 1.0, None],
        "none": None,
        "other.key": "v",
    }


def test_decode_without_attributes_or_metadata_gives_none() -> None:
    req = pb.ProcessingRequest()
    req.request_headers.SetInParent()
    msg = codec.decode(wire(req))
    assert msg.attributes is None
    assert msg.metadata is None
    assert msg.protocol_config is None
    assert msg.observability_mode is False


def test_decode_metadata_context_by_namespace() -> None:
    req = pb.ProcessingRequest()
    req.response_body.body = b"x"
    req.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"sub": "alice", "scopes": ["a", "b"]}
    )
    req.metadata_context.filter_metadata["ns2"].update({"n": 1})
    msg = codec.decode(wire(req))
    assert msg.metadata == {
        "envoy.filters.http.jwt_authn": {"sub": "alice", "scopes": ["a", "b"]},
        "ns2": {"n": 1.0},
    }


def test_decode_empty_metadata_context_gives_empty_mapping() -> None:
    req = pb.ProcessingRequest()
    req.request_headers.SetInParent()
    req.metadata_context.SetInParent()
    assert codec.decode(wire(req)).metadata == {}


@pytest.mark.parametrize("req_mode", list(BodySendMode))
@pytest.mark.parametrize("resp_mode", list(BodySendMode))
@pytest.mark.parametrize("no_wait", [False, True])
def test_decode_protocol_config(
    req_mode: BodySendMode, resp_mode: BodySendMode, no_wait: bool
) -> None:
    req = pb.ProcessingRequest()
    req.request_headers.SetInParent()
    req.protocol_config.request_body_mode = req_mode  # type: ignore[assignment]
    req.protocol_config.response_body_mode = resp_mode  # type: ignore[assignment]
    req.protocol_config.send_body_without_waiting_for_header_response = no_wait
    msg = codec.decode(wire(req))
    assert msg.protocol_config == ProtocolConfig(req_mode, resp_mode, no_wait)
    assert msg.protocol_config is not None
    assert msg.protocol_config.request_body_mode is req_mode


def test_decode_empty_protocol_config_is_all_defaults() -> None:
    req = pb.ProcessingRequest()
    req.request_headers.SetInParent()
    req.protocol_config.SetInParent()
    assert codec.decode(wire(req)).protocol_config == ProtocolConfig()


def test_decode_unknown_body_mode_is_a_decode_error() -> None:
    req = pb.ProcessingRequest()
    req.request_headers.SetInParent()
    req.protocol_config.request_body_mode = 9  # type: ignore[assignment]
    with pytest.raises(codec.DecodeError):
        codec.decode(wire(req))


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("flag", [False, True])
def test_decode_observability_mode(phase: Phase, flag: bool) -> None:
    req = pb.ProcessingRequest(observability_mode=flag)
    getattr(req, FIELD[phase]).SetInParent()
    assert codec.decode(wire(req)).observability_mode is flag


# ------------------------------------------------------------------ encode


@pytest.mark.parametrize("phase", list(Phase))
def test_encode_noop_uses_the_matching_oneof(phase: Phase) -> None:
    resp = rewire(codec.encode(phase, Reply()))
    assert resp.WhichOneof("response") == FIELD[phase]
    assert not resp.HasField("dynamic_metadata")
    assert not resp.HasField("mode_override")
    assert not resp.HasField("override_message_timeout")
    part = getattr(resp, FIELD[phase])
    if phase in TRAILER_PHASES:
        assert not part.HasField("header_mutation")
    else:
        assert part.response.status == pb.CommonResponse.CONTINUE
        assert not part.response.HasField("header_mutation")
        assert not part.response.HasField("body_mutation")


def _every_kind_of_reply(phase: Phase) -> list[Reply | ImmediateReply]:
    mutation = HeaderMutation(
        set=(("x-mut", b"v", AppendAction.APPEND_IF_EXISTS_OR_ADD),), remove=("x-gone",)
    )
    out: list[Reply | ImmediateReply] = [
        Reply(dynamic_metadata={"ns": {"k": "v"}}),
        Reply(override_message_timeout_ms=1500),
        Reply(mode_override=ModeOverride(request_body_mode=BodySendMode.BUFFERED)),
        ImmediateReply(500, headers=mutation, body=b"boom", details="d", grpc_status=13),
    ]
    if phase in TRAILER_PHASES:
        out.append(Reply(trailers_mutation=mutation))
    else:
        out += [Reply(header_mutation=mutation), Reply(clear_route_cache=True)]
    if phase in BODY_PHASES:
        out += [
            Reply(body=b"new"),
            Reply(clear_body=True),
            Reply(streamed_body=(b"chunk", True)),
        ]
    return out


def test_prebuilt_noops_are_not_mutated_by_later_encodes() -> None:
    before = {p: codec.encode(p, Reply()).SerializeToString() for p in Phase}
    noops = {p: codec.encode(p, Reply()) for p in Phase}
    for phase in Phase:
        for reply in _every_kind_of_reply(phase):
            out = codec.encode(phase, reply)
            assert out is not noops[phase]
            assert out.SerializeToString() != before[phase]
    for phase in Phase:
        assert noops[phase].SerializeToString() == before[phase]
        assert codec.encode(phase, Reply()).SerializeToString() == before[phase]
        assert (
            codec.encode(phase, Reply(header_mutation=HeaderMutation())).SerializeToString()
            == (before[phase])
        )


@pytest.mark.parametrize("phase", [*HEADER_PHASES, *BODY_PHASES])
@pytest.mark.parametrize("action", list(AppendAction))
def test_encode_header_mutation_with_append_action(phase: Phase, action: AppendAction) -> None:
    reply = Reply(
        header_mutation=HeaderMutation(
            set=(("x-a", b"\xff\x00raw", action), ("x-b", b"b", AppendAction.ADD_IF_ABSENT)),
            remove=("x-r1", "x-r2"),
        )
    )
    resp = rewire(codec.encode(phase, reply))
    assert resp.WhichOneof("response") == FIELD[phase]
    hm = getattr(resp, FIELD[phase]).response.header_mutation
    assert [(o.header.key, o.header.raw_value, o.append_action) for o in hm.set_headers] == [
        ("x-a", b"\xff\x00raw", action),
        ("x-b", b"b", AppendAction.ADD_IF_ABSENT),
    ]
    assert all(o.header.value == "" for o in hm.set_headers)
    assert list(hm.remove_headers) == ["x-r1", "x-r2"]


@pytest.mark.parametrize("phase", TRAILER_PHASES)
def test_encode_trailers_mutation(phase: Phase) -> None:
    reply = Reply(
        trailers_mutation=HeaderMutation(
            set=(("grpc-status", b"0", AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),),
            remove=("x-t",),
        )
    )
    resp = rewire(codec.encode(phase, reply))
    assert resp.WhichOneof("response") == FIELD[phase]
    hm = getattr(resp, FIELD[phase]).header_mutation
    assert [(o.header.key, o.header.raw_value) for o in hm.set_headers] == [("grpc-status", b"0")]
    assert list(hm.remove_headers) == ["x-t"]


@pytest.mark.parametrize("phase", BODY_PHASES)
def test_encode_body_mutations(phase: Phase) -> None:
    def mutation(reply: Reply) -> pb.BodyMutation:
        resp = rewire(codec.encode(phase, reply))
        assert resp.WhichOneof("response") == FIELD[phase]
        return getattr(resp, FIELD[phase]).response.body_mutation

    m = mutation(Reply(body=b"new body"))
    assert m.WhichOneof("mutation") == "body"
    assert m.body == b"new body"

    m = mutation(Reply(body=b"", clear_body=True))
    assert m.WhichOneof("mutation") == "clear_body"
    assert m.clear_body is True

    for chunk, eos in ((b"chunk", False), (b"", True)):
        m = mutation(Reply(streamed_body=(chunk, eos)))
        assert m.WhichOneof("mutation") == "streamed_response"
        assert m.streamed_response.body == chunk
        assert m.streamed_response.end_of_stream is eos

    m = mutation(Reply(clear_route_cache=True))
    assert m.WhichOneof("mutation") is None


@pytest.mark.parametrize("phase", [*HEADER_PHASES, *BODY_PHASES])
def test_encode_clear_route_cache(phase: Phase) -> None:
    resp = rewire(codec.encode(phase, Reply(clear_route_cache=True)))
    assert getattr(resp, FIELD[phase]).response.clear_route_cache is True


@pytest.mark.parametrize("phase", list(Phase))
def test_encode_dynamic_metadata(phase: Phase) -> None:
    meta = {"extproc.jwt": {"sub": "alice", "n": 3, "ok": True, "deep": {"x": ["a"]}}}
    resp = rewire(codec.encode(phase, Reply(dynamic_metadata=meta)))
    assert resp.WhichOneof("response") == FIELD[phase]
    assert codec.struct_to_dict(resp.dynamic_metadata) == {
        "extproc.jwt": {"sub": "alice", "n": 3.0, "ok": True, "deep": {"x": ["a"]}}
    }


@pytest.mark.parametrize("phase", HEADER_PHASES)
def test_encode_mode_override(phase: Phase) -> None:
    mode = ModeOverride(
        request_body_mode=BodySendMode.BUFFERED,
        response_header_mode=HeaderSendMode.SKIP,
        response_body_mode=BodySendMode.STREAMED,
        request_trailer_mode=HeaderSendMode.SEND,
        response_trailer_mode=HeaderSendMode.SKIP,
    )
    resp = rewire(codec.encode(phase, Reply(mode_override=mode)))
    mo = resp.mode_override
    assert resp.HasField("mode_override")
    assert mo.request_body_mode == BodySendMode.BUFFERED
    assert mo.response_header_mode == HeaderSendMode.SKIP
    assert mo.response_body_mode == BodySendMode.STREAMED
    assert mo.request_trailer_mode == HeaderSendMode.SEND
    assert mo.response_trailer_mode == HeaderSendMode.SKIP
    assert mo.request_header_mode == HeaderSendMode.DEFAULT


def test_encode_partial_mode_override_leaves_the_rest_default() -> None:
    resp = codec.encode(
        Phase.REQUEST_HEADERS,
        Reply(mode_override=ModeOverride(response_header_mode=HeaderSendMode.SKIP)),
    )
    assert resp.HasField("mode_override")
    assert resp.mode_override.response_header_mode == HeaderSendMode.SKIP
    assert resp.mode_override.request_body_mode == BodySendMode.NONE


@pytest.mark.parametrize(
    ("ms", "seconds", "nanos"),
    [(1, 0, 1_000_000), (999, 0, 999_000_000), (1000, 1, 0), (2500, 2, 500_000_000)],
)
def test_encode_override_message_timeout(ms: int, seconds: int, nanos: int) -> None:
    resp = rewire(codec.encode(Phase.REQUEST_HEADERS, Reply(override_message_timeout_ms=ms)))
    assert resp.HasField("override_message_timeout")
    assert resp.override_message_timeout.seconds == seconds
    assert resp.override_message_timeout.nanos == nanos
    assert resp.override_message_timeout.ToMilliseconds() == ms


@pytest.mark.parametrize("phase", list(Phase))
def test_encode_immediate_response(phase: Phase) -> None:
    reply = ImmediateReply(
        429,
        headers=HeaderMutation(
            set=(
                ("content-type", b"application/json", AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
                ("retry-after", b"3", AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
            )
        ),
        body=b'{"error":"rate_limited"}',
        details="extproc_rate_limited",
        grpc_status=8,
        dynamic_metadata={"extproc.rl": {"hit": True}},
    )
    resp = rewire(codec.encode(phase, reply))
    assert resp.WhichOneof("response") == "immediate_response"
    ir = resp.immediate_response
    assert ir.status.code == 429
    assert ir.body == b'{"error":"rate_limited"}'
    assert ir.details == "extproc_rate_limited"
    assert ir.HasField("grpc_status")
    assert ir.grpc_status.status == 8
    assert [(o.header.key, o.header.raw_value) for o in ir.headers.set_headers] == [
        ("content-type", b"application/json"),
        ("retry-after", b"3"),
    ]
    assert codec.struct_to_dict(resp.dynamic_metadata) == {"extproc.rl": {"hit": True}}


def test_encode_minimal_immediate_response() -> None:
    resp = rewire(codec.encode(Phase.REQUEST_HEADERS, ImmediateReply(403)))
    ir = resp.immediate_response
    assert resp.WhichOneof("response") == "immediate_response"
    assert ir.status.code == 403
    assert ir.body == b""
    assert ir.details == ""
    assert not ir.HasField("grpc_status")
    assert not ir.HasField("headers")
    assert not resp.HasField("dynamic_metadata")


def test_encode_immediate_grpc_status_zero_is_sent() -> None:
    resp = codec.encode(Phase.REQUEST_HEADERS, ImmediateReply(200, grpc_status=0))
    assert resp.immediate_response.HasField("grpc_status")
    assert resp.immediate_response.grpc_status.status == 0
