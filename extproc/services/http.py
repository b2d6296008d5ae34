"""A resilient async HTTP client for plugin dependencies (JWKS endpoints, token introspection).

Every call is bounded: a per-call timeout that is also cut to what the running plugin has left
(:func:`extproc.context.time_left`), a cap on the response size (the body is streamed and
reading stops past the cap), retries with exponential backoff and full jitter for idempotent
methods only, and one :class:`CircuitBreaker` per host. Errors are typed so that callers can
tell "the dependency is slow" from "the dependency is broken" without parsing messages.

Redirects are never followed and proxy settings from the environment are ignored: a dependency
URL in the configuration is exactly where the request goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import httpx

from extproc.context import time_left
from extproc.services.breaker import BreakerOpenError, CircuitBreaker

__all__ = [
    "IDEMPOTENT_METHODS",
    "BreakerOpenError",
    "HttpClient",
    "HttpError",
    "HttpResponse",
    "HttpTimeoutError",
    "ResponseTooLargeError",
]

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: statuses worth another attempt (the server said "not now", not "never")
RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})

#: (host, outcome, seconds) -> None; outcome is "ok", "status", "timeout", "error",
#: "too_large" or "breaker_open"
DependencyHook = Callable[[str, str, float], None]


class HttpError(Exception):
    """The request could not be completed (connection refused, protocol error...)."""


class HttpTimeoutError(HttpError):
    """The call ran out of time: its own timeout or the plugin's deadline."""


class ResponseTooLargeError(HttpError):
    """The response body is larger than the configured cap; it was not read to the end."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class _Attempt:
    response: HttpResponse | None
    error: HttpError | None


class HttpClient:
    """An ``httpx.AsyncClient`` behind timeouts, retries, breakers and a size cap.

    ``random`` and ``sleep`` are injectable so that backoff is tested without waiting;
    ``transport`` lets tests plug in an ``httpx.MockTransport``.
    """

    def __init__(
        self,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        backoff_base: float = 0.05,
        backoff_max: float = 1.0,
        max_response_bytes: int = 1 << 20,
        breaker_failure_threshold: int = 5,
        breaker_reset_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        on_dependency: DependencyHook | None = None,
        user_agent: str = "extproc",
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be >= 1")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff must be >= 0")
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_response_bytes = max_response_bytes
        self._breaker_threshold = breaker_failure_threshold
        self._breaker_reset = breaker_reset_timeout
        self._clock = clock
        self._random = random
        self._sleep = sleep
        self._on_dependency = on_dependency
        self._breakers: dict[str, CircuitBreaker] = {}
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": user_agent},
        )

    # ------------------------------------------------------------------ public

    def breaker(self, host: str) -> CircuitBreaker:
        """The breaker guarding ``host`` (``host:port``), created on first use."""
        b = self._breakers.get(host)
        if b is None:
            b = CircuitBreaker(
                f"http:{host}",
                failure_threshold=self._breaker_threshold,
                reset_timeout=self._breaker_reset,
                clock=self._clock,
            )
            self._breakers[host] = b
        return b

    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
        retries: int | None = None,
    ) -> HttpResponse:
        return await self.request(
            "GET", url, headers=headers, timeout_s=timeout_s, max_bytes=max_bytes, retries=retries
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
        retries: int | None = None,
    ) -> HttpResponse:
        """Send one request, retrying idempotent methods on transport errors, timeouts and
        retryable statuses. Returns the last response whatever its status (the caller decides
        what a 404 means); raises :class:`HttpError` subclasses or :class:`BreakerOpenError`.

        The whole call, backoff included, fits in ``min(timeout, time_left())``.
        """
        method = method.upper()
        parsed = httpx.URL(url)
        host = f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
        breaker = self.breaker(host)
        budget = min(self.timeout if timeout_s is None else timeout_s, time_left())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        cap = self.max_response_bytes if max_bytes is None else max_bytes
        attempts = 1 + (
            (self.retries if retries is None else retries) if method in IDEMPOTENT_METHODS else 0
        )

        last: _Attempt | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self._backoff(attempt)
                if loop.time() + delay >= deadline:
                    break
                await self._sleep(delay)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if not breaker.allow():
                self._report(host, "breaker_open", 0.0)
                if last is not None and last.response is not None:
                    return last.response
                raise BreakerOpenError(breaker.name)
            last = await self._attempt(
                method=method,
                url=url,
                headers=headers,
                content=content,
                remaining=remaining,
                cap=cap,
                host=host,
            )
            if last.error is None:
                assert last.response is not None
                if last.response.status >= 500:
                    breaker.record_failure()
                else:
                    breaker.record_success()
                if last.response.status not in RETRYABLE_STATUSES:
                    return last.response
            else:
                breaker.record_failure()
                if isinstance(last.error, ResponseTooLargeError):
                    raise last.error  # a bigger body will not shrink on retry
        if last is None:
            raise HttpTimeoutError(f"no time left to call {host}")
        if last.response is not None:
            return last.response
        assert last.error is not None
        raise last.error

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**(attempt-1))]."""
        ceiling = min(self.backoff_max, self.backoff_base * math.pow(2, attempt - 1))
        return ceiling * self._random()

    def _report(self, host: str, outcome: str, seconds: float) -> None:
        if self._on_dependency is not None:
            with contextlib.suppress(Exception):  # a metrics hook never breaks a call
                self._on_dependency(host, outcome, seconds)

    async def _attempt(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        remaining: float,
        cap: int,
        host: str,
    ) -> _Attempt:
        started = self._clock()
        try:
            async with asyncio.timeout(remaining):
                response = await self._send(
                    method=method,
                    url=url,
                    headers=headers,
                    content=content,
                    remaining=remaining,
                    cap=cap,
                )
        except TimeoutError:
            self._report(host, "timeout", self._clock() - started)
            return _Attempt(None, HttpTimeoutError(f"{method} {host}: timed out"))
        except httpx.TimeoutException:
            self._report(host, "timeout", self._clock() - started)
            return _Attempt(None, HttpTimeoutError(f"{method} {host}: timed out"))
        except ResponseTooLargeError as exc:
            self._report(host, "too_large", self._clock() - started)
            return _Attempt(None, exc)
        except httpx.HTTPError as exc:
            self._report(host, "error", self._clock() - started)
            return _Attempt(None, HttpError(f"{method} {host}: {type(exc).__name__}"))
        except OSError as exc:
            self._report(host, "error", self._clock() - started)
            return _Attempt(None, HttpError(f"{method} {host}: {type(exc).__name__}"))
        outcome = "ok" if response.status < 500 else "status"
        self._report(host, outcome, self._clock() - started)
        return _Attempt(response, None)

    async def _send(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        remaining: float,
        cap: int,
    ) -> HttpResponse:
        request = self._client.build_request(
            method,
            url,
            headers=dict(headers) if headers else None,
            content=content,
            timeout=httpx.Timeout(remaining),
        )
        response = await self._client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise ResponseTooLargeError(f"response of {declared} bytes exceeds {cap}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise ResponseTooLargeError(f"response exceeds {cap} bytes")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return HttpResponse(
            response.status_code,
            MappingProxyType({k.lower(): v for k, v in response.headers.items()}),
            b"".join(chunks),
        )
