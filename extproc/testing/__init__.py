"""The plugin author's test toolkit (part of the public API, versioned with it).

Three levels, from fastest to most realistic:

* call a hook directly with an event builder - ``await plugin.on_request(request_headers(...))``;
* :class:`FakeEnvoy` - the plugin in a real chain behind the real protocol code, in process,
  driven through every processing mode the way Envoy drives it;
* :class:`LocalStack` - echo upstream + the sidecar (a real process) + a real Envoy.

The pytest fixtures (``fake_envoy``, ``extproc_stack``, ``extproc_redis``, ``manual_clock``)
live in :mod:`extproc.testing.pytest_plugin` and load automatically when extproc is installed.
"""

from __future__ import annotations

from extproc.protocol.events import BodySendMode
from extproc.testing.clock import ManualClock
from extproc.testing.context import make_plugin_context
from extproc.testing.events import (
    http_request,
    make_headers,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
)
from extproc.testing.fake_envoy import EnvoyMode, Exchange, FakeEnvoy, SpuriousResponseError
from extproc.testing.jwt import JwksServer, KeyPair, TokenFactory, make_ec_key, make_rsa_key
from extproc.testing.processes import EchoUpstream, EnvoyProcess, SidecarProcess
from extproc.testing.redis_server import RedisServer
from extproc.testing.stack import LocalStack

__all__ = [
    "BodySendMode",
    "EchoUpstream",
    "EnvoyMode",
    "EnvoyProcess",
    "Exchange",
    "FakeEnvoy",
    "JwksServer",
    "KeyPair",
    "LocalStack",
    "ManualClock",
    "RedisServer",
    "SidecarProcess",
    "SpuriousResponseError",
    "TokenFactory",
    "http_request",
    "make_ec_key",
    "make_headers",
    "make_plugin_context",
    "make_rsa_key",
    "request_body",
    "request_headers",
    "request_trailers",
    "response_body",
    "response_headers",
    "response_trailers",
]
