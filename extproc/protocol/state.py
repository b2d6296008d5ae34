"""The per-stream state machine: which message may come next, and which reply may answer it.

Sans-IO (h11's model): feed it decoded messages with :meth:`StreamState.receive`, ask it to
vet a reply with :meth:`StreamState.check_reply`. Errors name the guilty side:
:class:`RemoteProtocolError` (Envoy sent something out of order) and
:class:`LocalProtocolError` (we were about to send something Envoy would treat as spurious).

The rules (Envoy 1.40's ext_proc protocol):

* each direction goes headers -> body chunks -> trailers, and a direction that has seen its
  end of stream takes nothing more; phases skipped by the processing mode are simply absent;
* response headers may arrive before the request body has finished;
* outside FULL_DUPLEX_STREAMED there is exactly one reply per message, in arrival order, of the
  matching type or an immediate response; in observability mode there are no replies at all;
* ``mode_override`` is honoured only on headers replies, only with ``allow_mode_override``,
  and not when Envoy sends the body without waiting for the header reply;
* an immediate response is possible only until the response has started towards the client;
* in FULL_DUPLEX_STREAMED the body must be streamed back (``streamed_response``).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import replace
from typing import Final

from extproc.plugin import Phase
from extproc.protocol.events import (
    HEADER_PHASES,
    BodySendMode,
    ImmediateReply,
    Message,
    ProtocolConfig,
    Reply,
)

__all__ = [
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Side",
    "StreamState",
]


class ProtocolError(Exception):
    """Base of the two protocol errors."""


class RemoteProtocolError(ProtocolError):
    """Envoy sent a message the protocol does not allow here."""


class LocalProtocolError(ProtocolError):
    """We were about to send a reply the protocol does not allow here."""


class Side(enum.Enum):
    """Where one direction (request or response) of the HTTP exchange is."""

    __hash__ = object.__hash__  # singletons; C-speed hashing for the transition table

    START = "start"  # nothing seen yet
    BODY = "body"  # headers seen, body chunks or trailers may follow
    DONE = "done"  # end of stream seen


# (side state, phase) -> (state after a message without end_of_stream, state after one with it).
# Body and trailers are accepted at START because the processing mode may skip headers.
_TRANSITIONS: Final[dict[tuple[Side, Phase], tuple[Side, Side]]] = {
    (Side.START, Phase.REQUEST_HEADERS): (Side.BODY, Side.DONE),
    (Side.START, Phase.REQUEST_BODY): (Side.BODY, Side.DONE),
    (Side.START, Phase.REQUEST_TRAILERS): (Side.DONE, Side.DONE),
    (Side.BODY, Phase.REQUEST_BODY): (Side.BODY, Side.DONE),
    (Side.BODY, Phase.REQUEST_TRAILERS): (Side.DONE, Side.DONE),
    (Side.START, Phase.RESPONSE_HEADERS): (Side.BODY, Side.DONE),
    (Side.START, Phase.RESPONSE_BODY): (Side.BODY, Side.DONE),
    (Side.START, Phase.RESPONSE_TRAILERS): (Side.DONE, Side.DONE),
    (Side.BODY, Phase.RESPONSE_BODY): (Side.BODY, Side.DONE),
    (Side.BODY, Phase.RESPONSE_TRAILERS): (Side.DONE, Side.DONE),
}

_HELD_RESPONSE_MODES: Final = frozenset({BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL})
_DEFAULT_CONFIG: Final = ProtocolConfig()


class StreamState:
    """The protocol state of one ext_proc stream (one HTTP request)."""

    __slots__ = (
        "_pending",
        "allow_mode_override",
        "closed",
        "observability_mode",
        "protocol_config",
        "request",
        "response",
        "response_started",
    )

    def __init__(self, *, allow_mode_override: bool = False) -> None:
        self.allow_mode_override = allow_mode_override
        self.request = Side.START
        self.response = Side.START
        self.protocol_config: ProtocolConfig = _DEFAULT_CONFIG
        self.observability_mode = False
        self.response_started = False
        self.closed = False
        self._pending: deque[Phase] = deque()

    # ------------------------------------------------------------ incoming

    def receive(self, msg: Message) -> None:
        """Account for one message from Envoy, or raise :class:`RemoteProtocolError`."""
        if self.closed:
            raise RemoteProtocolError(f"{msg.phase.value} after the stream was answered")
        is_request = msg.phase.is_request
        side = self.request if is_request else self.response
        step = _TRANSITIONS.get((side, msg.phase))
        if step is None:
            raise RemoteProtocolError(
                f"{msg.phase.value} not allowed when that side is {side.value}"
            )
        end = msg.end_of_stream or msg.phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS)
        new = step[1] if end else step[0]
        if msg.protocol_config is not None:
            self.protocol_config = msg.protocol_config
        if msg.observability_mode:
            self.observability_mode = True
        if is_request:
            self.request = new
        else:
            self.response = new
            if side is Side.START and msg.phase is not Phase.RESPONSE_HEADERS:
                # response headers were skipped by the processing mode: they went downstream
                # already unless Envoy holds them for a buffered body
                self.response_started = self.response_started or not self._held()
            elif msg.phase is Phase.RESPONSE_TRAILERS:
                self.response_started = True  # headers and body have gone downstream
        if not self.observability_mode:
            self._pending.append(msg.phase)

    def _held(self) -> bool:
        return self.protocol_config.response_body_mode in _HELD_RESPONSE_MODES

    @property
    def awaiting_reply(self) -> Phase | None:
        """The phase the next reply must answer, if any."""
        return self._pending[0] if self._pending else None

    # ------------------------------------------------------------ outgoing

    def check_reply(self, reply: Reply | ImmediateReply) -> Reply | ImmediateReply:
        """Vet the reply to the oldest unanswered message and account for it.

        Returns the reply as it may be sent (a ``mode_override`` Envoy would not honour is
        dropped); raises :class:`LocalProtocolError` when it cannot be sent at all.
        """
        if self.observability_mode:
            raise LocalProtocolError("no replies are sent in observability mode")
        if not self._pending:
            raise LocalProtocolError("reply without a message to answer (spurious)")
        phase = self._pending[0]
        if isinstance(reply, ImmediateReply):
            if self.response_started:
                raise LocalProtocolError(
                    "immediate response after the response started towards the client"
                )
            self._pending.clear()
            self.closed = True
            return reply
        reply = self._vet(phase, reply)
        self._pending.popleft()
        if phase is Phase.RESPONSE_HEADERS and (not self._held() or self.response is Side.DONE):
            self.response_started = True  # Envoy now sends the headers downstream
        elif phase is Phase.RESPONSE_BODY:
            self.response_started = True  # held headers go out with the (first) body
        return reply

    def _vet(self, phase: Phase, reply: Reply) -> Reply:
        if reply.mode_override is not None and (
            phase not in HEADER_PHASES
            or not self.allow_mode_override
            or self.protocol_config.send_body_without_waiting_for_header_response
        ):
            reply = replace(reply, mode_override=None)
        if reply.override_message_timeout_ms is not None and reply.override_message_timeout_ms <= 0:
            raise LocalProtocolError("override_message_timeout must be positive")
        is_body = phase in (Phase.REQUEST_BODY, Phase.RESPONSE_BODY)
        if reply.body is not None and reply.clear_body:
            raise LocalProtocolError("a reply either replaces or clears the body, not both")
        if (reply.body is not None or reply.clear_body or reply.streamed_body) and not is_body:
            raise LocalProtocolError(f"a body mutation cannot answer {phase.value}")
        if is_body and self._duplex(phase):
            if reply.streamed_body is None:
                raise LocalProtocolError(
                    "FULL_DUPLEX_STREAMED needs the body streamed back (streamed_response)"
                )
            if reply.body is not None or reply.clear_body:
                raise LocalProtocolError("FULL_DUPLEX_STREAMED takes streamed_response only")
        elif reply.streamed_body is not None:
            raise LocalProtocolError("streamed_response is only for FULL_DUPLEX_STREAMED")
        is_trailers = phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS)
        if reply.trailers_mutation is not None and not is_trailers:
            raise LocalProtocolError(f"a trailers mutation cannot answer {phase.value}")
        if is_trailers and reply.header_mutation:
            raise LocalProtocolError("a trailers reply mutates trailers, not headers")
        return reply

    def _duplex(self, phase: Phase) -> bool:
        cfg = self.protocol_config
        mode = cfg.request_body_mode if phase is Phase.REQUEST_BODY else cfg.response_body_mode
        return mode is BodySendMode.FULL_DUPLEX_STREAMED

    def body_mode(self, phase: Phase) -> BodySendMode:
        cfg = self.protocol_config
        return cfg.request_body_mode if phase.is_request else cfg.response_body_mode
