"""Pure builders for replies, with the pre-flight checks that keep Envoy from answering 500.

Envoy ignores (or, under strict ``mutation_rules``, fails the request on) changes to ``host``,
``:authority``, ``:method``, ``:scheme`` and ``x-envoy-*``, and refuses header names and values
that are not valid HTTP. Such changes are dropped here and reported through ``on_drop`` -
never sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Final

from extproc.plugin import Phase, Respond
from extproc.protocol.events import (
    AppendAction,
    BodySendMode,
    HeaderMutation,
    ImmediateReply,
    Reply,
)

__all__ = [
    "DROP_CODES",
    "DropReporter",
    "body_reply",
    "check_header_key",
    "drop_code",
    "header_mutation",
    "immediate_reply",
]

#: called with (header key, reason) for every change that is dropped
DropReporter = Callable[[str, str], None]

#: the reasons a change is dropped, and the short code metrics count them by
DROP_CODES: Final = {
    "Envoy does not allow mutating this header": "forbidden_header",
    "x-envoy-* headers are reserved to Envoy": "envoy_header",
    "pseudo-headers cannot be removed": "pseudo_header",
    "this pseudo-header cannot be set in this direction": "pseudo_header",
    "an immediate response takes its status from Respond.status": "pseudo_header",
    "not a valid lower-case header name": "invalid_name",
    "header value contains CR, LF or NUL": "invalid_value",
    "header value is not valid UTF-8": "invalid_value",
}


def drop_code(reason: str) -> str:
    return DROP_CODES.get(reason, "other")


_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE: Final = re.compile(r"[\r\n\x00]")
_FORBIDDEN: Final = frozenset({"host", ":authority", ":method", ":scheme", ":protocol"})
# pseudo-headers a mutation may set, by direction
_SETTABLE_PSEUDO: Final = {True: frozenset({":path"}), False: frozenset({":status"})}


@lru_cache(maxsize=4096)
def check_header_key(key: str, is_request: bool, removing: bool = False) -> str | None:
    """Why a mutation of ``key`` must not be sent, or ``None`` when it may."""
    if key in _FORBIDDEN:
        return "Envoy does not allow mutating this header"
    if key.startswith("x-envoy-"):
        return "x-envoy-* headers are reserved to Envoy"
    if key.startswith(":"):
        if removing:
            return "pseudo-headers cannot be removed"
        if key not in _SETTABLE_PSEUDO[is_request]:
            return "this pseudo-header cannot be set in this direction"
        return None
    if not _TOKEN.fullmatch(key):
        return "not a valid lower-case header name"
    return None


def _value(key: str, value: str, report: DropReporter | None) -> bytes | None:
    if _BAD_VALUE.search(value):
        if report:
            report(key, "header value contains CR, LF or NUL")
        return None
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        if report:
            report(key, "header value is not valid UTF-8")
        return None


def header_mutation(
    *,
    is_request: bool,
    set_headers: Mapping[str, str] | None = None,
    append_headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    remove_headers: Iterable[str] = (),
    report: DropReporter | None = None,
) -> HeaderMutation:
    """Build a checked :class:`HeaderMutation`. Keys are lower-cased; ``set`` overwrites,
    ``append`` adds another value (pairs may repeat a key). Rejected entries are dropped and
    reported."""
    sets: list[tuple[str, bytes, AppendAction]] = []
    for pairs, action in (
        (set_headers.items() if set_headers else (), AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
        (
            append_headers.items() if isinstance(append_headers, Mapping) else append_headers or (),
            AppendAction.APPEND_IF_EXISTS_OR_ADD,
        ),
    ):
        for raw_key, value in pairs:
            key = raw_key.lower()
            why = check_header_key(key, is_request)
            if why is not None:
                if report:
                    report(key, why)
                continue
            data = _value(key, value, report)
            if data is not None:
                sets.append((key, data, action))
    removes: list[str] = []
    for raw_key in remove_headers:
        key = raw_key.lower()
        why = check_header_key(key, is_request, True)
        if why is not None:
            if report:
                report(key, why)
            continue
        removes.append(key)
    return HeaderMutation(tuple(sets), tuple(removes))


def body_reply(
    phase: Phase,
    mode: BodySendMode,
    new_body: bytes | None,
    end_of_stream: bool,
    headers: HeaderMutation | None = None,
) -> Reply:
    """The reply to a body message, replacing the chunk with ``new_body`` when given.

    In BUFFERED mode Envoy still holds the headers and keeps their ``content-length``: a
    changed body gets a matching one. In FULL_DUPLEX_STREAMED the (possibly unchanged) chunk
    must be streamed back, or the upstream would get an empty body.
    """
    headers = headers or HeaderMutation()
    if mode is BodySendMode.FULL_DUPLEX_STREAMED:
        return Reply(header_mutation=headers, streamed_body=(new_body or b"", end_of_stream))
    if new_body is None:
        return Reply(header_mutation=headers)
    if mode is BodySendMode.BUFFERED:
        length = (
            "content-length",
            str(len(new_body)).encode(),
            AppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        kept = tuple(s for s in headers.set if s[0] != "content-length")
        headers = HeaderMutation((*kept, length), headers.remove)
    if not new_body:
        return Reply(header_mutation=headers, clear_body=True)
    return Reply(header_mutation=headers, body=new_body)


def immediate_reply(respond: Respond, report: DropReporter | None = None) -> ImmediateReply:
    """An immediate response from a plugin's :class:`~extproc.plugin.Respond`."""
    plain = {k: v for k, v in respond.headers.items() if not k.startswith(":")}
    if report and len(plain) != len(respond.headers):
        for key in respond.headers.keys() - plain.keys():
            report(key, "an immediate response takes its status from Respond.status")
    headers = header_mutation(is_request=False, set_headers=plain, report=report)
    return ImmediateReply(
        status=respond.status,
        headers=headers,
        body=respond.body,
        details=_details(respond.details),
    )


_DETAILS_OK: Final = re.compile(r"[^A-Za-z0-9_.:\-]")


def _details(details: str) -> str:
    """Envoy's response code details must not contain spaces; keep it a short token."""
    return _DETAILS_OK.sub("_", details)[:64]
