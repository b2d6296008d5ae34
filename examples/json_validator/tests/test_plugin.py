"""Unit tests: the schema checks table-driven, the plugin behind FakeEnvoy in BUFFERED mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
from extproc.context import RequestContext
from extproc.plugin import Phase, Reject, Respond
from extproc.testing import (
    BodySendMode,
    EnvoyMode,
    make_plugin_context,
    request_body,
    request_headers,
)
from extproc.testing.pytest_plugin import FakeEnvoySession
from pydantic import ValidationError

from extproc_json_validator import JsonValidatorConfig, JsonValidatorPlugin, Route, validate
from extproc_json_validator.schema import depth

FakeEnvoyFixture = type[FakeEnvoySession]
ORDERS: dict[str, Any] = {
    "routes": [
        {
            "path_prefix": "/orders",
            "required": ["item", "quantity"],
            "properties": {"item": "string", "quantity": "integer", "note": ["string", "null"]},
            "additional_properties": False,
        }
    ],
    "max_body_bytes": 200,
    "max_depth": 3,
}
JSON = {"content-type": "application/json"}
ROUTE = Route.model_validate(ORDERS["routes"][0])


@pytest.mark.parametrize(
    ("document", "problems"),
    [
        ({"item": "pen", "quantity": 2}, []),
        ({"item": "pen", "quantity": 2, "note": None}, []),
        ({"item": "pen"}, [("$.quantity", "required")]),
        ({"item": "pen", "quantity": 2.5}, [("$.quantity", "expected integer, got number")]),
        ({"item": "pen", "quantity": True}, [("$.quantity", "expected integer, got boolean")]),
        ({"item": 1, "quantity": 1, "x": 0}, [("$.item", "expected string, got integer"),
                                             ("$.x", "not allowed")]),
        ([1, 2], [("$", "expected an object, got array")]),
    ],
)  # fmt: skip
def test_schema_checks(document: Any, problems: list[tuple[str, str]]) -> None:
    assert [(p.path, p.problem) for p in validate(document, ROUTE)] == problems


def test_depth() -> None:
    assert depth(1) == 0
    assert depth({}) == 1
    assert depth({"a": [{"b": []}]}) == 4


async def test_valid_body_reaches_the_upstream_unchanged(fake_envoy: FakeEnvoyFixture) -> None:
    body = json.dumps({"item": "pen", "quantity": 2}).encode()
    async with fake_envoy(JsonValidatorPlugin, ORDERS) as envoy:
        assert envoy.mode.request_body is BodySendMode.BUFFERED  # what `needs` asked for
        ex = await envoy.request("POST", "/orders", JSON, body)
    assert ex.status == 200
    assert ex.upstream_body == body


async def test_invalid_body_gets_400_with_every_problem(fake_envoy: FakeEnvoyFixture) -> None:
    body = json.dumps({"quantity": "two", "colour": "red"}).encode()
    async with fake_envoy(JsonValidatorPlugin, ORDERS) as envoy:
        ex = await envoy.request("POST", "/orders", JSON, body)
    assert ex.status == 400 and ex.upstream_body is None
    answer = json.loads(ex.response_body)
    assert answer["error"] == "invalid_body"
    assert answer["errors"] == [
        {"path": "$.item", "problem": "required"},
        {"path": "$.quantity", "problem": "expected integer, got string"},
        {"path": "$.colour", "problem": "not allowed"},
    ]


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [
        (JSON, b"x" * 201, 413, "body_too_large"),  # refused on the content-length header
        (JSON, b"{not json", 400, "invalid_body"),
        (JSON, b'{"a": {"b": {"c": {}}}}', 400, "invalid_body"),  # too deep
        (JSON, b"", 400, "invalid_body"),  # no body at all
        ({"content-type": "text/plain"}, b"{}", 415, "unsupported_media_type"),
    ],
)
async def test_refusals(
    fake_envoy: FakeEnvoyFixture, headers: dict[str, str], body: bytes, status: int, error: str
) -> None:
    async with fake_envoy(JsonValidatorPlugin, ORDERS) as envoy:
        ex = await envoy.request("POST", "/orders", headers, body)
    assert ex.status == status
    assert json.loads(ex.response_body)["error"] == error


async def test_streamed_chunks_are_gathered_and_size_checked_without_content_length(
    fake_envoy: FakeEnvoyFixture,
) -> None:
    # Envoy in STREAMED mode with no content-length: the chain gathers the chunks for a
    # BUFFERED plugin and hands it the whole body at the end
    mode = EnvoyMode(request_body=BodySendMode.STREAMED)
    session = fake_envoy(JsonValidatorPlugin, ORDERS, mode=mode)
    async with session as envoy:
        envoy.chunk_size = 50
        ex = await envoy.request(
            "POST", "/orders", [*JSON.items(), ("content-length", "")], b" " * 250 + b"{}"
        )
    assert ex.status == 413
    assert ex.messages_sent.count(Phase.REQUEST_BODY) == 6  # 5 chunks of 50 bytes and 2 more


async def test_other_routes_and_methods_are_not_checked(fake_envoy: FakeEnvoyFixture) -> None:
    async with fake_envoy(JsonValidatorPlugin, ORDERS) as envoy:
        get = await envoy.request("GET", "/orders")
        other = await envoy.request("POST", "/upload", {"content-type": "text/csv"}, b"a,b")
    assert (get.status, other.status) == (200, 200)


async def test_hooks_directly_share_the_request_context() -> None:
    plugin = JsonValidatorPlugin(JsonValidatorConfig.model_validate(ORDERS))
    context = make_plugin_context("json_validator", plugin.config)
    await plugin.initialize(context)
    await context.http.aclose()
    shared = RequestContext()
    headers = request_headers("/orders", method="POST", headers=JSON, end_of_stream=False,
                              context=shared)  # fmt: skip
    assert await plugin.on_request(headers) is not None
    result = await plugin.on_request(request_body(json={"item": 1}, request=headers.request,
                                                  context=shared))  # fmt: skip
    assert isinstance(result, Respond) and result.status == 400
    assert not isinstance(result, Reject)


def test_config_refuses_a_schema_no_body_could_pass() -> None:
    with pytest.raises(ValidationError, match="no body could pass"):
        Route(required=("id",), properties={}, additional_properties=False)
