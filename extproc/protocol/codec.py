"""Translate between the wire (our generated ext_proc protobufs) and protocol events.

The only module of :mod:`extproc.protocol` that touches protobuf. It does nothing but
translation, and it is on the hot path: header values are decoded once, attributes and metadata
only when present, and the answers that carry no change are prebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from google.protobuf import struct_pb2

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.plugin import Headers, Phase
from extproc.protocol.events import (
    EMPTY_REPLY,
    BodySendMode,
    HeaderMutation,
    ImmediateReply,
    Message,
    ModeOverride,
    ProtocolConfig,
    Reply,
)

__all__ = [
    "DecodeError",
    "decode",
    "encode",
    "encode_bytes",
    "encode_timeout_extension",
    "struct_to_dict",
]


class DecodeError(ValueError):
    """The ProcessingRequest carries no phase we know."""


_PHASE_OF: Final = {
    "request_headers": Phase.REQUEST_HEADERS,
    "response_headers": Phase.RESPONSE_HEADERS,
    "request_body": Phase.REQUEST_BODY,
    "response_body": Phase.RESPONSE_BODY,
    "request_trailers": Phase.REQUEST_TRAILERS,
    "response_trailers": Phase.RESPONSE_TRAILERS,
}
_FIELD_OF: Final = {phase: name for name, phase in _PHASE_OF.items()}
#: a dict lookup instead of ``BodySendMode(n)`` (Enum's __call__ is Python code): each
#: stream's first message carries two of them
_BODY_MODE: Final = {m.value: m for m in BodySendMode}


def _headers(header_map: Any) -> Headers:
    # Envoy 1.40 fills raw_value (bytes) and leaves value empty; values may not be UTF-8.
    return Headers(
        tuple(
            [
                (h.key, raw.decode("utf-8", "surrogateescape") if (raw := h.raw_value) else h.value)
                for h in header_map.headers
            ]
        )
    )


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    return None


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return {k: _value(v) for k, v in s.fields.items()}


def _attributes(req: pb.ProcessingRequest) -> dict[str, Any] | None:
    # keyed by filter name (envoy.filters.http.ext_proc); flattened: attribute names are unique
    out: dict[str, Any] = {}
    for struct in req.attributes.values():
        out.update(struct_to_dict(struct))
    return out


def decode(req: pb.ProcessingRequest) -> Message:
    """One ``ProcessingRequest`` -> :class:`Message`."""
    kind = req.WhichOneof("request")
    phase = _PHASE_OF.get(kind or "")
    if phase is None:
        raise DecodeError("ProcessingRequest without a known phase")
    attributes = _attributes(req) if req.attributes else None
    metadata = None
    if req.HasField("metadata_context"):
        metadata = {ns: struct_to_dict(s) for ns, s in req.metadata_context.filter_metadata.items()}
    config = None
    if req.HasField("protocol_config"):
        pc = req.protocol_config
        try:
            config = ProtocolConfig(
                _BODY_MODE[pc.request_body_mode],
                _BODY_MODE[pc.response_body_mode],
                pc.send_body_without_waiting_for_header_response,
            )
        except KeyError as exc:  # proto3 enums are open: a number we do not know
            raise DecodeError("unknown body send mode in protocol_config") from exc
    inner = getattr(req, kind)
    if phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS):
        return Message(
            phase,
            headers=_headers(inner.headers),
            end_of_stream=inner.end_of_stream,
            attributes=attributes,
            metadata=metadata,
            observability_mode=req.observability_mode,
            protocol_config=config,
        )
    if phase in (Phase.REQUEST_BODY, Phase.RESPONSE_BODY):
        return Message(
            phase,
            body=inner.body,
            end_of_stream=inner.end_of_stream,
            attributes=attributes,
            metadata=metadata,
            observability_mode=req.observability_mode,
            protocol_config=config,
        )
    return Message(
        phase,
        headers=_headers(inner.trailers),
        end_of_stream=True,
        attributes=attributes,
        metadata=metadata,
        observability_mode=req.observability_mode,
        protocol_config=config,
    )


# ---------------------------------------------------------------- encoding


def _fill_mutation(target: Any, mutation: HeaderMutation) -> None:
    for key, value, action in mutation.set:
        opt = target.set_headers.add()
        opt.header.key = key
        opt.header.raw_value = value
        opt.append_action = action
    if mutation.remove:
        target.remove_headers.extend(mutation.remove)


def _fill_struct(target: struct_pb2.Struct, data: Mapping[str, Any]) -> None:
    target.update(dict(data))


def _noop(phase: Phase) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    getattr(resp, _FIELD_OF[phase]).SetInParent()
    return resp


# Prebuilt answers without changes: never mutated, only serialized.
_NOOP: Final = {phase: _noop(phase) for phase in Phase}


def encode(phase: Phase, reply: Reply | ImmediateReply) -> pb.ProcessingResponse:
    """The ``ProcessingResponse`` answering a message of ``phase`` with ``reply``."""
    if isinstance(reply, ImmediateReply):
        return _encode_immediate(reply)
    if reply is EMPTY_REPLY:
        return _NOOP[phase]
    resp = pb.ProcessingResponse()
    part = getattr(resp, _FIELD_OF[phase])
    if phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS):
        part.SetInParent()
        if reply.trailers_mutation:
            _fill_mutation(part.header_mutation, reply.trailers_mutation)
    else:
        common = part.response
        part.SetInParent()
        if reply.header_mutation:
            _fill_mutation(common.header_mutation, reply.header_mutation)
        if reply.streamed_body is not None:
            chunk, eos = reply.streamed_body
            common.body_mutation.streamed_response.body = chunk
            common.body_mutation.streamed_response.end_of_stream = eos
        elif reply.clear_body:
            common.body_mutation.clear_body = True
        elif reply.body is not None:
            common.body_mutation.body = reply.body
        if reply.clear_route_cache:
            common.clear_route_cache = True
    if reply.dynamic_metadata:
        _fill_struct(resp.dynamic_metadata, reply.dynamic_metadata)
    if reply.mode_override is not None:
        _fill_mode(resp.mode_override, reply.mode_override)
    if reply.override_message_timeout_ms is not None:
        ms = reply.override_message_timeout_ms
        resp.override_message_timeout.seconds = ms // 1000
        resp.override_message_timeout.nanos = (ms % 1000) * 1_000_000
    return resp


def encode_bytes(phase: Phase, reply: Reply | ImmediateReply) -> bytes:
    """:func:`encode`, serialized; the answers without changes are prebuilt, and a reply that
    carries its own ``wire`` bytes (the stream's reply cache) is not encoded again."""
    if reply is EMPTY_REPLY:
        return _NOOP_BYTES[phase]
    if type(reply) is Reply and reply.wire is not None:
        return reply.wire
    return encode(phase, reply).SerializeToString()


_NOOP_BYTES: Final = {phase: msg.SerializeToString() for phase, msg in _NOOP.items()}


def _fill_mode(target: Any, mode: ModeOverride) -> None:
    if mode.request_body_mode is not None:
        target.request_body_mode = mode.request_body_mode
    if mode.response_header_mode is not None:
        target.response_header_mode = mode.response_header_mode
    if mode.response_body_mode is not None:
        target.response_body_mode = mode.response_body_mode
    if mode.request_trailer_mode is not None:
        target.request_trailer_mode = mode.request_trailer_mode
    if mode.response_trailer_mode is not None:
        target.response_trailer_mode = mode.response_trailer_mode


def encode_timeout_extension(ms: int) -> pb.ProcessingResponse:
    """A response carrying only ``override_message_timeout``: asks Envoy to wait up to ``ms``
    for the reply to the message being processed (once per message; Envoy honours it only up
    to its ``max_message_timeout``)."""
    resp = pb.ProcessingResponse()
    resp.override_message_timeout.seconds = ms // 1000
    resp.override_message_timeout.nanos = (ms % 1000) * 1_000_000
    return resp


def _encode_immediate(reply: ImmediateReply) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    ir = resp.immediate_response
    ir.status.code = reply.status  # type: ignore[assignment]
    if reply.headers:
        _fill_mutation(ir.headers, reply.headers)
    if reply.body:
        ir.body = reply.body
    if reply.details:
        ir.details = reply.details
    if reply.grpc_status is not None:
        ir.grpc_status.status = reply.grpc_status
    if reply.dynamic_metadata:
        _fill_struct(resp.dynamic_metadata, reply.dynamic_metadata)
    return resp
