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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


# Imported on first use: the pytest plugin (loaded by every pytest run where extproc is
# installed) then costs an import of the clock, not of grpc, protobuf and cryptography.
_LAZY: dict[str, str] = {
    "BodySendMode": "extproc.protocol.events",
    "EchoUpstream": "extproc.testing.processes",
    "EnvoyMode": "extproc.testing.fake_envoy",
    "EnvoyProcess": "extproc.testing.processes",
    "Exchange": "extproc.testing.fake_envoy",
    "FakeEnvoy": "extproc.testing.fake_envoy",
    "JwksServer": "extproc.testing.jwt",
    "KeyPair": "extproc.testing.jwt",
    "LocalStack": "extproc.testing.stack",
    "ManualClock": "extproc.testing.clock",
    "RedisServer": "extproc.testing.redis_server",
    "SidecarProcess": "extproc.testing.processes",
    "SpuriousResponseError": "extproc.testing.fake_envoy",
    "TokenFactory": "extproc.testing.jwt",
    "http_request": "extproc.testing.events",
    "make_ec_key": "extproc.testing.jwt",
    "make_headers": "extproc.testing.events",
    "make_plugin_context": "extproc.testing.context",
    "make_rsa_key": "extproc.testing.jwt",
    "request_body": "extproc.testing.events",
    "request_headers": "extproc.testing.events",
    "request_trailers": "extproc.testing.events",
    "response_body": "extproc.testing.events",
    "response_headers": "extproc.testing.events",
    "response_trailers": "extproc.testing.events",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
