"""The public test toolkit: extproc.testing and its pytest fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import extproc.testing as toolkit
from extproc.context import RequestContext
from extproc.plugin import CONTINUE, Continue, Needs, Plugin, ResponseEvent, ResponseHeaders, Result
from extproc.testing import (
    ManualClock,
    make_headers,
    request_body,
    request_headers,
    response_headers,
)
from extproc.testing.pytest_plugin import FakeEnvoySession, write_config


def test_every_public_name_is_importable() -> None:
    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None, name
    assert {"FakeEnvoy", "LocalStack", "ManualClock", "request_headers"} <= set(toolkit.__all__)


def test_manual_clock_moves_only_forward_and_only_when_told() -> None:
    clock = ManualClock(start=10.0, epoch=1_000_000.0)
    assert clock() == 10.0 and clock.wall() == 1_000_000.0
    assert clock.advance(2.5) == 12.5
    assert clock.wall() == 1_000_002.5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)


def test_event_builders_look_like_a_stream() -> None:
    shared = RequestContext()
    headers = request_headers(
        "/a/b?x=1", method="POST", headers={"X-Key": "v"}, context=shared, end_of_stream=False
    )
    assert headers.request.route_path == "/a/b" and headers.request.query == "x=1"
    assert headers.headers["x-key"] == "v"
    assert headers.headers[":method"] == "POST" and headers.headers[":path"] == "/a/b?x=1"
    body = request_body(json={"a": 1}, request=headers.request, context=shared)
    assert json.loads(body.body) == {"a": 1} and body.context is shared
    response = response_headers(404, [("set-cookie", "a"), ("set-cookie", "b")])
    assert response.status == 404 and response.headers[":status"] == "404"
    assert response.headers.get_all("set-cookie") == ("a", "b")
    assert make_headers({"A": "1"}, status="200").items_all() == ((":status", "200"), ("a", "1"))
    with pytest.raises(ValueError, match="must start with '/'"):
        request_headers("no-slash")


class _Tag(Plugin):
    name = "tag"
    needs = Needs(request_headers=False, response_headers=True)

    async def on_response(self, event: ResponseEvent) -> Result:
        if isinstance(event, ResponseHeaders):
            return Continue(set_headers={"x-tag": str(self.config)})
        return CONTINUE


async def test_fake_envoy_fixture_takes_an_instance(fake_envoy: type[FakeEnvoySession]) -> None:
    session = fake_envoy(_Tag("t1"))
    async with session as envoy:
        ex = await envoy.request()
    assert ex.header("x-tag") == "t1"
    assert session.context.plugin_name == "tag"
    with pytest.raises(TypeError, match="instance alone"):
        fake_envoy(_Tag("t1"), {"a": 1})


def test_write_config_fills_in_what_a_test_stack_needs(tmp_path: Path) -> None:
    path = write_config({"plugins": []}, tmp_path)
    assert yaml.safe_load(path.read_text()) == {
        "plugins": [],
        "version": 1,
        "server": {"drain_delay_s": 0},
    }
    assert write_config(path, tmp_path) == path
    text = write_config("version: 1\nplugins: []\n", tmp_path)
    assert text != path and text.read_text() == "version: 1\nplugins: []\n"


def test_the_pytest_plugin_is_cheap_to_load() -> None:
    # it loads in every pytest run where extproc is installed: no grpc, protobuf or crypto
    import subprocess
    import sys

    code = (
        "import sys, extproc.testing.pytest_plugin; "
        "heavy = [m for m in ('grpc', 'google.protobuf', 'cryptography', 'httpx') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
