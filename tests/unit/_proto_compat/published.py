"""Both sides of the wire-compatibility check between our protos and the published ones.

The functions here take the generated modules as arguments, so the same code describes and
builds messages with our classes (in the pytest process) and with the published xds-protos
classes (in a child process: protobuf's default pool refuses two definitions of one file).

Run as a script, it is that child process: it imports xds-protos (and fails loudly if that
is missing), reads one JSON command on stdin and writes one JSON answer on stdout.
"""

from __future__ import annotations

import base64
import json
import sys
from types import ModuleType
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message

# Upstream file names of everything we define, and the module that holds each one.
FILES = {
    "envoy/service/ext_proc/v3/external_processor.proto": (
        "envoy.service.ext_proc.v3.external_processor_pb2"
    ),
    "envoy/config/core/v3/base.proto": "envoy.config.core.v3.base_pb2",
    "envoy/extensions/filters/http/ext_proc/v3/processing_mode.proto": (
        "envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2"
    ),
    "envoy/type/v3/http_status.proto": "envoy.type.v3.http_status_pb2",
}

_TYPE_NAMES = {
    value: name for name, value in vars(FieldDescriptor).items() if name.startswith("TYPE_")
}

# Bytes that are not valid UTF-8, as Envoy may put in raw_value.
NON_UTF8 = b"\xff\xfe\x00caf\xe9\x80"


def _describe_field(field: FieldDescriptor) -> dict[str, Any]:
    type_name = ""
    if field.message_type is not None:
        type_name = field.message_type.full_name
    elif field.enum_type is not None:
        type_name = field.enum_type.full_name
    return {
        "number": field.number,
        "type": _TYPE_NAMES[field.type],
        "repeated": field.is_repeated,
        "type_name": type_name,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "has_presence": field.has_presence,
        "deprecated": field.GetOptions().deprecated,
    }


def _describe_enum(enum: EnumDescriptor, out: dict[str, Any]) -> None:
    out["enums"][enum.full_name] = {value.name: value.number for value in enum.values}


def _describe_message(message: Descriptor, out: dict[str, Any]) -> None:
    out["messages"][message.full_name] = {
        "map_entry": message.GetOptions().map_entry,
        "fields": {field.name: _describe_field(field) for field in message.fields},
        "oneofs": {
            oneof.name: sorted(field.name for field in oneof.fields) for oneof in message.oneofs
        },
    }
    for enum in message.enum_types:
        _describe_enum(enum, out)
    for nested in message.nested_types:
        _describe_message(nested, out)


def describe(files: list[FileDescriptor]) -> dict[str, Any]:
    """A JSON-able summary of every message, enum, field and service in ``files``."""
    out: dict[str, Any] = {"files": {}, "messages": {}, "enums": {}, "services": {}}
    for file in files:
        out["files"][file.name] = {
            "package": file.package,
            "messages": sorted(file.message_types_by_name),
            "enums": sorted(file.enum_types_by_name),
        }
        for enum in file.enum_types_by_name.values():
            _describe_enum(enum, out)
        for message in file.message_types_by_name.values():
            _describe_message(message, out)
        for service in file.services_by_name.values():
            out["services"][service.full_name] = {
                method.name: {
                    "input": method.input_type.full_name,
                    "output": method.output_type.full_name,
                    "client_streaming": method.client_streaming,
                    "server_streaming": method.server_streaming,
                }
                for method in service.methods
            }
    return out


def _header_map(core: ModuleType) -> Message:
    return core.HeaderMap(
        headers=[
            core.HeaderValue(key=":path", raw_value=b"/v1/items?id=7"),
            core.HeaderValue(key="x-binary", raw_value=NON_UTF8),
            core.HeaderValue(key="x-legacy", value="text value"),
            core.HeaderValue(key="x-empty"),
        ]
    )


def _metadata(core: ModuleType) -> Message:
    from google.protobuf import any_pb2, struct_pb2

    typed = any_pb2.Any()
    typed.Pack(struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=3)}))
    meta = core.Metadata(typed_filter_metadata={"envoy.filters.http.jwt_authn": typed})
    meta.filter_metadata["envoy.filters.http.rbac"].update({"shadow": True, "rule": "r1"})
    return meta


def _header_mutation(ep: ModuleType, core: ModuleType) -> Message:
    from google.protobuf import wrappers_pb2

    action = core.HeaderValueOption.HeaderAppendAction
    return ep.HeaderMutation(
        set_headers=[
            core.HeaderValueOption(
                header=core.HeaderValue(key="x-a", raw_value=b"1"),
                append_action=action.Value("ADD_IF_ABSENT"),
            ),
            core.HeaderValueOption(
                header=core.HeaderValue(key="x-b", raw_value=NON_UTF8),
                append_action=action.Value("OVERWRITE_IF_EXISTS_OR_ADD"),
                keep_empty_value=True,
            ),
            core.HeaderValueOption(
                header=core.HeaderValue(key="x-c", value="v"),
                append_action=action.Value("OVERWRITE_IF_EXISTS"),
            ),
            core.HeaderValueOption(
                header=core.HeaderValue(key="x-d", raw_value=b""),
                append=wrappers_pb2.BoolValue(value=False),
            ),
        ],
        remove_headers=["x-remove-me", "x-and-me"],
    )


def build_samples(
    ep: ModuleType, core: ModuleType, mode: ModuleType, status: ModuleType
) -> dict[str, Message]:
    """Rich messages covering every oneof member and every field we define.

    ``ep``, ``core``, ``mode`` and ``status`` are the external_processor, base,
    processing_mode and http_status modules of either implementation.
    """
    from google.protobuf import duration_pb2, struct_pb2

    body_mode = mode.ProcessingMode.BodySendMode
    header_mode = mode.ProcessingMode.HeaderSendMode
    attributes = struct_pb2.Struct()
    attributes.update({"request.path": "/v1/items", "source.port": 51234, "tags": ["a", None]})

    def request(**phase: Message) -> Message:
        return ep.ProcessingRequest(
            metadata_context=_metadata(core),
            attributes={"envoy.filters.http.ext_proc": attributes},
            observability_mode=True,
            protocol_config=ep.ProtocolConfiguration(
                request_body_mode=body_mode.Value("FULL_DUPLEX_STREAMED"),
                response_body_mode=body_mode.Value("GRPC"),
                send_body_without_waiting_for_header_response=True,
            ),
            **phase,
        )

    headers = ep.HttpHeaders(headers=_header_map(core), end_of_stream=True)
    headers.attributes["legacy"].update({"k": "v"})
    body = ep.HttpBody(
        body=NON_UTF8 * 3,
        end_of_stream=True,
        end_of_stream_without_message=True,
        grpc_message_compressed=True,
    )
    trailers = ep.HttpTrailers(trailers=_header_map(core))

    dynamic = struct_pb2.Struct()
    dynamic.update({"extproc": {"user": "alice", "score": 0.5}})
    common = ep.CommonResponse(
        status=ep.CommonResponse.ResponseStatus.Value("CONTINUE_AND_REPLACE"),
        header_mutation=_header_mutation(ep, core),
        body_mutation=ep.BodyMutation(body=NON_UTF8),
        trailers=_header_map(core),
        clear_route_cache=True,
    )
    streamed = ep.CommonResponse(
        body_mutation=ep.BodyMutation(
            streamed_response=ep.StreamedBodyResponse(
                body=NON_UTF8,
                end_of_stream=True,
                end_of_stream_without_message=True,
                grpc_message_compressed=True,
            )
        )
    )
    cleared = ep.CommonResponse(body_mutation=ep.BodyMutation(clear_body=True))

    def response(**phase: Message) -> Message:
        return ep.ProcessingResponse(
            dynamic_metadata=dynamic,
            mode_override=mode.ProcessingMode(
                request_header_mode=header_mode.Value("SEND"),
                response_header_mode=header_mode.Value("SKIP"),
                request_body_mode=body_mode.Value("BUFFERED_PARTIAL"),
                response_body_mode=body_mode.Value("STREAMED"),
                request_trailer_mode=header_mode.Value("SEND"),
                response_trailer_mode=header_mode.Value("SKIP"),
            ),
            override_message_timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000),
            request_drain=True,
            **phase,
        )

    immediate = ep.ImmediateResponse(
        status=status.HttpStatus(code=status.StatusCode.Value("TooManyRequests")),
        headers=_header_mutation(ep, core),
        body=b"slow down \xff",
        grpc_status=ep.GrpcStatus(status=8),
        details="extproc_rate_limited",
    )
    return {
        "req.request_headers": request(request_headers=headers),
        "req.response_headers": request(response_headers=headers),
        "req.request_body": request(request_body=body),
        "req.response_body": request(response_body=body),
        "req.request_trailers": request(request_trailers=trailers),
        "req.response_trailers": request(response_trailers=trailers),
        "resp.request_headers": response(request_headers=ep.HeadersResponse(response=common)),
        "resp.response_headers": response(response_headers=ep.HeadersResponse(response=cleared)),
        "resp.request_body": response(request_body=ep.BodyResponse(response=cleared)),
        "resp.response_body": response(response_body=ep.BodyResponse(response=streamed)),
        "resp.request_trailers": response(
            request_trailers=ep.TrailersResponse(header_mutation=_header_mutation(ep, core))
        ),
        "resp.response_trailers": response(response_trailers=ep.TrailersResponse()),
        "resp.immediate_response": response(immediate_response=immediate),
        "resp.bare_immediate": ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=status.HttpStatus(code=status.StatusCode.Value("Forbidden"))
            )
        ),
    }


def to_dict(message: Message) -> dict[str, Any]:
    """Field-name view of a message, so numbers that map to the wrong name show up."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _published_modules() -> dict[str, ModuleType]:
    import importlib

    try:
        return {name: importlib.import_module(module) for name, module in FILES.items()}
    except ImportError as exc:  # pragma: no cover - the loud failure the test relies on
        sys.exit(f"xds-protos is required for the proto compatibility test: {exc}")


def _main() -> None:
    modules = _published_modules()
    ep, core, mode, status = modules.values()
    command = json.load(sys.stdin)
    answer: dict[str, Any]
    if command["op"] == "describe":
        answer = describe([module.DESCRIPTOR for module in modules.values()])
    elif command["op"] == "roundtrip":
        # Parse our bytes, drop anything the published schema does not know, re-serialize.
        answer = {}
        for key, item in command["items"].items():
            cls = getattr(ep, item["type"])
            message = cls.FromString(unb64(item["data"]))
            message.DiscardUnknownFields()
            answer[key] = {
                "data": b64(message.SerializeToString(deterministic=True)),
                "dict": to_dict(message),
            }
    elif command["op"] == "build":
        answer = {
            key: {
                "type": message.DESCRIPTOR.name,
                "data": b64(message.SerializeToString(deterministic=True)),
                "dict": to_dict(message),
            }
            for key, message in build_samples(ep, core, mode, status).items()
        }
    else:
        sys.exit(f"unknown op {command['op']!r}")
    json.dump(answer, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    _main()
