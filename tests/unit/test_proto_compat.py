"""Our hand-written ext_proc protos against Envoy's published definitions (xds-protos).

The published modules are loaded only in a child process (see ``_proto_compat/published.py``):
protobuf's default descriptor pool refuses a second definition of the same .proto file name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from extproc._proto.envoy.config.core.v3 import base_pb2
from extproc._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._proto.envoy.service.ext_proc.v3 import (
    external_processor_pb2,
    external_processor_pb2_grpc,
)
from extproc._proto.envoy.type.v3 import http_status_pb2

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve().parent / "_proto_compat" / "published.py"
GEN_PROTO = ROOT / "scripts" / "gen_proto.py"

OURS = (external_processor_pb2, base_pb2, processing_mode_pb2, http_status_pb2)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compat = _load(HELPER, "_proto_compat_published")


def _published_env() -> dict[str, str]:
    """xds-protos lives in a directory of its own (see the Makefile): put it first."""
    target = Path(sys.prefix) / "xds-protos"
    assert (target / "envoy").is_dir(), (
        f"xds-protos is not installed in {target}: run `make install` (the test needs the "
        "published Envoy protos)"
    )
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    )


def _published(command: dict[str, Any]) -> Any:
    """Run one command against the published definitions in a separate interpreter."""
    proc = subprocess.run(
        [sys.executable, str(HELPER)],
        env=_published_env(),
        input=json.dumps(command),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"published-proto helper failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@cache
def _published_description() -> dict[str, Any]:
    return _published({"op": "describe"})


def _our_description() -> dict[str, Any]:
    return compat.describe([module.DESCRIPTOR for module in OURS])


def _our_samples() -> dict[str, Any]:
    return compat.build_samples(*OURS)


# --- (1) schema ------------------------------------------------------------------------------


def test_our_files_keep_upstream_names_and_packages() -> None:
    ours = _our_description()["files"]
    published = _published_description()["files"]
    assert sorted(ours) == sorted(compat.FILES)
    for name, info in ours.items():
        assert info["package"] == published[name]["package"], name


def test_external_processor_defines_everything_published() -> None:
    # The service file is complete; the dependency files are deliberate subsets.
    name = "envoy/service/ext_proc/v3/external_processor.proto"
    ours = _our_description()["files"][name]
    published = _published_description()["files"][name]
    assert ours["messages"] == published["messages"]
    assert ours["enums"] == published["enums"]


def _message_mismatches(ours: dict[str, Any], published: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name, message in ours.items():
        theirs = published.get(name)
        if theirs is None:
            problems.append(f"{name} is not in the published API")
            continue
        # Same field set both ways: nothing invented, nothing forgotten.
        for field in sorted(message["fields"].keys() ^ theirs["fields"].keys()):
            problems.append(f"{name}.{field} is defined on one side only")
        for field, info in message["fields"].items():
            if field in theirs["fields"] and info != theirs["fields"][field]:
                problems.append(
                    f"{name}.{field}: ours {info} != published {theirs['fields'][field]}"
                )
        if message["oneofs"] != theirs["oneofs"]:
            problems.append(f"{name}: oneofs {message['oneofs']} != {theirs['oneofs']}")
        if message["map_entry"] != theirs["map_entry"]:
            problems.append(f"{name}: map_entry differs")
    return problems


def test_every_message_matches_published_field_for_field() -> None:
    ours = _our_description()["messages"]
    assert len(ours) >= 20
    assert _message_mismatches(ours, _published_description()["messages"]) == []


def test_every_enum_matches_published_value_for_value() -> None:
    ours = _our_description()["enums"]
    published = _published_description()["enums"]
    assert ours, "no enums described"
    for name, values in ours.items():
        assert name in published, f"{name} is not in the published API"
        assert values == published[name], name


def test_body_send_modes_include_the_newer_ones() -> None:
    modes = _our_description()["enums"][
        "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode.BodySendMode"
    ]
    assert modes["NONE"] == 0
    assert modes["BUFFERED_PARTIAL"] == 3
    assert modes["FULL_DUPLEX_STREAMED"] == 4


def test_service_matches_published() -> None:
    ours = _our_description()["services"]
    assert ours == _published_description()["services"]
    process = ours["envoy.service.ext_proc.v3.ExternalProcessor"]["Process"]
    assert process["client_streaming"] and process["server_streaming"]
    assert hasattr(external_processor_pb2_grpc, "ExternalProcessorServicer")
    assert hasattr(external_processor_pb2_grpc, "add_ExternalProcessorServicer_to_server")


def test_comparison_notices_a_moved_number_and_a_moved_oneof() -> None:
    # Guards against a comparison that cannot fail: mutate copies of our descriptors.
    from google.protobuf import (
        any_pb2,
        descriptor_pb2,
        descriptor_pool,
        duration_pb2,
        struct_pb2,
        wrappers_pb2,
    )

    pool = descriptor_pool.DescriptorPool()
    well_known = (any_pb2, duration_pb2, struct_pb2, wrappers_pb2)
    for module in (*well_known, http_status_pb2, processing_mode_pb2, base_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    proto = descriptor_pb2.FileDescriptorProto()
    external_processor_pb2.DESCRIPTOR.CopyToProto(proto)
    by_name = {m.name: m for m in proto.message_type}
    by_name["HttpBody"].field[3].number = 3  # swap the last two numbers
    by_name["HttpBody"].field[2].number = 4
    by_name["BodyMutation"].field[2].ClearField("oneof_index")  # streamed_response leaves it
    mutated = pool.Add(proto)
    problems = _message_mismatches(
        compat.describe([mutated])["messages"], _published_description()["messages"]
    )
    assert any("HttpBody.end_of_stream_without_message" in p for p in problems), problems
    assert any("HttpBody.grpc_message_compressed" in p for p in problems), problems
    assert any("BodyMutation.streamed_response" in p for p in problems), problems
    assert any("BodyMutation: oneofs" in p for p in problems), problems


# --- (2) wire round trips --------------------------------------------------------------------


def _assert_no_unknown_fields(message: Any, where: str) -> None:
    # A copy without unknown fields must serialize to the same bytes.
    stripped = type(message).FromString(message.SerializeToString())
    stripped.DiscardUnknownFields()
    assert stripped.SerializeToString(deterministic=True) == message.SerializeToString(
        deterministic=True
    ), f"{where}: fields unknown to our definitions"


def test_samples_cover_every_oneof_member_and_field() -> None:
    samples = _our_samples()
    request_members = {
        f.name for f in external_processor_pb2.ProcessingRequest.DESCRIPTOR.oneofs[0].fields
    }
    response_members = {
        f.name for f in external_processor_pb2.ProcessingResponse.DESCRIPTOR.oneofs[0].fields
    }
    assert {m.WhichOneof("request") for k, m in samples.items() if k.startswith("req.")} == (
        request_members
    )
    assert {m.WhichOneof("response") for k, m in samples.items() if k.startswith("resp.")} == (
        response_members
    )

    # Every field of every message type we define is set somewhere in the samples.
    seen: set[str] = set()

    def walk(message: Any) -> None:
        for field, value in message.ListFields():
            seen.add(field.full_name)
            if field.message_type is None:
                continue
            if field.message_type.GetOptions().map_entry:
                entry_fields = field.message_type.fields_by_name
                seen.update((entry_fields["key"].full_name, entry_fields["value"].full_name))
                values = value.values()
                if entry_fields["value"].message_type is not None:
                    for item in values:
                        walk(item)
            elif field.is_repeated:
                for item in value:
                    walk(item)
            else:
                walk(value)

    for message in samples.values():
        walk(message)
    ours = _our_description()["messages"]
    expected = {f"{name}.{field}" for name, message in ours.items() for field in message["fields"]}
    assert expected - seen == set()


def test_ours_to_published_and_back() -> None:
    samples = _our_samples()
    items = {
        key: {"type": message.DESCRIPTOR.name, "data": compat.b64(message.SerializeToString())}
        for key, message in samples.items()
    }
    answer = _published({"op": "roundtrip", "items": items})
    assert sorted(answer) == sorted(samples)
    for key, original in samples.items():
        back = type(original).FromString(compat.unb64(answer[key]["data"]))
        # The published side drops what it does not know, so equality proves it knew it all.
        assert back == original, key
        # Same bytes decoded to the same field names on both sides.
        assert answer[key]["dict"] == compat.to_dict(original), key


def test_published_to_ours_and_back() -> None:
    answer = _published({"op": "build"})
    ours = _our_samples()
    assert sorted(answer) == sorted(ours)
    for key, item in answer.items():
        cls = getattr(external_processor_pb2, item["type"])
        data = compat.unb64(item["data"])
        parsed = cls.FromString(data)
        _assert_no_unknown_fields(parsed, key)
        assert compat.to_dict(parsed) == item["dict"], key
        assert parsed.SerializeToString(deterministic=True) == data, key
        assert parsed == ours[key], key


def test_raw_value_survives_as_bytes() -> None:
    answer = _published({"op": "build"})
    parsed = external_processor_pb2.ProcessingRequest.FromString(
        compat.unb64(answer["req.request_headers"]["data"])
    )
    raw = {h.key: h.raw_value for h in parsed.request_headers.headers.headers}
    assert raw["x-binary"] == compat.NON_UTF8
    assert parsed.request_headers.headers.headers[1].value == ""


def test_roundtrip_notices_a_field_the_published_side_does_not_know() -> None:
    # A field number the published ProcessingRequest lacks must not survive the round trip.
    original = external_processor_pb2.ProcessingRequest(observability_mode=True)
    extra = original.SerializeToString() + bytes([(15 << 3) | 0, 1])  # field 15, varint 1
    answer = _published(
        {
            "op": "roundtrip",
            "items": {"x": {"type": "ProcessingRequest", "data": compat.b64(extra)}},
        }
    )
    assert compat.unb64(answer["x"]["data"]) == original.SerializeToString()
    assert compat.unb64(answer["x"]["data"]) != extra


# --- generated code --------------------------------------------------------------------------


def test_generated_code_is_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(GEN_PROTO), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_fails_on_a_stale_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _load(GEN_PROTO, "_gen_proto_under_test")
    stale = tmp_path / "_proto"
    gen.generate(stale)
    monkeypatch.setattr(gen, "OUT_DIR", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.check() == 0
    target = stale / "envoy" / "type" / "v3" / "http_status_pb2.py"
    target.write_text(target.read_text() + "# hand edit\n")
    assert gen.check() == 1
    target.unlink()
    (stale / "envoy" / "leftover_pb2.py").write_text("")
    assert gen.check() == 1


def test_generated_code_never_imports_top_level_envoy() -> None:
    code = (
        "import sys\n"
        "from extproc._proto.envoy.service.ext_proc.v3 import "
        "external_processor_pb2, external_processor_pb2_grpc\n"
        "bad = sorted(m for m in sys.modules if m == 'envoy' or m.startswith('envoy.'))\n"
        "assert not bad, bad\n"
        "assert external_processor_pb2.ProcessingRequest.__module__.startswith('extproc._proto.')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for path in (ROOT / "extproc" / "_proto").rglob("*.py*"):
        if path.suffix not in (".py", ".pyi"):
            continue  # compiled files in __pycache__ when the tree was imported without a prefix
        for line in path.read_text().splitlines():
            assert not line.startswith(("from envoy", "import envoy")), f"{path}: {line}"
