"""``python -m bench.instructions``: the parts that need no valgrind (the whole tool runs in
tests/e2e/test_bench_instructions.py)."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder

from bench.instructions import (
    _GRPC_HEADERS,
    Count,
    _check_reply,
    _failures,
    _streams,
    collected,
    per_request,
    table,
)
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.http2 import frame


def test_the_count_is_the_last_one_callgrind_printed() -> None:
    stderr = "==1== Callgrind, a call-graph generating profiler\n==1== Collected : 1,234,567\n"
    assert collected(stderr) == 1_234_567
    assert collected("==7== Collected : 10\n==7== Collected : 99\n") == 99
    with pytest.raises(RuntimeError, match="no count"):
        collected("valgrind: command not found")


def test_the_switching_is_taken_off_before_dividing() -> None:
    assert per_request(Count("none", "this tree", 2_500_000, 1000), 500_000) == 2000.0


def test_the_table_has_a_ratio_column_only_with_a_baseline() -> None:
    alone = table([("no plugins", 284_000.4, None)], None)
    assert alone.splitlines()[0] == "| configuration | instructions / request |"
    assert "| no plugins | 284,000 |" in alone
    paired = table([("no plugins", 270_000, 300_000), ("jwt", 10, None)], "abc1234")
    assert "| at abc1234 | ratio |" in paired.splitlines()[0]
    assert "| no plugins | 270,000 | 300,000 | 0.900 |" in paired
    assert "| jwt | 10 | - | - |" in paired


def test_each_stream_is_one_headers_and_one_data_frame_on_its_own_odd_id() -> None:
    bodies = [b"first", b"second message"]
    streams = _streams(bodies)
    decoder = Decoder()
    for i, (data, body) in enumerate(zip(streams, bodies, strict=True)):
        size = int.from_bytes(data[:3], "big")
        assert data[3] == 0x1 and data[4] == 0x4  # HEADERS, END_HEADERS, no END_STREAM
        assert int.from_bytes(data[5:9], "big") == 1 + 2 * i
        assert decoder.decode(data[9 : 9 + size]) == list(_GRPC_HEADERS)
        rest = data[9 + size :]
        assert rest[3] == 0x0 and rest[4] == 0  # DATA, the client's side stays open
        assert rest[9:] == b"\x00" + len(body).to_bytes(4, "big") + body


def _reply(status: bytes, response: pb.ProcessingResponse) -> bytes:
    enc = Encoder()
    body = response.SerializeToString()
    return (
        frame(0x1, 0x4, 1, enc.encode([(":status", "200")]))
        + frame(0x0, 0, 1, b"\x00" + len(body).to_bytes(4, "big") + body)
        + frame(0x1, 0x5, 1, enc.encode([("grpc-status", status.decode())]))
    )


def test_only_a_reply_that_lets_the_request_through_is_counted() -> None:
    ok = pb.ProcessingResponse()
    ok.request_headers.SetInParent()
    _check_reply(_reply(b"0", ok))
    refused = pb.ProcessingResponse()
    refused.immediate_response.status.code = 401
    with pytest.raises(RuntimeError, match="not let through"):
        _check_reply(_reply(b"0", refused))
    with pytest.raises(RuntimeError, match="failed"):
        _check_reply(_reply(b"13", ok))


def test_failures_are_the_plugin_error_and_fallback_series() -> None:
    text = "\n".join([
        "# TYPE extproc_plugin_errors_total counter",
        'extproc_plugin_errors_total{plugin="rate_limit",kind="timeout"} 2.0',
        'extproc_rate_limit_fallback_total{rule="per_user",policy="local"} 1.0',
        'extproc_plugin_decisions_total{plugin="jwt_auth",phase="request_headers"} 900.0',
    ])  # fmt: skip
    assert _failures(text) == {
        'extproc_plugin_errors_total{plugin="rate_limit",kind="timeout"}': 2.0,
        'extproc_rate_limit_fallback_total{rule="per_user",policy="local"}': 1.0,
    }
