"""StreamProcessor + Chain end to end through FakeEnvoy (in process, protobuf bytes both ways)."""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.observability.metrics import Registry
from extproc.plugin import (
    CONTINUE,
    BodyMode,
    Continue,
    ErrorEvent,
    Event,
    Headers,
    Needs,
    Phase,
    Plugin,
    Reject,
    Respond,
)
from extproc.protocol import codec
from extproc.protocol.events import BodySendMode, Message, Reply
from extproc.protocol.state import LocalProtocolError
from extproc.stream import REPLY_CACHE, ReplyCache, StreamProcessor
from extproc.testing.fake_envoy import EnvoyMode, Exchange, FakeEnvoy

RQH, RQB, RQT = Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.REQUEST_TRAILERS
RSH, RSB, RST = Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY, Phase.RESPONSE_TRAILERS
BODY_PHASES = (RQB, RSB)
FD = BodySendMode.FULL_DUPLEX_STREAMED
STREAMED = BodySendMode.STREAMED
BUFFERED = BodySendMode.BUFFERED
CHUNK = 4
REQ_BODY = b"0123456789abcdefghij-request"  # 28 bytes: 7 chunks of 4
RESP_BODY = b"ABCDEFGHIJ-response"  # 19 bytes: 5 chunks of 4

Action = Any  # a Result, or a callable(event) -> Result (sync or async)


class Rec(Plugin):
    """A test plugin that records every event and answers per phase."""

    def __init__(
        self,
        name: str,
        priority: int = 0,
        needs: Needs | None = None,
        on: dict[Phase, Action] | None = None,
    ) -> None:
        super().__init__(None)
        self.name = name  # type: ignore[misc]
        self.priority = priority  # type: ignore[misc]
        self.my_needs = needs or Needs()
        self.on = on or {}
        self.events: list[Event] = []
        self.errors: list[ErrorEvent] = []
        self.error_seen = asyncio.Event()

    def needs_for(self, config: Any) -> Needs:  # type: ignore[override]
        return self.my_needs  # per instance: these tests build many shapes from one class

    async def _handle(self, event: Event) -> Any:
        self.events.append(event)
        action = self.on.get(event.phase, CONTINUE)
        if callable(action):
            action = action(event)
            if inspect.isawaitable(action):
                action = await action
        return action

    on_request = _handle  # type: ignore[assignment]
    on_response = _handle  # type: ignore[assignment]

    async def on_error(self, event: ErrorEvent) -> None:
        self.errors.append(event)
        self.error_seen.set()

    def phases(self) -> list[Phase]:
        return [e.phase for e in self.events]

    def bodies(self, phase: Phase) -> list[tuple[bytes, bool]]:
        return [(e.body, e.end_of_stream) for e in self.events if e.phase is phase]  # type: ignore[union-attr]

    async def wait_error(self) -> ErrorEvent:
        await asyncio.wait_for(self.error_seen.wait(), 2.0)
        return self.errors[-1]


def envoy(plugins: list[Plugin], mode: EnvoyMode | None = None, **kw: Any) -> FakeEnvoy:
    fe = FakeEnvoy.for_plugins(plugins, mode, **kw)
    fe.chunk_size = CHUNK
    return fe


ALL_PHASES = Needs(
    request_headers=True,
    request_body=BodyMode.STREAMED,
    request_trailers=True,
    response_headers=True,
    response_body=BodyMode.STREAMED,
    response_trailers=True,
)


async def full_request(fe: FakeEnvoy, trailers: bool = True, **kw: Any) -> Exchange:
    return await fe.request(
        "POST",
        "/things?id=1",
        headers={"x-in": "1", "x-gone": "bye"},
        body=REQ_BODY,
        trailers={"x-req-trailer": "t"} if trailers else None,
        upstream_headers={"x-up": "u"},
        upstream_body=RESP_BODY,
        upstream_trailers={"x-resp-trailer": "t"} if trailers else None,
        **kw,
    )


# ------------------------------------------------------------------ every mode

MODES = [
    EnvoyMode(
        request_headers=rqh,
        response_headers=rsh,
        request_body=rqb,
        response_body=rsb,
        request_trailers=tr,
        response_trailers=tr,
    )
    for rqh, rsh, rqb, rsb, tr in itertools.product(
        (True, False), (True, False), BodySendMode, BodySendMode, (True, False)
    )
]


def _mode_id(m: EnvoyMode) -> str:
    return (
        f"rqh{int(m.request_headers)}-rsh{int(m.response_headers)}-"
        f"{m.request_body.name}-{m.response_body.name}-tr{int(m.request_trailers)}"
    )


@pytest.mark.parametrize("mode", MODES, ids=[_mode_id(m) for m in MODES])
async def test_every_mode_calls_plugins_only_for_declared_phases(mode: EnvoyMode) -> None:
    plugins = [
        Rec("req_headers", 40, Needs(request_headers=True)),
        Rec(
            "resp_side",
            30,
            Needs(request_headers=False, response_headers=True, response_trailers=True),
        ),
        Rec(
            "buffered_bodies",
            20,
            Needs(
                request_headers=False,
                request_body=BodyMode.BUFFERED,
                response_body=BodyMode.BUFFERED,
            ),
        ),
        Rec(
            "streamed_bodies",
            10,
            Needs(
                request_headers=False,
                request_body=BodyMode.STREAMED,
                response_body=BodyMode.STREAMED,
                request_trailers=True,
            ),
        ),
        Rec("everything", 0, ALL_PHASES),
    ]
    ex = await full_request(envoy(plugins, mode), trailers=mode.request_trailers)
    sent = set(ex.messages_sent)
    # Envoy sent what the mode asks for, and got exactly one valid answer to each
    assert (RQH in sent) is mode.request_headers
    assert (RSB in sent) is (mode.response_body is not BodySendMode.NONE)
    assert not ex.immediate
    assert ex.status == 200
    # the body went through untouched both ways
    assert ex.upstream_body == REQ_BODY
    assert ex.response_body == RESP_BODY
    assert ex.upstream_header("x-in") == "1"
    for p in plugins:
        assert isinstance(p, Rec)
        declared = p.my_needs.phases()
        called = set(p.phases())
        assert called <= declared, f"{p.name} called for {called - declared}"
        # headers and trailers phases: called exactly when Envoy sent them
        for phase in (RQH, RQT, RSH, RST):
            assert (phase in called) is (phase in declared and phase in sent), (p.name, phase)
        if p.name in ("streamed_bodies", "everything"):
            for phase in BODY_PHASES:
                assert (phase in called) is (phase in sent), (p.name, phase)
        for e in p.events:
            if e.phase in BODY_PHASES:
                assert e.body in (REQ_BODY if e.phase.is_request else RESP_BODY)  # type: ignore[union-attr]


# ------------------------------------------------------------------ ending the stream early

EVERY_PHASE_SENT = EnvoyMode(
    request_headers=True,
    response_headers=True,
    request_body=STREAMED,
    response_body=STREAMED,
    request_trailers=True,
    response_trailers=True,
)


async def test_stream_ends_once_no_wanted_phase_can_come() -> None:
    """Envoy configured to send every phase, one plugin on request headers: after that
    reply the sidecar ends the stream, and the rest of the exchange goes on unchanged."""
    rec = Rec("auth", on={RQH: Continue(set_headers={"x-user": "ann"})})
    ex = await full_request(envoy([rec], EVERY_PHASE_SENT))
    assert ex.sidecar_closed
    assert ex.messages_sent == [RQH]
    assert rec.phases() == [RQH]
    assert ex.upstream_header("x-user") == "ann"
    assert ex.upstream_body == REQ_BODY and ex.response_body == RESP_BODY
    assert ex.status == 200 and ex.header("x-up") == "u"


@pytest.mark.parametrize(
    ("needs", "last"),
    [
        # a body chunk without end_of_stream: trailers may still come, and end the body
        (Needs(request_body=BodyMode.STREAMED), RQT),
        (Needs(request_trailers=True), RQT),
        (Needs(response_headers=True), RSH),
        (Needs(response_body=BodyMode.BUFFERED), RST),
        (Needs(response_trailers=True), RST),
    ],
    ids=["request_body", "request_trailers", "response_headers", "response_body",
         "response_trailers"],
)  # fmt: skip
async def test_stream_stays_open_until_the_last_wanted_phase(needs: Needs, last: Phase) -> None:
    rec = Rec("p", needs=needs)
    ex = await full_request(envoy([rec], EVERY_PHASE_SENT))
    assert ex.messages_sent[-1] is last
    assert set(rec.phases()) == needs.phases()
    # ended by the sidecar unless the last wanted phase is the last message anyway
    assert ex.sidecar_closed is (last is not RST)
    assert ex.upstream_body == REQ_BODY and ex.response_body == RESP_BODY


async def test_request_without_a_body_ends_the_request_side_with_its_headers() -> None:
    """A plugin wants the request body, but a GET has none: nothing more can come."""
    rec = Rec("p", needs=Needs(request_body=BodyMode.BUFFERED))
    fe = envoy([rec], EVERY_PHASE_SENT)
    ex = await fe.request("GET", "/x", upstream_body=b"ok")
    assert ex.sidecar_closed and ex.messages_sent == [RQH]
    assert ex.response_body == b"ok"


async def test_stream_processor_finished_follows_the_sides() -> None:
    """The property the server's loop reads after each reply: request side done and the
    response headers answered, with nothing wanted after them."""
    rec = Rec("p", needs=Needs(request_headers=True, response_headers=True))
    fe = envoy([rec], EVERY_PHASE_SENT)
    ex = await full_request(fe)
    assert ex.messages_sent == [RQH, *[RQB] * 7, RQT, RSH]
    stream = fe.transport.stream  # type: ignore[attr-defined]
    assert isinstance(stream, StreamProcessor) and stream.finished and not stream.closed
    # an unfinished one: a POST whose body nobody wants, response headers still to come
    fresh = StreamProcessor(stream.chain, stream.metrics)
    head = codec.decode(pb.ProcessingRequest.FromString(_post_headers()))
    await fresh.handle(head)
    assert not fresh.finished


def _post_headers() -> bytes:
    r = pb.ProcessingRequest()
    for k, v in ((":method", b"POST"), (":path", b"/x")):
        h = r.request_headers.headers.headers.add()
        h.key, h.raw_value = k, v
    r.request_headers.end_of_stream = False
    return r.SerializeToString()


# ------------------------------------------------------------------ bodies


@pytest.mark.parametrize(
    "mode", [BUFFERED, STREAMED, FD, BodySendMode.BUFFERED_PARTIAL], ids=lambda m: m.name
)
async def test_buffered_plugin_gets_one_event_with_the_whole_body(mode: BodySendMode) -> None:
    p = Rec("buf", needs=Needs(request_body=BodyMode.BUFFERED, response_body=BodyMode.BUFFERED))
    env_mode = EnvoyMode(response_headers=True, request_body=mode, response_body=mode)
    ex = await full_request(envoy([p], env_mode), trailers=False)
    assert p.bodies(RQB) == [(REQ_BODY, True)]
    assert p.bodies(RSB) == [(RESP_BODY, True)]
    assert ex.upstream_body == REQ_BODY
    assert ex.response_body == RESP_BODY
    if mode in (STREAMED, FD):
        assert ex.messages_sent.count(RQB) == 7  # Envoy streamed it in chunks


@pytest.mark.parametrize("mode", [STREAMED, FD], ids=["STREAMED", "FULL_DUPLEX"])
async def test_buffered_plugin_gets_the_body_when_trailers_end_it(mode: BodySendMode) -> None:
    p = Rec("buf", needs=Needs(request_body=BodyMode.BUFFERED, request_trailers=True))
    env_mode = EnvoyMode(request_body=mode, request_trailers=True, response_trailers=True)
    await full_request(envoy([p], env_mode), trailers=True)
    assert [b for b, _ in p.bodies(RQB)] == [REQ_BODY]


@pytest.mark.parametrize("mode", [STREAMED, FD], ids=["STREAMED", "FULL_DUPLEX"])
@pytest.mark.parametrize("trailers", [False, True])
async def test_streamed_plugin_gets_one_event_per_chunk(mode: BodySendMode, trailers: bool) -> None:
    p = Rec("chunks", needs=Needs(request_body=BodyMode.STREAMED, response_body=BodyMode.STREAMED))
    env_mode = EnvoyMode(
        response_headers=True,
        request_body=mode,
        response_body=mode,
        request_trailers=trailers,
        response_trailers=trailers,
    )
    ex = await full_request(envoy([p], env_mode), trailers=trailers)
    for phase, body in ((RQB, REQ_BODY), (RSB, RESP_BODY)):
        events = p.bodies(phase)
        chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
        assert [b for b, _ in events] == chunks
        assert [eos for _, eos in events] == [False] * (len(chunks) - 1) + [not trailers]
    assert ex.upstream_body == REQ_BODY
    assert ex.response_body == RESP_BODY


@pytest.mark.parametrize("trailers", [False, True])
async def test_full_duplex_streams_the_body_back_unchanged(trailers: bool) -> None:
    # plugins that do not look at the body, one that only reads it, one that sets headers
    plugins = [
        Rec("headers_only", 30, Needs(response_headers=True)),
        Rec("reader", 20, Needs(request_body=BodyMode.STREAMED, response_body=BodyMode.STREAMED)),
        Rec(
            "tagger",
            10,
            Needs(request_body=BodyMode.STREAMED),
            on={RQB: Continue(set_headers={"x-seen": "1"})},
        ),
    ]
    mode = EnvoyMode(
        response_headers=True,
        request_body=FD,
        response_body=FD,
        request_trailers=True,
        response_trailers=True,
    )
    ex = await full_request(envoy(plugins, mode), trailers=trailers)
    assert ex.upstream_body == REQ_BODY
    assert ex.response_body == RESP_BODY
    assert ex.messages_sent.count(RQB) == 7


async def test_full_duplex_without_any_body_plugin_still_streams_back() -> None:
    mode = EnvoyMode(request_body=FD, response_body=FD, response_headers=True)
    ex = await full_request(envoy([Rec("h")], mode), trailers=False)
    assert ex.upstream_body == REQ_BODY
    assert ex.response_body == RESP_BODY


async def test_full_duplex_streamed_plugin_may_rewrite_chunks() -> None:
    p = Rec(
        "upper",
        needs=Needs(request_body=BodyMode.STREAMED),
        on={RQB: lambda e: Continue(body=e.body.upper())},
    )
    ex = await full_request(envoy([p], EnvoyMode(request_body=FD)), trailers=False)
    assert ex.upstream_body == REQ_BODY.upper()


@pytest.mark.parametrize("direction", ["request", "response"])
async def test_buffered_body_replacement_sets_content_length(direction: str) -> None:
    new = b"replaced body!"
    phase = RQB if direction == "request" else RSB
    needs = (
        Needs(request_body=BodyMode.BUFFERED)
        if direction == "request"
        else Needs(response_body=BodyMode.BUFFERED)
    )
    p = Rec("rewrite", needs=needs, on={phase: Continue(body=new)})
    mode = EnvoyMode(response_headers=True, request_body=BUFFERED, response_body=BUFFERED)
    ex = await fe_request_with_lengths(envoy([p], mode))
    if direction == "request":
        assert ex.upstream_body == new
        assert ex.upstream_header("content-length") == str(len(new))
        assert ex.response_body == RESP_BODY
    else:
        assert ex.upstream_body == REQ_BODY
        assert ex.response_body == new
        assert ex.header("content-length") == str(len(new))


async def fe_request_with_lengths(fe: FakeEnvoy) -> Exchange:
    return await fe.request(
        "POST",
        "/",
        body=REQ_BODY,
        upstream_headers={"content-length": str(len(RESP_BODY))},
        upstream_body=RESP_BODY,
    )


async def test_buffered_body_cleared_sets_zero_content_length() -> None:
    p = Rec("clear", needs=Needs(request_body=BodyMode.BUFFERED), on={RQB: Continue(body=b"")})
    ex = await fe_request_with_lengths(envoy([p], EnvoyMode(request_body=BUFFERED)))
    assert ex.upstream_body == b""
    assert ex.upstream_header("content-length") == "0"


async def test_streamed_chunk_replacement_does_not_touch_content_length() -> None:
    p = Rec(
        "upper",
        needs=Needs(request_body=BodyMode.STREAMED),
        on={RQB: lambda e: Continue(body=e.body.upper())},
    )
    ex = await fe_request_with_lengths(envoy([p], EnvoyMode(request_body=STREAMED)))
    assert ex.upstream_body == REQ_BODY.upper()
    assert ex.upstream_header("content-length") == str(len(REQ_BODY))  # ours, unchanged


@pytest.mark.parametrize("mode", [STREAMED, FD], ids=["STREAMED", "FULL_DUPLEX"])
async def test_buffered_plugin_cannot_splice_a_streamed_body(mode: BodySendMode) -> None:
    p = Rec("rewrite", needs=Needs(request_body=BodyMode.BUFFERED), on={RQB: Continue(body=b"X")})
    ex = await full_request(envoy([p], EnvoyMode(request_body=mode)), trailers=False)
    assert ex.upstream_body in (REQ_BODY, b"X")  # either unchanged or wholly replaced


async def test_buffered_plugin_body_too_large_is_413() -> None:
    p = Rec("buf", needs=Needs(request_body=BodyMode.BUFFERED))
    fe = envoy([p], EnvoyMode(request_body=STREAMED))
    transport = fe.transport
    orig_open = transport.open

    async def small_open() -> None:
        await orig_open()
        transport.stream.max_body_bytes = 10  # type: ignore[attr-defined]

    transport.open = small_open  # type: ignore[method-assign]
    ex = await full_request(fe, trailers=False)
    assert ex.immediate
    assert ex.status == 413
    assert json.loads(ex.response_body)["error"] == "payload_too_large"
    assert p.bodies(RQB) == []


# ------------------------------------------------------------------ header mutations


async def test_header_mutations_merge_in_priority_order() -> None:
    order: list[str] = []

    def step(name: str, result: Continue) -> Callable[[Event], Continue]:
        def run(_: Event) -> Continue:
            order.append(name)
            return result

        return run

    low = Rec(
        "low",
        10,
        on={
            RQH: step(
                "low",
                Continue(
                    set_headers={"x-a": "low", "x-removed-then-set": "low"},
                    remove_headers=("x-set-then-removed",),
                    append_headers={"x-list": "low"},
                ),
            )
        },
    )
    high = Rec(
        "high",
        100,
        on={
            RQH: step(
                "high",
                Continue(
                    set_headers={"x-a": "high", "x-b": "high", "x-set-then-removed": "high"},
                    remove_headers=("x-removed-then-set", "x-gone"),
                    append_headers={"x-list": "high"},
                ),
            )
        },
    )
    mid = Rec("mid", 50, on={RQH: step("mid", Continue(set_headers={"X-Mid": "mid"}))})
    ex = await full_request(envoy([low, high, mid]), trailers=False)
    assert order == ["high", "mid", "low"]
    up = ex.upstream_headers or {}
    assert up["x-a"] == ["low"]  # a later set overrides
    assert up["x-b"] == ["high"]
    assert up["x-mid"] == ["mid"]  # keys lower-cased
    assert up["x-removed-then-set"] == ["low"]  # remove, then set: the set wins
    assert "x-set-then-removed" not in up  # set, then remove: gone
    assert "x-gone" not in up
    assert up["x-in"] == ["1"]
    assert up["x-list"] == ["high", "low"]


async def test_later_set_overrides_an_earlier_append() -> None:
    high = Rec("high", 100, on={RQH: Continue(append_headers={"x-in": "appended"})})
    low = Rec("low", 10, on={RQH: Continue(set_headers={"x-in": "final"})})
    ex = await full_request(envoy([high, low]), trailers=False)
    assert (ex.upstream_headers or {})["x-in"] == ["final"]


async def test_forbidden_mutations_are_dropped_not_sent() -> None:
    p = Rec(
        "evil",
        on={
            RQH: Continue(
                set_headers={
                    "host": "evil",
                    ":authority": "evil",
                    "x-envoy-internal": "1",
                    "x-ok": "1",
                },
                remove_headers=(":path", "x-in"),
            )
        },
    )
    ex = await full_request(envoy([p]), trailers=False)
    up = ex.upstream_headers or {}
    assert up[":authority"] == ["example.com"]
    assert up[":path"] == ["/things?id=1"]
    assert "host" not in up
    assert "x-envoy-internal" not in up
    assert up["x-ok"] == ["1"]
    assert "x-in" not in up


def _request_headers_message() -> Message:
    return Message(RQH, headers=Headers.of({":path": "/", "x-in": "1"}), end_of_stream=True)


async def _reply_of(fe: FakeEnvoy) -> Any:
    t = fe.transport
    stream = StreamProcessor(t.chain, t.metrics)  # type: ignore[attr-defined]
    return await stream.handle(_request_headers_message())


async def test_same_header_mutations_reuse_one_serialized_reply() -> None:
    fe = envoy(
        [Rec("p", on={RQH: Continue(set_headers={"x-cached": "1"}, remove_headers=("x-in",))})]
    )
    first = await _reply_of(fe)
    second = await _reply_of(fe)
    assert isinstance(first, Reply) and second is first  # built and serialized once
    assert (
        first.wire
        == codec.encode(RQH, Reply(header_mutation=first.header_mutation)).SerializeToString()
    )
    ex = await full_request(fe, trailers=False)  # and Envoy sees the mutation
    assert (ex.upstream_headers or {})["x-cached"] == ["1"] and "x-in" not in (
        ex.upstream_headers or {}
    )


async def test_a_reply_that_dropped_a_header_is_not_cached_and_reported_each_time() -> None:
    registry = Registry()
    fe = FakeEnvoy.for_plugins(
        [Rec("p", on={RQH: Continue(set_headers={"host": "evil", "x-ok": "2"})})], registry=registry
    )
    first = await _reply_of(fe)
    second = await _reply_of(fe)
    assert first is not second and first == second
    assert first.wire is None
    assert (
        'extproc_mutations_dropped_total{reason="forbidden_header"} 2'
        in registry.render_prometheus()
    )


async def test_replies_with_metadata_are_not_cached() -> None:
    fe = envoy([Rec("p", on={RQH: Continue(set_headers={"x-m": "1"}, metadata={"k": "v"})})])
    first = await _reply_of(fe)
    second = await _reply_of(fe)
    assert first is not second and first.wire is None and first.dynamic_metadata


def test_reply_cache_is_bounded() -> None:
    cache = ReplyCache(max_entries=2)
    for i in range(3):
        cache.put((RQH, (("x", str(i)),), (), ()), Reply())
    assert len(cache) == 1  # full at the third: started over
    assert cache.get((RQH, (("x", "2"),), (), ())) is not None
    assert len(REPLY_CACHE) <= REPLY_CACHE.max_entries


async def test_response_header_and_trailer_mutations() -> None:
    p = Rec(
        "resp",
        needs=Needs(
            request_headers=False,
            response_headers=True,
            response_trailers=True,
            request_trailers=True,
        ),
        on={
            RSH: Continue(
                set_headers={"x-added": "yes", ":status": "201"}, remove_headers=("x-up",)
            ),
            RQT: Continue(set_headers={"x-req-trailer": "changed"}),
        },
    )
    mode = EnvoyMode(response_headers=True, request_trailers=True, response_trailers=True)
    ex = await full_request(envoy([p], mode))
    assert ex.status == 201
    assert ex.header("x-added") == "yes"
    assert ex.header("x-up") is None
    assert (ex.upstream_trailers or {})["x-req-trailer"] == ["changed"]


async def test_dynamic_metadata_is_namespaced_per_plugin() -> None:
    a = Rec("auth", 10, on={RQH: Continue(metadata={"sub": "alice"})})
    b = Rec("rl", 5, on={RQH: Continue(metadata={"hits": 3})})
    ex = await full_request(envoy([a, b]), trailers=False)
    assert ex.dynamic_metadata == {"extproc.auth": {"sub": "alice"}, "extproc.rl": {"hits": 3.0}}


# ------------------------------------------------------------------ respond / reject


@pytest.mark.parametrize("phase", [RQH, RQB, RSH])
async def test_first_reject_wins_and_later_plugins_are_not_called(phase: Phase) -> None:
    needs = Needs(request_body=BodyMode.BUFFERED, response_headers=True)
    first = Rec("first", 100, needs, on={phase: Continue(set_headers={"x-first": "1"})})
    rejecter = Rec(
        "rejecter",
        50,
        needs,
        on={
            phase: Reject(
                401, "unauthorized", "Missing token.", headers={"www-authenticate": "Bearer"}
            )
        },
    )
    second = Rec("second", 40, needs, on={phase: Respond(200, b"never")})
    after = Rec("after", 10, needs)
    mode = EnvoyMode(response_headers=True, request_body=BUFFERED)
    ex = await full_request(envoy([after, second, rejecter, first], mode), trailers=False)
    assert ex.immediate
    assert ex.status == 401
    assert ex.header("content-type") == "application/json"
    assert ex.header("www-authenticate") == "Bearer"
    assert ex.header("x-first") is None  # continue mutations of the same message are dropped
    assert json.loads(ex.response_body) == {"error": "unauthorized", "message": "Missing token."}
    assert ex.details == "unauthorized"
    assert phase not in second.phases()
    assert phase not in after.phases()
    assert first.phases().count(phase) == 1
    if phase.is_request:
        assert ex.upstream_headers is None  # never reached the upstream
    # nothing is sent after the immediate response
    assert ex.messages_sent[-1] is phase


@pytest.mark.parametrize(
    ("mode", "chunk"), [(STREAMED, 0), (STREAMED, 2), (BUFFERED, 0)], ids=["first", "later", "buf"]
)
async def test_reject_on_response_body(mode: BodySendMode, chunk: int) -> None:
    """Allowed while BUFFERED holds the headers; after they went downstream no valid reply
    exists: a LocalProtocolError for the server to reset the stream with."""

    def reject_nth(e: Event) -> Continue | Reject:
        n = sum(1 for x in p.events if x.phase is RSB)
        return Reject(502, "bad_gateway") if n == chunk + 1 else CONTINUE

    p = Rec("late", needs=Needs(response_body=BodyMode.STREAMED), on={RSB: reject_nth})
    fe = envoy([p], EnvoyMode(response_headers=True, response_body=mode))
    if mode is BUFFERED:
        ex = await full_request(fe, trailers=False)
        assert ex.immediate
        assert ex.status == 502
        return
    with pytest.raises(LocalProtocolError, match="started"):
        await full_request(fe, trailers=False)


async def test_respond_answers_with_status_headers_and_body() -> None:
    p = Rec("redirect", on={RQH: Respond(302, b"moved", {"Location": "/login"}, "to login")})
    later = Rec("later", -1)
    ex = await full_request(envoy([p, later]), trailers=False)
    assert ex.immediate
    assert ex.status == 302
    assert ex.header("location") == "/login"
    assert ex.response_body == b"moved"
    assert ex.details == "to_login"
    assert later.events == []


async def test_reject_body_carries_no_internals() -> None:
    p = Rec("r", on={RQH: Reject(403, "forbidden")})
    ex = await full_request(envoy([p]), trailers=False)
    body = json.loads(ex.response_body)
    assert body == {"error": "forbidden", "message": ""}
    assert set(body) == {"error", "message"}


async def test_observability_mode_never_replies_even_when_a_plugin_rejects() -> None:
    p = Rec("r", needs=ALL_PHASES, on={RQH: Reject(403, "forbidden")})
    mode = EnvoyMode(
        response_headers=True,
        request_body=STREAMED,
        response_body=STREAMED,
        request_trailers=True,
        response_trailers=True,
        observability_mode=True,
    )
    ex = await full_request(envoy([p], mode))
    assert not ex.immediate
    assert ex.status == 200
    assert ex.upstream_body == REQ_BODY
    assert set(p.phases()) == set(Phase)


# ------------------------------------------------------------------ failures


class Boom(RuntimeError):
    pass


def _raise(_: Event) -> Continue:
    raise Boom("secret internal detail /etc/passwd")


async def _sleep_long(_: Event) -> Continue:
    await asyncio.sleep(5)
    return CONTINUE


def _none(_: Event) -> None:
    return None


@pytest.mark.parametrize("phase", [RQH, RSH])
async def test_plugin_raising_fails_closed_with_500_json(phase: Phase) -> None:
    p = Rec("crashy", 10, Needs(response_headers=True), on={phase: _raise})
    later = Rec("later", 0, Needs(response_headers=True))
    ex = await full_request(envoy([p, later], EnvoyMode(response_headers=True)), trailers=False)
    assert ex.immediate
    assert ex.status == 500
    body = json.loads(ex.response_body)
    assert set(body) == {"error", "message"}
    assert body["error"] == "internal_error"
    assert b"secret" not in ex.response_body
    assert b"Boom" not in ex.response_body
    assert ex.details == "extproc_crashy_exception"
    assert phase not in later.phases()
    err = await p.wait_error()
    assert err.kind == "exception"
    assert err.phase is phase
    assert isinstance(err.error, Boom)


async def test_plugin_raising_fails_open_and_the_chain_goes_on() -> None:
    p = Rec("crashy", 10, on={RQH: _raise})
    later = Rec("later", 0, on={RQH: Continue(set_headers={"x-later": "1"})})
    ex = await full_request(envoy([p, later], fail_open=True), trailers=False)
    assert not ex.immediate
    assert ex.status == 200
    assert ex.upstream_header("x-later") == "1"
    assert later.phases() == [RQH]
    err = await p.wait_error()
    assert err.kind == "exception"


@pytest.mark.parametrize("fail_open", [False, True])
async def test_plugin_past_its_timeout(fail_open: bool) -> None:
    p = Rec("slow", 10, on={RQH: _sleep_long})
    later = Rec("later", 0)
    fe = envoy([p, later], timeout=0.03, fail_open=fail_open)
    t0 = time.monotonic()
    ex = await full_request(fe, trailers=False)
    assert time.monotonic() - t0 < 2.0  # far below the plugin's 5 s sleep
    if fail_open:
        assert not ex.immediate
        assert ex.status == 200
        assert later.phases() == [RQH]
    else:
        assert ex.immediate
        assert ex.status == 503
        assert json.loads(ex.response_body)["error"] == "unavailable"
        assert ex.details == "extproc_slow_timeout"
        assert later.events == []
    err = await p.wait_error()
    assert err.kind == "timeout"


async def test_message_budget_cuts_plugin_timeouts() -> None:
    p = Rec("slow", on={RQH: _sleep_long})
    fe = envoy([p], timeout=5.0, budget=0.03)
    t0 = time.monotonic()
    ex = await full_request(fe, trailers=False)
    assert time.monotonic() - t0 < 2.0
    assert ex.status == 503
    assert (await p.wait_error()).kind == "timeout"


@pytest.mark.parametrize("fail_open", [False, True])
async def test_plugin_returning_none_is_a_bad_result(fail_open: bool) -> None:
    p = Rec("forgetful", on={RQH: _none})
    ex = await full_request(envoy([p], fail_open=fail_open), trailers=False)
    assert ex.status == (200 if fail_open else 500)
    assert ex.immediate is not fail_open
    err = await p.wait_error()
    assert err.kind == "bad_result"
    assert isinstance(err.error, TypeError)
    assert "forgetful" in str(err.error)
    assert "NoneType" in str(err.error)


# ------------------------------------------------------------------ request context


async def test_request_context_is_shared_within_a_request_and_not_across() -> None:
    seen: list[tuple[str, Phase, int, dict[str, Any]]] = []
    counter = itertools.count()

    def writer(e: Event) -> Continue:
        e.context["writer.n"] = next(counter)
        seen.append(("writer", e.phase, id(e.context), copy.deepcopy(dict(e.context))))
        return CONTINUE

    def reader(e: Event) -> Continue:
        seen.append(("reader", e.phase, id(e.context), copy.deepcopy(dict(e.context))))
        e.context.setdefault("reader.phases", []).append(e.phase.value)
        return CONTINUE

    needs = Needs(response_headers=True, request_body=BodyMode.BUFFERED)
    w = Rec("writer", 10, Needs(), on={RQH: writer})
    r = Rec("reader", 0, needs, on={RQH: reader, RQB: reader, RSH: reader})
    fe = envoy([w, r], EnvoyMode(response_headers=True, request_body=BUFFERED))
    await full_request(fe, trailers=False)
    first = list(seen)
    seen.clear()
    await full_request(fe, trailers=False)
    second = list(seen)

    for run, n in ((first, 0), (second, 1)):
        assert [(who, phase) for who, phase, _, _ in run] == [
            ("writer", RQH),
            ("reader", RQH),
            ("reader", RQB),
            ("reader", RSH),
        ]
        assert len({ctx_id for _, _, ctx_id, _ in run}) == 1  # one object per request
        assert run[0][3] == {"writer.n": n}  # nothing left over from the previous request
        assert run[1][3] == {"writer.n": n}
        assert run[3][3] == {"writer.n": n, "reader.phases": ["request_headers", "request_body"]}


async def test_events_carry_the_request_seen_in_request_headers() -> None:
    r = Rec("r", needs=Needs(response_headers=True))
    await full_request(envoy([r], EnvoyMode(response_headers=True)), trailers=False)
    req, resp = r.events
    assert req.request.method == "POST"  # type: ignore[union-attr]
    assert req.request.route_path == "/things"  # type: ignore[union-attr]
    assert resp.request is req.request  # type: ignore[union-attr]
    assert resp.status == 200  # type: ignore[union-attr]


# ------------------------------------------------------------------ shadow plugins


def _shadow(fe: FakeEnvoy, *names: str) -> FakeEnvoy:
    for slot in fe.transport.chain.slots:  # type: ignore[attr-defined]
        if slot.name in names:
            slot.shadow = True
    return fe


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(Reject(403, "forbidden"), id="reject"),
        pytest.param(Respond(418, b"teapot"), id="respond"),
        pytest.param(_raise, id="raise"),
        pytest.param(_none, id="bad-result"),
    ],
)
async def test_shadow_plugins_never_block(action: Action) -> None:
    shadow = Rec("shadow", 100, on={RQH: action})
    later = Rec("later", 0, on={RQH: Continue(set_headers={"x-later": "1"})})
    fe = _shadow(envoy([shadow, later]), "shadow")
    ex = await full_request(fe, trailers=False)
    assert not ex.immediate
    assert ex.status == 200
    assert ex.upstream_header("x-later") == "1"
    assert shadow.phases() == [RQH]
    assert later.phases() == [RQH]


async def test_shadow_plugin_timeout_does_not_block() -> None:
    shadow = Rec("shadow", 100, on={RQH: _sleep_long})
    fe = _shadow(envoy([shadow, Rec("later")], timeout=0.03), "shadow")
    ex = await full_request(fe, trailers=False)
    assert ex.status == 200
    assert not ex.immediate
    assert (await shadow.wait_error()).kind == "timeout"


async def test_shadow_plugin_mutations_are_not_applied() -> None:
    shadow = Rec(
        "shadow", on={RQH: Continue(set_headers={"x-shadow": "1"}, remove_headers=("x-in",))}
    )
    fe = _shadow(envoy([shadow]), "shadow")
    ex = await full_request(fe, trailers=False)
    assert ex.upstream_header("x-shadow") is None
    assert ex.upstream_header("x-in") == "1"
