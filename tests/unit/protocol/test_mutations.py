"""Pure reply builders and their pre-flight checks (``extproc.protocol.mutations``)."""

from __future__ import annotations

import pytest

from extproc.plugin import Phase, Reject, Respond
from extproc.protocol.events import AppendAction, BodySendMode, HeaderMutation, Reply
from extproc.protocol.mutations import (
    body_reply,
    check_header_key,
    header_mutation,
    immediate_reply,
)

OVERWRITE = AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = AppendAction.APPEND_IF_EXISTS_OR_ADD
FORBIDDEN = ["host", ":authority", ":method", ":scheme", "x-envoy-original-path", "x-envoy-"]
FD = BodySendMode.FULL_DUPLEX_STREAMED


class Drops:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, key: str, reason: str) -> None:
        self.seen.append((key, reason))

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.seen]


def keys_of(m: HeaderMutation) -> set[str]:
    return {k for k, _, _ in m.set} | set(m.remove)


# ------------------------------------------------------------------ forbidden headers


@pytest.mark.parametrize("is_request", [True, False])
@pytest.mark.parametrize("key", FORBIDDEN)
@pytest.mark.parametrize("how", ["set", "append", "remove"])
def test_forbidden_headers_are_dropped_and_reported(is_request: bool, key: str, how: str) -> None:
    drops = Drops()
    args: dict[str, object] = {
        "set": {"set_headers": {key: "v", "x-ok": "1"}},
        "append": {"append_headers": [(key, "v"), ("x-ok", "1")]},
        "remove": {"remove_headers": [key, "x-ok"]},
    }[how]
    m = header_mutation(is_request=is_request, report=drops, **args)  # type: ignore[arg-type]
    assert key not in keys_of(m)
    assert keys_of(m) == {"x-ok"}
    assert drops.keys == [key]
    assert drops.seen[0][1]  # a reason is given
    assert check_header_key(key, is_request) is not None


@pytest.mark.parametrize("key", ["Host", "X-Envoy-Foo", ":Authority", "HOST"])
def test_forbidden_headers_are_matched_after_lower_casing(key: str) -> None:
    drops = Drops()
    m = header_mutation(is_request=True, set_headers={key: "v"}, report=drops)
    assert not m
    assert drops.keys == [key.lower()]


def test_dropped_without_a_reporter_is_silent() -> None:
    m = header_mutation(is_request=True, set_headers={"host": "evil", "x-a": "1"})
    assert m.set == (("x-a", b"1", OVERWRITE),)


def test_x_envoy_lookalikes_are_allowed() -> None:
    m = header_mutation(is_request=True, set_headers={"x-envoyish": "1", "envoy-x": "2"})
    assert keys_of(m) == {"x-envoyish", "envoy-x"}


# ------------------------------------------------------------------ invalid names and values


@pytest.mark.parametrize(
    "key",
    ["", "x a", " x-a", "x-a ", "x\ta", "x\r\na", "x\x00a", "x:a", "x(a)", "x/a", "x@a", "é"],
)
def test_invalid_header_names_are_dropped(key: str) -> None:
    drops = Drops()
    m = header_mutation(
        is_request=True,
        set_headers={key: "v"},
        append_headers=[(key, "v")],
        remove_headers=[key],
        report=drops,
    )
    assert not m
    assert drops.keys == [key.lower()] * 3


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\x00b", "\r\n", "ok\r\nx-injected: 1", "\x00"])
def test_values_with_cr_lf_nul_are_dropped(value: str) -> None:
    drops = Drops()
    m = header_mutation(
        is_request=True,
        set_headers={"x-a": value, "x-ok": "fine"},
        append_headers=[("x-b", value)],
        report=drops,
    )
    assert m.set == (("x-ok", b"fine", OVERWRITE),)
    assert drops.keys == ["x-a", "x-b"]
    assert all("CR" in reason for _, reason in drops.seen)


def test_upper_case_names_are_normalised() -> None:
    drops = Drops()
    m = header_mutation(
        is_request=True,
        set_headers={"X-Request-ID": "1"},
        append_headers=[("X-Multi", "a"), ("x-multi", "b")],
        remove_headers=["X-Remove-Me"],
        report=drops,
    )
    assert m.set == (
        ("x-request-id", b"1", OVERWRITE),
        ("x-multi", b"a", APPEND),
        ("x-multi", b"b", APPEND),
    )
    assert m.remove == ("x-remove-me",)
    assert drops.seen == []


def test_valid_token_characters_are_kept() -> None:
    key = "x-!#$%&'*+.^_`|~09az"
    assert check_header_key(key, True) is None
    m = header_mutation(is_request=True, set_headers={key: "v"})
    assert m.set == ((key, b"v", OVERWRITE),)


def test_values_are_encoded_to_bytes_and_surrogates_round_trip() -> None:
    raw = b"caf\xe9\xff"
    value = raw.decode("utf-8", "surrogateescape")
    m = header_mutation(
        is_request=True, set_headers={"x-bin": value, "x-utf8": "café", "x-empty": "", "x-t": "\t"}
    )
    assert dict((k, v) for k, v, _ in m.set) == {
        "x-bin": raw,
        "x-utf8": "café".encode(),
        "x-empty": b"",
        "x-t": b"\t",
    }


def test_unencodable_value_is_dropped_not_raised() -> None:
    drops = Drops()
    m = header_mutation(
        is_request=True, set_headers={"x-bad": "a\ud800b", "x-ok": "1"}, report=drops
    )
    assert m.set == (("x-ok", b"1", OVERWRITE),)
    assert drops.keys == ["x-bad"]


# ------------------------------------------------------------------ pseudo-headers


@pytest.mark.parametrize(
    ("key", "is_request", "allowed"),
    [
        (":path", True, True),
        (":path", False, False),
        (":status", False, True),
        (":status", True, False),
        (":protocol", True, False),
        (":unknown", True, False),
        (":unknown", False, False),
    ],
)
def test_pseudo_headers_settable_by_direction(key: str, is_request: bool, allowed: bool) -> None:
    drops = Drops()
    m = header_mutation(is_request=is_request, set_headers={key: "/x"}, report=drops)
    assert (m.set == ((key, b"/x", OVERWRITE),)) is allowed
    assert (drops.keys == []) is allowed
    assert (check_header_key(key, is_request) is None) is allowed


@pytest.mark.parametrize("is_request", [True, False])
@pytest.mark.parametrize("key", [":path", ":status", ":authority", ":method", ":scheme"])
def test_pseudo_headers_cannot_be_removed(is_request: bool, key: str) -> None:
    drops = Drops()
    m = header_mutation(is_request=is_request, remove_headers=[key], report=drops)
    assert m.remove == ()
    assert drops.keys == [key]
    assert check_header_key(key, is_request, True) is not None


def test_set_append_remove_together_keep_their_actions() -> None:
    m = header_mutation(
        is_request=True,
        set_headers={"x-s": "1"},
        append_headers={"x-a": "2"},
        remove_headers=("x-r",),
    )
    assert m.set == (("x-s", b"1", OVERWRITE), ("x-a", b"2", APPEND))
    assert m.remove == ("x-r",)
    assert bool(m)
    assert not header_mutation(is_request=True)


# ------------------------------------------------------------------ body_reply


@pytest.mark.parametrize("phase", [Phase.REQUEST_BODY, Phase.RESPONSE_BODY])
def test_buffered_replacement_gets_a_matching_content_length(phase: Phase) -> None:
    reply = body_reply(phase, BodySendMode.BUFFERED, b"hello world", True)
    assert reply.body == b"hello world"
    assert not reply.clear_body
    assert reply.streamed_body is None
    assert reply.header_mutation.set == (("content-length", b"11", OVERWRITE),)


def test_buffered_replacement_overrides_a_plugin_content_length_and_keeps_others() -> None:
    headers = HeaderMutation(
        set=(("content-length", b"999", OVERWRITE), ("x-a", b"1", OVERWRITE)),
        remove=("x-r",),
    )
    reply = body_reply(Phase.REQUEST_BODY, BodySendMode.BUFFERED, b"abc", True, headers)
    assert reply.header_mutation.set == (
        ("x-a", b"1", OVERWRITE),
        ("content-length", b"3", OVERWRITE),
    )
    assert reply.header_mutation.remove == ("x-r",)


def test_buffered_empty_replacement_clears_with_zero_length() -> None:
    reply = body_reply(Phase.REQUEST_BODY, BodySendMode.BUFFERED, b"", True)
    assert reply.clear_body
    assert reply.body is None
    assert reply.header_mutation.set == (("content-length", b"0", OVERWRITE),)


@pytest.mark.parametrize(
    "mode", [BodySendMode.STREAMED, BodySendMode.BUFFERED_PARTIAL, BodySendMode.GRPC]
)
@pytest.mark.parametrize("phase", [Phase.REQUEST_BODY, Phase.RESPONSE_BODY])
def test_non_buffered_replacement_gets_no_content_length(mode: BodySendMode, phase: Phase) -> None:
    reply = body_reply(phase, mode, b"new", False)
    assert reply == Reply(body=b"new")
    empty = body_reply(phase, mode, b"", True)
    assert empty == Reply(clear_body=True)


@pytest.mark.parametrize(
    "mode", [BodySendMode.STREAMED, BodySendMode.BUFFERED, BodySendMode.BUFFERED_PARTIAL]
)
def test_no_replacement_is_a_plain_continue(mode: BodySendMode) -> None:
    headers = HeaderMutation(set=(("x-a", b"1", OVERWRITE),))
    assert body_reply(Phase.REQUEST_BODY, mode, None, True) == Reply()
    assert body_reply(Phase.REQUEST_BODY, mode, None, True, headers) == Reply(
        header_mutation=headers
    )


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize(("new_body", "sent"), [(b"chunk", b"chunk"), (b"", b""), (None, b"")])
def test_full_duplex_streams_the_chunk_back(eos: bool, new_body: bytes | None, sent: bytes) -> None:
    reply = body_reply(Phase.RESPONSE_BODY, FD, new_body, eos)
    assert reply.streamed_body == (sent, eos)
    assert reply.body is None
    assert not reply.clear_body
    assert not reply.header_mutation  # no content-length: Envoy removes it itself


# ------------------------------------------------------------------ immediate_reply


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ("", ""),
        ("ok_token-1.2:3", "ok_token-1.2:3"),
        ("has spaces in it", "has_spaces_in_it"),
        ("tab\tnew\nline\r", "tab_new_line_"),
        ("é/ü", "___"),
        ("x" * 100, "x" * 64),
        ("a b" * 40, ("a_b" * 40)[:64]),
    ],
)
def test_immediate_reply_details_are_sanitised(details: str, expected: str) -> None:
    reply = immediate_reply(Respond(403, details=details))
    assert reply.details == expected
    assert " " not in reply.details
    assert len(reply.details) <= 64


def test_immediate_reply_carries_status_body_and_checked_headers() -> None:
    drops = Drops()
    reply = immediate_reply(
        Respond(
            401,
            b"denied",
            {"WWW-Authenticate": "Bearer", "x-envoy-upstream": "x", "x-bad": "a\r\nb"},
            "jwt_missing",
        ),
        drops,
    )
    assert reply.status == 401
    assert reply.body == b"denied"
    assert reply.details == "jwt_missing"
    assert reply.headers.set == (("www-authenticate", b"Bearer", OVERWRITE),)
    assert sorted(drops.keys) == ["x-bad", "x-envoy-upstream"]


def test_immediate_reply_from_reject_is_json() -> None:
    reply = immediate_reply(Reject(429, "rate_limited", "Too many requests.").to_respond())
    assert reply.status == 429
    assert reply.body == b'{"error": "rate_limited", "message": "Too many requests."}'
    assert reply.headers.set == (("content-type", b"application/json", OVERWRITE),)
    assert reply.details == "rate_limited"
