"""The plugin API's own behaviour: results, headers, health."""

from __future__ import annotations

import json

import pytest

from extproc.plugin import Continue, Headers, HealthStatus, Needs, Plugin, Reject, Respond
from extproc.testing.fake_envoy import EnvoyMode, FakeEnvoy


def test_reject_body_carries_extra_fields_but_error_and_message_win() -> None:
    r = Reject(400, "invalid", "bad body", extra={"errors": [{"path": "$.a"}], "error": "x"})
    respond = r.to_respond()
    assert json.loads(respond.body) == {
        "errors": [{"path": "$.a"}], "error": "invalid", "message": "bad body",
    }  # fmt: skip
    assert respond.headers["content-type"] == "application/json"
    assert respond.details == "invalid"


@pytest.mark.parametrize("status", [200, 302, 600])
def test_reject_status_must_be_an_error(status: int) -> None:
    with pytest.raises(ValueError, match=r"400\.\.599"):
        Reject(status, "x")


def test_respond_status_range() -> None:
    with pytest.raises(ValueError, match=r"200\.\.599"):
        Respond(100)


def test_headers_first_value_all_values_and_raw_bytes() -> None:
    h = Headers((("a", "1"), ("b", "x\udcff"), ("a", "2")))
    assert h["a"] == "1" and h.get("a") == "1" and h.get("zz") is None
    assert h.get("zz", "d") == "d"
    assert h.get_all("a") == ("1", "2") and h.get_all("b") == ("x\udcff",)
    assert h.get_all("zz") == ()
    once = Headers((("a", "1"), ("b", "2")))  # no repeated key: the fast path
    assert once.get_all("a") == ("1",) and once.get_all("zz") == ()
    assert h.raw("b") == b"x\xff"  # non-UTF-8 bytes come back unchanged
    assert h.raw("zz") is None
    assert "secret" not in repr(Headers.of({"authorization": "secret"}))


def test_health_info_is_immutable_by_default() -> None:
    with pytest.raises(TypeError):
        HealthStatus.healthy().info["x"] = 1  # type: ignore[index]


class Cookies(Plugin):
    name = "cookies"
    needs = Needs(request_headers=False, response_headers=True)

    async def on_response(self, event):  # type: ignore[no-untyped-def, override]
        return Continue(append_headers=[("set-cookie", "a=1"), ("set-cookie", "b=2")])


async def test_append_pairs_repeat_a_key() -> None:
    envoy = FakeEnvoy.for_plugins([Cookies(None)], EnvoyMode(response_headers=True))
    ex = await envoy.request(upstream_headers={"set-cookie": "z=0"})
    assert ex.response_headers["set-cookie"] == ["z=0", "a=1", "b=2"]
