"""Per-plugin rollout: a sticky share of requests, or requests with a header."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from extproc.context import AUTH_CLAIMS
from extproc.plugin import Continue, Headers, HttpRequest, Needs, Plugin, RequestEvent, Result
from extproc.rollout import RolloutSettings, make_gate
from extproc.testing.fake_envoy import FakeEnvoy


def req(request_id: str = "", **headers: str) -> HttpRequest:
    return HttpRequest(request_id=request_id, headers=Headers.of(headers))


def test_full_rollout_costs_nothing_per_request() -> None:
    assert make_gate(RolloutSettings(), "p") is None


def test_percent_is_close_to_the_share_and_sticky_per_key() -> None:
    gate = make_gate(RolloutSettings(percent=25, sticky_key="header:x-user"), "p")
    assert gate is not None
    users = [f"user-{i}" for i in range(4000)]
    chosen = [u for u in users if gate(req(**{"x-user": u}), {})]
    assert 0.21 < len(chosen) / len(users) < 0.29
    # sticky: the same user gets the same answer every time
    assert all(gate(req(**{"x-user": u}), {}) for u in chosen[:50])
    # the salt (plugin name) decorrelates plugins
    other = make_gate(RolloutSettings(percent=25, sticky_key="header:x-user"), "q")
    assert other is not None
    assert {u for u in users if other(req(**{"x-user": u}), {})} != set(chosen)


def test_claim_key_and_header_condition() -> None:
    gate = make_gate(
        RolloutSettings(percent=50, sticky_key="claim:tenant", when_header={"x-canary": "1"}), "p"
    )
    assert gate is not None
    assert not gate(req(), {AUTH_CLAIMS: {"tenant": "t"}})  # no header: never
    tenants = [f"t{i}" for i in range(1000)]
    inside = sum(gate(req(**{"x-canary": "1"}), {AUTH_CLAIMS: {"tenant": t}}) for t in tenants)
    assert 400 < inside < 600
    any_value = make_gate(RolloutSettings(when_header={"x-beta": "*"}), "p")
    assert any_value is not None
    assert any_value(req(**{"x-beta": "yes"}), {}) and not any_value(req(), {})


def test_bad_sticky_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="sticky_key"):
        RolloutSettings(sticky_key="cookie")


class Tag(Plugin):
    name = "tag"
    needs = Needs()

    async def on_request(self, event: RequestEvent) -> Result:
        return Continue(set_headers={"x-tagged": "1"})


async def test_gated_plugin_is_skipped_in_the_chain() -> None:
    envoy = FakeEnvoy.for_plugins([Tag(None)])
    slot = envoy.transport.chain.slots[0]  # type: ignore[attr-defined]
    slot.gate = make_gate(RolloutSettings(when_header={"x-canary": "1"}), "tag")
    skipped = await envoy.request(path="/")
    ran = await envoy.request(path="/", headers={"x-canary": "1"})
    assert skipped.upstream_header("x-tagged") is None
    assert ran.upstream_header("x-tagged") == "1"
