"""Table-driven tests of the per-stream protocol state machine (``extproc.protocol.state``)."""

from __future__ import annotations

import itertools

import pytest

from extproc.plugin import Phase
from extproc.protocol.events import (
    BodySendMode,
    HeaderMutation,
    HeaderSendMode,
    ImmediateReply,
    Message,
    ModeOverride,
    ProtocolConfig,
    Reply,
)
from extproc.protocol.state import (
    LocalProtocolError,
    RemoteProtocolError,
    Side,
    StreamState,
)

RQH, RQB, RQT = Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.REQUEST_TRAILERS
RSH, RSB, RST = Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY, Phase.RESPONSE_TRAILERS
BODY_PHASES = (RQB, RSB)
TRAILER_PHASES = (RQT, RST)
HEADER_PHASES = (RQH, RSH)
ALL_MODES = tuple(BodySendMode)
SENT_MODES = tuple(m for m in BodySendMode if m is not BodySendMode.NONE)
FD = BodySendMode.FULL_DUPLEX_STREAMED
IMMEDIATE = ImmediateReply(403, body=b"no", details="denied")


def cfg(
    req: BodySendMode = BodySendMode.NONE,
    resp: BodySendMode = BodySendMode.NONE,
    *,
    no_wait: bool = False,
) -> ProtocolConfig:
    return ProtocolConfig(req, resp, no_wait)


def msg(
    phase: Phase,
    eos: bool = False,
    *,
    config: ProtocolConfig | None = None,
    observability: bool = False,
    body: bytes = b"",
) -> Message:
    return Message(
        phase,
        body=body,
        end_of_stream=eos,
        protocol_config=config,
        observability_mode=observability,
    )


def ok_reply(state: StreamState, phase: Phase, eos: bool = False) -> Reply:
    """The plain valid reply to a message of ``phase`` in the state's body mode."""
    if phase in BODY_PHASES and state.body_mode(phase) is FD:
        return Reply(streamed_body=(b"chunk", eos))
    return Reply()


def chunks_for(mode: BodySendMode) -> int:
    """How many body messages Envoy sends for a body in this mode (0: body not sent)."""
    if mode is BodySendMode.NONE:
        return 0
    if mode in (BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL):
        return 1
    return 3  # STREAMED, FULL_DUPLEX_STREAMED, GRPC (one message per gRPC frame)


def direction(
    headers: Phase, body: Phase, trailers: Phase, mode: BodySendMode, with_trailers: bool
) -> list[tuple[Phase, bool]]:
    """The messages of one direction, as Envoy sends them, with their end_of_stream flags."""
    n = chunks_for(mode)
    out = [(headers, n == 0 and not with_trailers)]
    for i in range(n):
        out.append((body, i == n - 1 and not with_trailers))
    if with_trailers:
        out.append((trailers, True))
    return out


def sequence(
    req: BodySendMode, resp: BodySendMode, trailers: bool, early_response: bool = False
) -> list[tuple[Phase, bool]]:
    request = direction(RQH, RQB, RQT, req, trailers)
    response = direction(RSH, RSB, RST, resp, trailers)
    if early_response and len(request) > 2:
        # response headers arrive while the request body is still streaming
        return [*request[:2], response[0], *request[2:], *response[1:]]
    return request + response


def drive(state: StreamState, seq: list[tuple[Phase, bool]], config: ProtocolConfig) -> None:
    for i, (phase, eos) in enumerate(seq):
        state.receive(msg(phase, eos, config=config if i == 0 else None))
        assert state.awaiting_reply is phase
        out = state.check_reply(ok_reply(state, phase, eos))
        assert isinstance(out, Reply)
        assert state.awaiting_reply is None


MODE_MATRIX = list(itertools.product(ALL_MODES, ALL_MODES, (False, True)))


def _id(p: tuple[BodySendMode, BodySendMode, bool]) -> str:
    return f"req={p[0].name}-resp={p[1].name}-{'trailers' if p[2] else 'notrailers'}"


# ------------------------------------------------------------------ valid sequences


@pytest.mark.parametrize("modes", MODE_MATRIX, ids=[_id(m) for m in MODE_MATRIX])
def test_every_mode_sequence_is_accepted_with_one_reply_per_message(
    modes: tuple[BodySendMode, BodySendMode, bool],
) -> None:
    req, resp, trailers = modes
    config = cfg(req, resp)
    state = StreamState()
    drive(state, sequence(req, resp, trailers), config)
    assert state.request is Side.DONE
    assert state.response is Side.DONE
    assert state.protocol_config == config
    assert not state.closed
    # one reply per message: one more is spurious
    with pytest.raises(LocalProtocolError, match="spurious"):
        state.check_reply(Reply())


@pytest.mark.parametrize("modes", MODE_MATRIX, ids=[_id(m) for m in MODE_MATRIX])
def test_every_mode_sequence_in_observability_mode_never_replies(
    modes: tuple[BodySendMode, BodySendMode, bool],
) -> None:
    req, resp, trailers = modes
    state = StreamState()
    for i, (phase, eos) in enumerate(sequence(req, resp, trailers)):
        state.receive(
            msg(phase, eos, config=cfg(req, resp) if i == 0 else None, observability=True)
        )
        assert state.awaiting_reply is None
        with pytest.raises(LocalProtocolError, match="observability"):
            state.check_reply(Reply())
    assert state.observability_mode
    assert (state.request, state.response) == (Side.DONE, Side.DONE)


@pytest.mark.parametrize("req", [m for m in ALL_MODES if chunks_for(m) > 1])
@pytest.mark.parametrize("resp", ALL_MODES)
@pytest.mark.parametrize("trailers", [False, True])
def test_response_headers_may_arrive_before_request_body_ends(
    req: BodySendMode, resp: BodySendMode, trailers: bool
) -> None:
    seq = sequence(req, resp, trailers, early_response=True)
    assert seq[2][0] is RSH and seq[3][0] is RQB  # the interleaving under test
    state = StreamState()
    drive(state, seq, cfg(req, resp))
    assert (state.request, state.response) == (Side.DONE, Side.DONE)


@pytest.mark.parametrize(
    "seq",
    [
        pytest.param([(RQB, False), (RQB, True)], id="request-headers-skipped"),
        pytest.param([(RQT, True)], id="request-trailers-only"),
        pytest.param([(RQH, False), (RQT, True)], id="request-body-skipped"),
        pytest.param([(RQH, True), (RSB, False), (RSB, True)], id="response-headers-skipped"),
        pytest.param([(RQH, True), (RST, True)], id="response-trailers-only"),
        pytest.param([(RSH, True)], id="response-only"),
    ],
)
def test_phases_skipped_by_the_processing_mode_are_simply_absent(
    seq: list[tuple[Phase, bool]],
) -> None:
    drive(StreamState(), seq, cfg(BodySendMode.STREAMED, BodySendMode.STREAMED))


def test_replies_answer_messages_in_arrival_order() -> None:
    config = cfg(BodySendMode.STREAMED, no_wait=True)
    state = StreamState()
    state.receive(msg(RQH, config=config))
    state.receive(msg(RQB))  # sent without waiting for the header reply
    assert state.awaiting_reply is RQH
    state.check_reply(Reply())
    assert state.awaiting_reply is RQB
    state.check_reply(Reply(body=b"x"))
    assert state.awaiting_reply is None


# ------------------------------------------------------------------ out of order (remote)

OUT_OF_ORDER = [
    pytest.param([(RQH, False)], RQH, id="request-headers-twice"),
    pytest.param([(RQB, False)], RQH, id="request-headers-after-body"),
    pytest.param([(RQH, False), (RQB, False)], RQH, id="request-headers-after-headers-and-body"),
    pytest.param([(RQH, True)], RQB, id="request-body-after-headers-eos"),
    pytest.param([(RQH, True)], RQH, id="request-headers-after-eos"),
    pytest.param([(RQH, True)], RQT, id="request-trailers-after-eos"),
    pytest.param([(RQH, False), (RQB, True)], RQB, id="request-body-after-body-eos"),
    pytest.param([(RQH, False), (RQB, True)], RQT, id="request-trailers-after-body-eos"),
    pytest.param([(RQH, False), (RQT, True)], RQB, id="request-body-after-trailers"),
    pytest.param([(RQH, False), (RQT, True)], RQT, id="request-trailers-twice"),
    pytest.param([(RQT, True)], RQH, id="request-headers-after-trailers"),
    pytest.param([(RSH, False)], RSH, id="response-headers-twice"),
    pytest.param([(RSB, False)], RSH, id="response-headers-after-body"),
    pytest.param([(RSH, True)], RSB, id="response-body-after-headers-eos"),
    pytest.param([(RSH, False), (RSB, True)], RSB, id="response-body-after-body-eos"),
    pytest.param([(RSH, False), (RSB, True)], RST, id="response-trailers-after-body-eos"),
    pytest.param([(RSH, False), (RST, True)], RSB, id="response-body-after-trailers"),
    pytest.param([(RSH, False), (RST, True)], RST, id="response-trailers-twice"),
    pytest.param([(RQH, True), (RSH, True)], RSH, id="after-both-ends"),
    pytest.param([(RQH, True), (RSH, True)], RQB, id="request-body-after-both-ends"),
]


@pytest.mark.parametrize("mode", [BodySendMode.STREAMED, BodySendMode.BUFFERED, FD])
@pytest.mark.parametrize(("before", "bad"), OUT_OF_ORDER)
def test_out_of_order_message_is_a_remote_error(
    before: list[tuple[Phase, bool]], bad: Phase, mode: BodySendMode
) -> None:
    state = StreamState()
    drive(state, before, cfg(mode, mode))
    with pytest.raises(RemoteProtocolError):
        state.receive(msg(bad, True))
    with pytest.raises(RemoteProtocolError):
        state.receive(msg(bad, False))


@pytest.mark.parametrize("answered", [RQH, RQB, RSH])
@pytest.mark.parametrize("bad", list(Phase))
def test_nothing_is_accepted_after_an_immediate_response(answered: Phase, bad: Phase) -> None:
    config = cfg(BodySendMode.BUFFERED, BodySendMode.BUFFERED)
    state = StreamState()
    prefix = {RQH: [], RQB: [(RQH, False)], RSH: [(RQH, True)]}[answered]
    drive(state, prefix, config)
    state.receive(msg(answered, config=config if not prefix else None))
    assert state.check_reply(IMMEDIATE) is IMMEDIATE
    assert state.closed
    assert state.awaiting_reply is None
    with pytest.raises(RemoteProtocolError, match="answered"):
        state.receive(msg(bad))
    with pytest.raises(LocalProtocolError):
        state.check_reply(Reply())


def test_immediate_response_answers_every_pending_message() -> None:
    state = StreamState()
    state.receive(msg(RQH, config=cfg(BodySendMode.STREAMED, no_wait=True)))
    state.receive(msg(RQB))
    state.check_reply(IMMEDIATE)
    assert state.awaiting_reply is None
    assert state.closed


# ------------------------------------------------------------------ spurious replies (local)


def test_reply_without_a_message_is_spurious() -> None:
    state = StreamState()
    with pytest.raises(LocalProtocolError, match="spurious"):
        state.check_reply(Reply())
    with pytest.raises(LocalProtocolError, match="spurious"):
        state.check_reply(IMMEDIATE)


def test_second_reply_to_one_message_is_spurious() -> None:
    state = StreamState()
    state.receive(msg(RQH))
    state.check_reply(Reply())
    with pytest.raises(LocalProtocolError, match="spurious"):
        state.check_reply(Reply())


def _pending(phase: Phase, mode: BodySendMode) -> StreamState:
    """A state with one unanswered message of ``phase`` (body modes both set to ``mode``)."""
    config = cfg(mode, mode)
    state = StreamState()
    prefix = {
        RQH: [],
        RQB: [(RQH, False)],
        RQT: [(RQH, False)],
        RSH: [(RQH, True)],
        RSB: [(RQH, True), (RSH, False)],
        RST: [(RQH, True), (RSH, False)],
    }[phase]
    drive(state, prefix, config)
    state.receive(msg(phase, config=None if prefix else config))
    assert state.awaiting_reply is phase
    return state


SPURIOUS: list[tuple[str, Phase, BodySendMode, Reply]] = []
for _phase in (*HEADER_PHASES, *TRAILER_PHASES):
    for _name, _reply in (
        ("body", Reply(body=b"x")),
        ("empty-body", Reply(body=b"")),
        ("clear-body", Reply(clear_body=True)),
        ("streamed", Reply(streamed_body=(b"x", False))),
        ("streamed-empty", Reply(streamed_body=(b"", True))),
    ):
        for _mode in (BodySendMode.STREAMED, FD):
            SPURIOUS.append((f"{_name}-on-{_phase.value}", _phase, _mode, _reply))
for _phase in (*HEADER_PHASES, *BODY_PHASES):
    SPURIOUS.append(
        (
            f"trailers-mutation-on-{_phase.value}",
            _phase,
            BodySendMode.STREAMED,
            Reply(trailers_mutation=HeaderMutation(remove=("x-t",))),
        )
    )
for _phase in BODY_PHASES:
    for _mode in SENT_MODES:
        if _mode is FD:
            SPURIOUS += [
                (f"missing-streamed-{_phase.value}", _phase, _mode, Reply()),
                (f"plain-body-in-fd-{_phase.value}", _phase, _mode, Reply(body=b"x")),
                (f"clear-in-fd-{_phase.value}", _phase, _mode, Reply(clear_body=True)),
                (
                    f"streamed-and-body-in-fd-{_phase.value}",
                    _phase,
                    _mode,
                    Reply(streamed_body=(b"x", True), body=b"y"),
                ),
            ]
        else:
            SPURIOUS.append(
                (
                    f"streamed-in-{_mode.name}-{_phase.value}",
                    _phase,
                    _mode,
                    Reply(streamed_body=(b"x", True)),
                )
            )
for _phase in TRAILER_PHASES:
    SPURIOUS.append(
        (
            f"header-mutation-on-{_phase.value}",
            _phase,
            BodySendMode.STREAMED,
            Reply(header_mutation=HeaderMutation(remove=("x-a",))),
        )
    )
for _phase in Phase:
    for _ms in (0, -5):
        SPURIOUS.append(
            (
                f"timeout-{_ms}-{_phase.value}",
                _phase,
                BodySendMode.STREAMED,
                Reply(override_message_timeout_ms=_ms),
            )
        )


@pytest.mark.parametrize(
    ("phase", "mode", "reply"), [s[1:] for s in SPURIOUS], ids=[s[0] for s in SPURIOUS]
)
def test_spurious_reply_is_a_local_error_and_leaves_the_message_pending(
    phase: Phase, mode: BodySendMode, reply: Reply
) -> None:
    state = _pending(phase, mode)
    with pytest.raises(LocalProtocolError):
        state.check_reply(reply)
    # nothing was accounted: the message still waits for a valid reply
    assert state.awaiting_reply is phase
    state.check_reply(ok_reply(state, phase))
    assert state.awaiting_reply is None


VALID_BODY_REPLIES = [
    (mode, reply)
    for mode in SENT_MODES
    if mode is not FD
    for reply in (Reply(), Reply(body=b"new"), Reply(body=b""), Reply(clear_body=True))
] + [(FD, Reply(streamed_body=(b"x", False))), (FD, Reply(streamed_body=(b"", True)))]


@pytest.mark.parametrize("phase", BODY_PHASES)
@pytest.mark.parametrize(("mode", "reply"), VALID_BODY_REPLIES)
def test_valid_body_replies_pass_unchanged(phase: Phase, mode: BodySendMode, reply: Reply) -> None:
    state = _pending(phase, mode)
    assert state.check_reply(reply) == reply


@pytest.mark.parametrize("phase", TRAILER_PHASES)
def test_trailers_mutation_answers_trailers(phase: Phase) -> None:
    state = _pending(phase, BodySendMode.STREAMED)
    reply = Reply(trailers_mutation=HeaderMutation(remove=("x-t",)))
    assert state.check_reply(reply) == reply


@pytest.mark.parametrize("phase", list(Phase))
def test_positive_message_timeout_override_is_allowed(phase: Phase) -> None:
    state = _pending(phase, BodySendMode.STREAMED)
    reply = Reply(override_message_timeout_ms=1)
    assert state.check_reply(reply).override_message_timeout_ms == 1  # type: ignore[union-attr]


# ------------------------------------------------------------------ mode_override

OVERRIDE = ModeOverride(
    request_body_mode=BodySendMode.BUFFERED, response_header_mode=HeaderSendMode.SKIP
)


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("no_wait", [False, True])
def test_mode_override_is_kept_only_where_envoy_honours_it(
    phase: Phase, allow: bool, no_wait: bool
) -> None:
    config = cfg(BodySendMode.STREAMED, BodySendMode.STREAMED, no_wait=no_wait)
    state = StreamState(allow_mode_override=allow)
    prefix = {
        RQH: [],
        RQB: [(RQH, False)],
        RQT: [(RQH, False)],
        RSH: [(RQH, True)],
        RSB: [(RQH, True), (RSH, False)],
        RST: [(RQH, True), (RSH, False)],
    }[phase]
    drive(state, prefix, config)
    state.receive(msg(phase, config=None if prefix else config))
    reply = Reply(mode_override=OVERRIDE, header_mutation=HeaderMutation(remove=("x-a",)))
    if phase in TRAILER_PHASES:
        reply = Reply(mode_override=OVERRIDE, trailers_mutation=HeaderMutation(remove=("x-a",)))
    out = state.check_reply(reply)
    assert isinstance(out, Reply)
    honoured = phase in HEADER_PHASES and allow and not no_wait
    assert out.mode_override == (OVERRIDE if honoured else None)
    # only the override is dropped: the rest of the reply is kept
    assert out.header_mutation == reply.header_mutation
    assert out.trailers_mutation == reply.trailers_mutation


# ------------------------------------------------------------------ immediate response


def _respond_through_headers(resp: BodySendMode, eos: bool = False) -> StreamState:
    state = StreamState()
    drive(state, [(RQH, True)], cfg(BodySendMode.NONE, resp))
    state.receive(msg(RSH, eos))
    return state


@pytest.mark.parametrize("resp", ALL_MODES)
def test_immediate_response_allowed_on_response_headers(resp: BodySendMode) -> None:
    state = _respond_through_headers(resp)
    assert not state.response_started
    assert state.check_reply(IMMEDIATE) is IMMEDIATE
    assert state.closed


@pytest.mark.parametrize(
    "resp",
    [BodySendMode.NONE, BodySendMode.STREAMED, FD, BodySendMode.GRPC],
)
def test_immediate_response_refused_after_response_headers_went_downstream(
    resp: BodySendMode,
) -> None:
    state = _respond_through_headers(resp)
    state.check_reply(Reply())
    assert state.response_started
    if resp is BodySendMode.NONE:
        state.receive(msg(RST))  # the body was not sent to us; trailers are
    else:
        state.receive(msg(RSB))
    with pytest.raises(LocalProtocolError, match="started"):
        state.check_reply(IMMEDIATE)
    assert not state.closed
    assert state.awaiting_reply is not None  # still needs a proper reply
    state.check_reply(ok_reply(state, state.awaiting_reply))


@pytest.mark.parametrize("resp", [BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL])
def test_immediate_response_allowed_while_buffered_body_holds_the_headers(
    resp: BodySendMode,
) -> None:
    state = _respond_through_headers(resp)
    state.check_reply(Reply())
    assert not state.response_started
    state.receive(msg(RSB, True, body=b"whole"))
    assert state.check_reply(IMMEDIATE) is IMMEDIATE


@pytest.mark.parametrize("resp", [BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL])
def test_immediate_response_refused_after_the_buffered_body_reply(resp: BodySendMode) -> None:
    state = _respond_through_headers(resp)
    state.check_reply(Reply())
    state.receive(msg(RSB, False, body=b"whole"))
    state.check_reply(Reply(body=b"changed"))
    assert state.response_started
    state.receive(msg(RST))
    with pytest.raises(LocalProtocolError, match="started"):
        state.check_reply(IMMEDIATE)


@pytest.mark.parametrize(
    ("resp", "started"),
    [
        (BodySendMode.STREAMED, True),
        (FD, True),
        (BodySendMode.GRPC, True),
        (BodySendMode.BUFFERED, False),
        (BodySendMode.BUFFERED_PARTIAL, False),
    ],
)
def test_response_headers_skipped_body_first(resp: BodySendMode, started: bool) -> None:
    """Headers skipped by the mode went downstream already, unless a buffered body holds them."""
    state = StreamState()
    drive(state, [(RQH, True)], cfg(BodySendMode.NONE, resp))
    state.receive(msg(RSB))
    assert state.response_started is started
    if started:
        with pytest.raises(LocalProtocolError, match="started"):
            state.check_reply(IMMEDIATE)
    else:
        assert state.check_reply(IMMEDIATE) is IMMEDIATE


def test_immediate_response_to_request_body_refused_after_early_response_headers() -> None:
    state = StreamState()
    drive(
        state,
        [(RQH, False), (RQB, False), (RSH, False)],
        cfg(BodySendMode.STREAMED, BodySendMode.STREAMED),
    )
    assert state.response_started
    state.receive(msg(RQB))
    with pytest.raises(LocalProtocolError, match="started"):
        state.check_reply(IMMEDIATE)


def test_immediate_response_to_request_allowed_before_response() -> None:
    state = StreamState()
    drive(state, [(RQH, False)], cfg(BodySendMode.STREAMED, BodySendMode.STREAMED))
    state.receive(msg(RQB))
    assert state.check_reply(IMMEDIATE) is IMMEDIATE


def test_immediate_response_refused_after_headers_only_response_in_buffered_mode() -> None:
    state = StreamState()
    drive(
        state,
        [(RQH, False), (RQB, False), (RSH, True)],  # headers-only response, request still open
        cfg(BodySendMode.STREAMED, BodySendMode.BUFFERED),
    )
    assert state.response_started
