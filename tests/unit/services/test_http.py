"""HttpClient: retries with full-jitter backoff (injected random and sleep), idempotent-only
retries, breaker per host, streamed size cap, deadlines from time_left()."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from extproc.context import _deadline
from extproc.services.breaker import BreakerState
from extproc.services.http import (
    BreakerOpenError,
    HttpClient,
    HttpError,
    HttpTimeoutError,
    ResponseTooLargeError,
)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def client(handler: Handler, rec: Recorder | None = None, **kw: object) -> HttpClient:
    rec = rec or Recorder()
    return HttpClient(
        transport=httpx.MockTransport(handler),
        random=lambda: 1.0,
        sleep=rec.sleep,
        **kw,  # type: ignore[arg-type]
    )


async def test_success_returns_frozen_response() -> None:
    async with client(lambda r: httpx.Response(200, json={"a": 1}, headers={"X-A": "b"})) as c:
        resp = await c.get("http://127.0.0.1/x")
    assert resp.status == 200 and resp.ok and resp.body == b'{"a":1}'
    assert resp.headers["x-a"] == "b"
    with pytest.raises(AttributeError):
        resp.status = 500  # type: ignore[misc]


async def test_retries_with_exponential_full_jitter_backoff() -> None:
    calls = 0

    def handler(r: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503 if calls < 4 else 200)

    rec = Recorder()
    async with client(handler, rec, retries=3, backoff_base=0.1, backoff_max=0.3) as c:
        resp = await c.get("http://127.0.0.1/x")
    assert resp.status == 200 and calls == 4
    assert rec.sleeps == pytest.approx([0.1, 0.2, 0.3])  # random() == 1.0: the ceilings


async def test_jitter_uses_the_random_source() -> None:
    rec = Recorder()
    c = HttpClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(503)),
        random=lambda: 0.5,
        sleep=rec.sleep,
        retries=2,
        backoff_base=0.2,
    )
    resp = await c.get("http://127.0.0.1/x")
    await c.aclose()
    assert resp.status == 503  # the last response, after the retries
    assert rec.sleeps == pytest.approx([0.1, 0.2])


async def test_non_idempotent_methods_are_not_retried() -> None:
    calls = 0

    def handler(r: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503)

    async with client(handler, retries=3) as c:
        resp = await c.request("POST", "http://127.0.0.1/x", content=b"{}")
    assert resp.status == 503 and calls == 1


async def test_connection_errors_are_typed_and_retried() -> None:
    calls = 0

    def handler(r: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused")

    async with client(handler, retries=2) as c:
        with pytest.raises(HttpError):
            await c.get("http://127.0.0.1/x")
    assert calls == 3


async def test_4xx_is_returned_without_retry() -> None:
    calls = 0

    def handler(r: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(404)

    async with client(handler, retries=3) as c:
        assert (await c.get("http://127.0.0.1/x")).status == 404
    assert calls == 1


async def test_breaker_opens_per_host() -> None:
    def handler(r: httpx.Request) -> httpx.Response:
        if r.url.host == "bad.test":
            raise httpx.ConnectError("down")
        return httpx.Response(200)

    now = [0.0]
    c = client(handler, retries=0, breaker_failure_threshold=2, clock=lambda: now[0])
    for _ in range(2):
        with pytest.raises(HttpError):
            await c.get("https://bad.test/x")
    assert c.breaker("bad.test:443").state is BreakerState.OPEN
    with pytest.raises(BreakerOpenError):
        await c.get("https://bad.test/x")
    assert (await c.get("https://good.test/x")).status == 200  # other hosts unaffected
    now[0] += 10  # half-open: one trial
    with pytest.raises(HttpError):
        await c.get("https://bad.test/x")
    await c.aclose()


async def test_size_cap_by_content_length_and_by_stream() -> None:
    async with client(lambda r: httpx.Response(200, content=b"x" * 100)) as c:
        with pytest.raises(ResponseTooLargeError):
            await c.get("http://127.0.0.1/x", max_bytes=50)

    async def chunks():  # no content-length: the cap applies while streaming
        for _ in range(1000):
            yield b"y" * 1000

    read_stopped = client(lambda r: httpx.Response(200, content=chunks()), max_response_bytes=5000)
    with pytest.raises(ResponseTooLargeError):
        await read_stopped.get("http://127.0.0.1/x")
    await read_stopped.aclose()


async def test_timeout_is_typed() -> None:
    async def slow(r: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    c = HttpClient(transport=httpx.MockTransport(slow), timeout=0.05, retries=0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(HttpTimeoutError):
        await c.get("http://127.0.0.1/x")
    assert loop.time() - start < 2.0
    await c.aclose()


async def test_time_left_caps_the_call() -> None:
    async def slow(r: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    c = HttpClient(transport=httpx.MockTransport(slow), timeout=10, retries=3)
    loop = asyncio.get_running_loop()
    token = _deadline.set(loop.time() + 0.05)
    try:
        start = loop.time()
        with pytest.raises(HttpTimeoutError):
            await c.get("http://127.0.0.1/x")
        assert loop.time() - start < 2.0
    finally:
        _deadline.reset(token)
    await c.aclose()


async def test_no_time_left_means_no_call() -> None:
    calls = 0

    def handler(r: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200)

    c = client(handler)
    token = _deadline.set(asyncio.get_running_loop().time() - 1)
    try:
        with pytest.raises(HttpTimeoutError):
            await c.get("http://127.0.0.1/x")
    finally:
        _deadline.reset(token)
    assert calls == 0
    await c.aclose()


async def test_dependency_hook_and_no_redirects() -> None:
    seen: list[tuple[str, str]] = []
    c = client(
        lambda r: httpx.Response(302, headers={"location": "http://evil.test/"}),
        on_dependency=lambda host, outcome, s: seen.append((host, outcome)),
    )
    resp = await c.get("http://127.0.0.1:8080/x")
    assert resp.status == 302  # not followed
    assert seen == [("127.0.0.1:8080", "ok")]
    await c.aclose()


def test_bad_options() -> None:
    for kw in ({"timeout": 0}, {"retries": -1}, {"max_response_bytes": 0}):
        with pytest.raises(ValueError):
            HttpClient(**kw)  # type: ignore[arg-type]
