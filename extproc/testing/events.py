"""Event builders: call a plugin's hooks directly, without a chain or a protocol in between.

::

    event = request_headers("/orders?id=1", method="POST", headers={"x-api-key": "k"})
    result = await plugin.on_request(event)
    assert isinstance(result, Reject) and result.status == 401

Headers are given as a mapping or as ``(name, value)`` pairs (repeat a name to repeat a
header); names are lower-cased and the pseudo-headers Envoy sends (``:method``, ``:path``,
``:authority``, ``:scheme``, ``:status``) are added, as in a real stream. Pass one
``context=RequestContext()`` to several events to play the phases of one request. For the full
protocol (processing modes, chunked bodies, mutations applied) use
:class:`~extproc.testing.fake_envoy.FakeEnvoy` instead.
"""

from __future__ import annotations

import json as _json
from collections.abc import Mapping, Sequence
from typing import Any

from extproc.context import RequestContext
from extproc.plugin import (
    Headers,
    HttpRequest,
    RequestBody,
    RequestHeaders,
    RequestTrailers,
    ResponseBody,
    ResponseHeaders,
    ResponseTrailers,
)

__all__ = [
    "HeaderInput",
    "http_request",
    "make_headers",
    "request_body",
    "request_headers",
    "request_trailers",
    "response_body",
    "response_headers",
    "response_trailers",
]

#: headers as a test writes them: ``{"name": "value"}`` or ``[("name", "value"), ...]``
HeaderInput = Mapping[str, str] | Sequence[tuple[str, str]] | None


def make_headers(headers: HeaderInput = None, **pseudo: str) -> Headers:
    """:class:`~extproc.plugin.Headers` from test input; ``pseudo`` adds ``:name`` entries
    first (``make_headers({"a": "1"}, status="200")``)."""
    pairs: list[tuple[str, str]] = [(f":{k}", v) for k, v in pseudo.items()]
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    pairs.extend((k.lower(), v) for k, v in items)
    return Headers(tuple(pairs))


def http_request(
    path: str = "/",
    *,
    method: str = "GET",
    headers: HeaderInput = None,
    authority: str = "example.com",
    scheme: str = "https",
    request_id: str = "",
    attributes: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> HttpRequest:
    """The :class:`~extproc.plugin.HttpRequest` a stream would build from these headers."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    all_headers = make_headers(
        headers, method=method, path=path, authority=authority, scheme=scheme
    )
    if request_id and "x-request-id" not in all_headers:
        all_headers = Headers((*all_headers.items_all(), ("x-request-id", request_id)))
    return HttpRequest(
        method=method,
        path=path,
        authority=authority,
        scheme=scheme,
        request_id=request_id or all_headers.get("x-request-id", ""),
        headers=all_headers,
        attributes=dict(attributes or {}),
        metadata=dict(metadata or {}),
    )


def _request(
    request: HttpRequest | None, path: str, method: str, headers: HeaderInput
) -> HttpRequest:
    return request if request is not None else http_request(path, method=method, headers=headers)


def _context(context: RequestContext | None) -> RequestContext:
    """The given request context, or a fresh one (each event builder takes either)."""
    return context if context is not None else RequestContext()


def request_headers(
    path: str = "/",
    *,
    method: str = "GET",
    headers: HeaderInput = None,
    authority: str = "example.com",
    scheme: str = "https",
    request_id: str = "",
    attributes: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    context: RequestContext | None = None,
    end_of_stream: bool = True,
) -> RequestHeaders:
    """The first event of a request. ``end_of_stream=False`` says a body follows."""
    request = http_request(
        path,
        method=method,
        headers=headers,
        authority=authority,
        scheme=scheme,
        request_id=request_id,
        attributes=attributes,
        metadata=metadata,
    )
    return RequestHeaders(request, _context(context), end_of_stream)


def _body_bytes(body: bytes | str | None, json: Any) -> bytes:
    if json is not None:
        if body is not None:
            raise TypeError("give body or json, not both")
        return _json.dumps(json).encode()
    if isinstance(body, str):
        return body.encode()
    return body or b""


def request_body(
    body: bytes | str | None = None,
    *,
    json: Any = None,
    path: str = "/",
    method: str = "POST",
    headers: HeaderInput = None,
    request: HttpRequest | None = None,
    context: RequestContext | None = None,
    end_of_stream: bool = True,
) -> RequestBody:
    """A request body: the whole body, as a BUFFERED plugin gets it (``json=`` encodes an
    object). ``request`` reuses the :class:`HttpRequest` of an earlier ``request_headers``."""
    return RequestBody(
        _request(request, path, method, headers),
        _context(context),
        _body_bytes(body, json),
        end_of_stream,
    )


def request_trailers(
    trailers: HeaderInput = None,
    *,
    path: str = "/",
    method: str = "POST",
    request: HttpRequest | None = None,
    context: RequestContext | None = None,
) -> RequestTrailers:
    return RequestTrailers(
        _request(request, path, method, None),
        _context(context),
        make_headers(trailers),
    )


def response_headers(
    status: int = 200,
    headers: HeaderInput = None,
    *,
    path: str = "/",
    method: str = "GET",
    request: HttpRequest | None = None,
    context: RequestContext | None = None,
    end_of_stream: bool = False,
) -> ResponseHeaders:
    """The upstream's response headers (``:status`` included) for a request to ``path``."""
    return ResponseHeaders(
        _request(request, path, method, None),
        _context(context),
        status,
        make_headers(headers, status=str(status)),
        end_of_stream,
    )


def response_body(
    body: bytes | str | None = None,
    *,
    json: Any = None,
    path: str = "/",
    method: str = "GET",
    request: HttpRequest | None = None,
    context: RequestContext | None = None,
    end_of_stream: bool = True,
) -> ResponseBody:
    return ResponseBody(
        _request(request, path, method, None),
        _context(context),
        _body_bytes(body, json),
        end_of_stream,
    )


def response_trailers(
    trailers: HeaderInput = None,
    *,
    path: str = "/",
    method: str = "GET",
    request: HttpRequest | None = None,
    context: RequestContext | None = None,
) -> ResponseTrailers:
    return ResponseTrailers(
        _request(request, path, method, None),
        _context(context),
        make_headers(trailers),
    )
