"""The protocol's own vocabulary: decoded messages from Envoy and the replies we give.

No grpc, no protobuf and no plugins here: :mod:`extproc.protocol.codec` translates to and from
the wire, :mod:`extproc.protocol.state` checks the order.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.plugin import Headers, Phase

__all__ = [
    "HEADER_PHASES",
    "AppendAction",
    "BodySendMode",
    "HeaderMutation",
    "HeaderSendMode",
    "ImmediateReply",
    "Message",
    "ModeOverride",
    "ProtocolConfig",
    "Reply",
]


class BodySendMode(enum.IntEnum):
    """Envoy's ``ProcessingMode.BodySendMode`` (same numbers as the proto enum)."""

    NONE = 0
    STREAMED = 1
    BUFFERED = 2
    BUFFERED_PARTIAL = 3
    FULL_DUPLEX_STREAMED = 4
    GRPC = 5


class HeaderSendMode(enum.IntEnum):
    DEFAULT = 0
    SEND = 1
    SKIP = 2


class AppendAction(enum.IntEnum):
    """Envoy's ``HeaderValueOption.HeaderAppendAction``."""

    APPEND_IF_EXISTS_OR_ADD = 0
    ADD_IF_ABSENT = 1
    OVERWRITE_IF_EXISTS_OR_ADD = 2
    OVERWRITE_IF_EXISTS = 3


HEADER_PHASES: Final = frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS})


# Internal hot-path types are plain slotted dataclasses: a frozen dataclass's __init__ goes
# through object.__setattr__ per field (several times slower) and these are built per message.
# Nothing mutates them after construction; HeaderMutation stays frozen (it is shared).


@dataclass(slots=True)
class ProtocolConfig:
    """What Envoy tells us about its body modes, in the first message of a stream."""

    request_body_mode: BodySendMode = BodySendMode.NONE
    response_body_mode: BodySendMode = BodySendMode.NONE
    send_body_without_waiting_for_header_response: bool = False


@dataclass(slots=True)
class Message:
    """One decoded ``ProcessingRequest``.

    ``headers`` holds the headers of a headers phase or the trailers of a trailers phase.
    ``attributes`` are the flattened Envoy attributes (``source.address`` ...), present on the
    first message of each direction at most.
    """

    phase: Phase
    headers: Headers | None = None
    body: bytes = b""
    end_of_stream: bool = False
    attributes: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] | None = None
    observability_mode: bool = False
    protocol_config: ProtocolConfig | None = None


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    """Header changes: ``set`` entries are ``(key, value, action)``, ``remove`` are keys."""

    set: tuple[tuple[str, bytes, AppendAction], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)


@dataclass(slots=True)
class ModeOverride:
    """A per-request change of the processing mode (headers responses only)."""

    request_body_mode: BodySendMode | None = None
    response_header_mode: HeaderSendMode | None = None
    response_body_mode: BodySendMode | None = None
    request_trailer_mode: HeaderSendMode | None = None
    response_trailer_mode: HeaderSendMode | None = None


NO_MUTATION: Final = HeaderMutation()


@dataclass(slots=True)
class Reply:
    """The answer of the matching type to one message (``CONTINUE`` with changes).

    ``body`` replaces the body (``b""`` with ``clear_body`` clears it); ``streamed_body`` is the
    chunk sent back in FULL_DUPLEX_STREAMED mode, with its end-of-stream flag.
    """

    header_mutation: HeaderMutation = NO_MUTATION
    body: bytes | None = None
    clear_body: bool = False
    streamed_body: tuple[bytes, bool] | None = None
    trailers_mutation: HeaderMutation | None = None
    dynamic_metadata: Mapping[str, Mapping[str, Any]] | None = None
    mode_override: ModeOverride | None = None
    clear_route_cache: bool = False
    #: milliseconds; asks Envoy for more time for this message (needs max_message_timeout)
    override_message_timeout_ms: int | None = None
    #: the serialized ProcessingResponse, when known (set by the stream's reply cache; ignored
    #: in comparisons)
    wire: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class ImmediateReply:
    """Stop processing and answer the client with this response."""

    status: int
    headers: HeaderMutation = NO_MUTATION
    body: bytes = b""
    details: str = ""
    grpc_status: int | None = None
    dynamic_metadata: Mapping[str, Mapping[str, Any]] | None = None


EMPTY_REPLY: Final = Reply()
