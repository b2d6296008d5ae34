"""One ext_proc stream (one HTTP request): protocol state + plugin chain -> replies.

Transport-free: :class:`StreamProcessor.handle` takes a decoded message and returns the reply
to send (or ``None`` in observability mode). ``server.py`` only moves bytes.
"""

from __future__ import annotations

import logging
from typing import Final

from extproc.chain import Chain, Outcome, Slot
from extproc.context import RequestContext
from extproc.observability.metrics import BoundCounter, Registry
from extproc.plugin import (
    _EMPTY,
    BodyMode,
    Event,
    Headers,
    HttpRequest,
    Phase,
    Reject,
    RequestBody,
    RequestHeaders,
    RequestTrailers,
    ResponseBody,
    ResponseHeaders,
    ResponseTrailers,
)
from extproc.protocol.codec import encode_bytes
from extproc.protocol.events import (
    EMPTY_REPLY,
    BodySendMode,
    ImmediateReply,
    Message,
    Reply,
)
from extproc.protocol.mutations import (
    DROP_CODES,
    body_reply,
    drop_code,
    header_mutation,
    immediate_reply,
)
from extproc.protocol.state import Side, StreamState

__all__ = ["REPLY_CACHE", "ReplyCache", "StreamMetrics", "StreamProcessor"]

log = logging.getLogger("extproc.stream")

_EMPTY_REPLY: Final = EMPTY_REPLY
_WHOLE_BODY_MODES: Final = frozenset(
    {BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL, BodySendMode.GRPC}
)
_CACHED_PHASES: Final = frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS})
_NO_REQUEST: Final = HttpRequest()  # immutable: one for every stream
# the phases that may still arrive on a side, by where the side is
_REQUEST_LEFT: Final = {
    Side.START: frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY, Phase.REQUEST_TRAILERS}),
    Side.BODY: frozenset({Phase.REQUEST_BODY, Phase.REQUEST_TRAILERS}),
    Side.DONE: frozenset(),
}
_RESPONSE_LEFT: Final = {
    Side.START: frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY, Phase.RESPONSE_TRAILERS}),
    Side.BODY: frozenset({Phase.RESPONSE_BODY, Phase.RESPONSE_TRAILERS}),
    Side.DONE: frozenset(),
}

ReplyKey = tuple[Phase, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]]


class ReplyCache:
    """Header-only replies by content, serialized once: most requests of a route get the same
    few mutations (a fixed header, ``x-user`` of the same users), and building and serializing
    the protobuf costs more than hashing the mutations. Replies are pure functions of the
    mutations, so the cache is shared by every stream and generation; a reply whose build
    dropped a header is never cached (each occurrence is reported). Bounded: when full, it
    starts over."""

    __slots__ = ("_replies", "max_entries")

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._replies: dict[ReplyKey, Reply] = {}

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: ReplyKey) -> Reply | None:
        return self._replies.get(key)

    def put(self, key: ReplyKey, reply: Reply) -> None:
        if len(self._replies) >= self.max_entries:
            self._replies.clear()
        reply.wire = encode_bytes(key[0], reply)
        self._replies[key] = reply


REPLY_CACHE: Final = ReplyCache()

_TOO_LARGE: Final = Reject(
    413, "payload_too_large", "The request body is too large.", details="extproc_body_too_large"
)


class StreamMetrics:
    """Core counters, bound once per process."""

    def __init__(self, registry: Registry) -> None:
        messages = registry.counter(
            "extproc_messages_total", "ext_proc messages received", ("phase",)
        )
        self.messages = {p: messages.labels(p.value) for p in Phase}
        dropped = registry.counter(
            "extproc_mutations_dropped_total", "header mutations refused before sending",
            ("reason",),
        )  # fmt: skip
        # every code exists from the start (at 0), so dashboards and alerts see the series
        self.dropped = {c: dropped.labels(c) for c in {*DROP_CODES.values(), "other"}}
        self.immediate: BoundCounter = registry.counter(
            "extproc_immediate_responses_total", "requests answered by a plugin"
        ).labels()


def _status(headers: Headers) -> int:
    try:
        return int(headers.get(":status", "0"))
    except ValueError:
        return 0


class StreamProcessor:
    """The per-stream state: protocol state machine, request context and body buffers."""

    __slots__ = (
        "_buffers",
        "chain",
        "context",
        "dropped",
        "max_body_bytes",
        "metrics",
        "request",
        "state",
        "status",
    )

    def __init__(
        self,
        chain: Chain,
        metrics: StreamMetrics,
        *,
        allow_mode_override: bool = False,
        max_body_bytes: int = 1024 * 1024,
    ) -> None:
        self.chain = chain
        self.metrics = metrics
        self.state = StreamState(allow_mode_override=allow_mode_override)
        self.context = RequestContext()
        self.request = _NO_REQUEST  # until the request headers arrive
        self.status = 0
        self.dropped = 0  # header mutations dropped on this stream
        self.max_body_bytes = max_body_bytes
        self._buffers: dict[Phase, bytearray] = {}

    @property
    def closed(self) -> bool:
        return self.state.closed

    @property
    def finished(self) -> bool:
        """Nothing more to do on this stream: it was answered with an immediate response, or
        every reply owed was given and no phase a plugin runs in can still arrive. The server
        then ends the RPC (status OK) without waiting for Envoy to close it: the protocol's
        way to say no more messages are needed. Envoy goes on with the rest of the HTTP
        exchange without the processor, which is what it would have been told anyway
        (CONTINUE, no mutation) for every message it still had to send; one wake-up of the
        server per stream fewer, and the HTTP/2 stream to the sidecar freed at once."""
        state = self.state
        if state.closed:
            return True
        if state.awaiting_reply is not None or self._buffers:
            return False
        wanted = self.chain.wanted
        return wanted.isdisjoint(_REQUEST_LEFT[state.request]) and wanted.isdisjoint(
            _RESPONSE_LEFT[state.response]
        )

    async def handle(
        self, msg: Message, started: float | None = None
    ) -> Reply | ImmediateReply | None:
        """Process one message; the reply to send, or ``None`` when none may be sent.

        Raises :class:`~extproc.protocol.state.RemoteProtocolError` for a message out of order
        and :class:`~extproc.protocol.state.LocalProtocolError` when no valid reply exists.
        """
        self.state.receive(msg)
        self.metrics.messages[msg.phase].inc()
        phase = msg.phase
        if phase in (Phase.REQUEST_BODY, Phase.RESPONSE_BODY):
            outcome = await self._body(msg, started)
        else:
            event = self._event(msg)
            # trailers may end a streamed body that buffering plugins are still gathering
            outcome = await self._flush_buffered(phase, started) if self._buffers else None
            if self.chain.wants(phase) and (outcome is None or outcome.respond is None):
                ran = await self.chain.run(event, started=started)
                outcome = ran if outcome is None else _join(ran, outcome)
        if self.state.observability_mode:
            return None
        reply = self._reply(msg, outcome)
        return self.state.check_reply(reply)

    # ------------------------------------------------------------ events

    def _event(self, msg: Message) -> Event:
        phase = msg.phase
        headers = msg.headers or Headers()
        if phase is Phase.REQUEST_HEADERS:
            get = headers._first.get  # one dict, five lookups: no method call per header
            # positional, in HttpRequest's field order (keywords cost a frozen dataclass more)
            self.request = HttpRequest(
                get(":method", ""),
                get(":path", ""),
                get(":authority", ""),
                get(":scheme", ""),
                get("x-request-id", ""),
                headers,
                msg.attributes or _EMPTY,
                msg.metadata or _EMPTY,
            )
            return RequestHeaders(self.request, self.context, msg.end_of_stream)
        if phase is Phase.RESPONSE_HEADERS:
            self.status = _status(headers)
            return ResponseHeaders(
                self.request, self.context, self.status, headers, msg.end_of_stream
            )
        if phase is Phase.REQUEST_TRAILERS:
            return RequestTrailers(self.request, self.context, headers)
        return ResponseTrailers(self.request, self.context, headers)

    def _body_event(self, phase: Phase, body: bytes, eos: bool) -> Event:
        if phase is Phase.REQUEST_BODY:
            return RequestBody(self.request, self.context, body, eos)
        return ResponseBody(self.request, self.context, body, eos)

    async def _body(self, msg: Message, started: float | None) -> Outcome | None:
        phase = msg.phase
        slots = self.chain.by_phase[phase]
        if not slots:
            return None
        mode = self.state.body_mode(phase)
        if mode in _WHOLE_BODY_MODES:
            # Envoy already gathered the body: every plugin gets it as one event
            if len(msg.body) > self.max_body_bytes:
                return _reject_outcome(_TOO_LARGE)
            return await self.chain.run(
                self._body_event(phase, msg.body, msg.end_of_stream), started=started
            )
        # STREAMED / FULL_DUPLEX_STREAMED: chunks to streaming plugins, the gathered body to
        # buffering plugins at the end of the stream
        streaming = tuple(s for s in slots if _body_mode(s, phase) is BodyMode.STREAMED)
        buffering = tuple(s for s in slots if _body_mode(s, phase) is BodyMode.BUFFERED)
        outcome: Outcome | None = None
        if streaming:
            outcome = await self.chain.run(
                self._body_event(phase, msg.body, msg.end_of_stream), streaming, started
            )
            if outcome.respond is not None:
                return outcome
        if buffering:
            buf = self._buffers.setdefault(phase, bytearray())
            buf += msg.body
            if len(buf) > self.max_body_bytes:
                self._buffers.pop(phase, None)
                return _reject_outcome(_TOO_LARGE)
            if msg.end_of_stream:
                whole = bytes(self._buffers.pop(phase))
                later = await self.chain.run(
                    self._body_event(phase, whole, True), buffering, started
                )
                return _join(outcome, later)
        return outcome

    async def _flush_buffered(self, phase: Phase, started: float | None) -> Outcome | None:
        """Trailers end a body whose chunks never said end_of_stream: give the gathered body
        to the buffering plugins now."""
        if phase is Phase.REQUEST_TRAILERS:
            body_phase = Phase.REQUEST_BODY
        elif phase is Phase.RESPONSE_TRAILERS:
            body_phase = Phase.RESPONSE_BODY
        else:
            return None
        buf = self._buffers.pop(body_phase, None)
        if buf is None:
            return None
        buffering = tuple(
            s
            for s in self.chain.by_phase[body_phase]
            if _body_mode(s, body_phase) is BodyMode.BUFFERED
        )
        later = await self.chain.run(
            self._body_event(body_phase, bytes(buf), True), buffering, started
        )
        return _join(None, later)

    # ------------------------------------------------------------ replies

    def _reply(self, msg: Message, outcome: Outcome | None) -> Reply | ImmediateReply:
        phase = msg.phase
        mode = self.state.body_mode(phase)
        is_body = phase in (Phase.REQUEST_BODY, Phase.RESPONSE_BODY)
        if outcome is None or outcome.is_noop:
            if is_body and mode is BodySendMode.FULL_DUPLEX_STREAMED:
                return body_reply(phase, mode, msg.body, msg.end_of_stream)
            return _EMPTY_REPLY
        if outcome.respond is not None:
            self.metrics.immediate.inc()
            reply = immediate_reply(outcome.respond, self._drop)
            if self.state.response_started:
                log.error(
                    "a plugin answered after the response started; the stream is reset",
                    extra={"plugin": outcome.responder, "phase": phase.value},
                )
            return reply
        metadata = outcome.metadata or None
        key: ReplyKey | None = None
        if phase in _CACHED_PHASES and metadata is None and outcome.body is None:
            key = (
                phase,
                tuple(outcome.set_headers.items()),
                tuple(outcome.append_headers),
                tuple(outcome.remove_headers),
            )
            cached = REPLY_CACHE.get(key)
            if cached is not None:
                return cached
        drops = self.dropped
        mutation = header_mutation(
            is_request=phase.is_request,
            set_headers=outcome.set_headers,
            append_headers=outcome.append_headers,
            remove_headers=outcome.remove_headers,
            report=self._drop,
        )
        if key is not None:
            built = Reply(header_mutation=mutation)
            if self.dropped == drops:
                REPLY_CACHE.put(key, built)
            return built
        if phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS):
            return Reply(trailers_mutation=mutation, dynamic_metadata=metadata)
        if is_body:
            new_body = outcome.body
            if new_body is None and mode is BodySendMode.FULL_DUPLEX_STREAMED:
                new_body = msg.body
            base = body_reply(phase, mode, new_body, msg.end_of_stream, mutation)
            if metadata:
                return Reply(
                    header_mutation=base.header_mutation,
                    body=base.body,
                    clear_body=base.clear_body,
                    streamed_body=base.streamed_body,
                    dynamic_metadata=metadata,
                )
            return base
        return Reply(header_mutation=mutation, dynamic_metadata=metadata)

    def _drop(self, key: str, reason: str) -> None:
        self.dropped += 1
        self.metrics.dropped[drop_code(reason)].inc()
        log.warning("header mutation dropped", extra={"header": key, "reason": reason})


def _body_mode(slot: Slot, phase: Phase) -> BodyMode:
    return slot.request_body if phase is Phase.REQUEST_BODY else slot.response_body


def _join(streamed: Outcome | None, buffered: Outcome) -> Outcome:
    """Combine what streaming plugins said about the last chunk with what buffering plugins
    said about the whole body. The earlier chunks have gone upstream already, so a buffering
    plugin under a streamed mode can answer (respond) or add metadata, never replace the body
    or change headers that were sent."""
    if buffered.respond is not None:
        return buffered
    if streamed is None:
        return Outcome(metadata=buffered.metadata)
    streamed.metadata.update(buffered.metadata)
    return streamed


def _reject_outcome(reject: Reject) -> Outcome:
    return Outcome(respond=reject.to_respond(), responder="extproc")
