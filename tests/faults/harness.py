"""Shared pieces of the fault-injection suite: a bounded load driver that records every
request's outcome, a stack of real processes with any number of sidecars, admin polling and
a per-test time budget.

Every loop here is bounded in count and in time; every process is one the test started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx

from extproc.testing.processes import EchoUpstream, EnvoyProcess, SidecarProcess, free_port

__all__ = [
    "Load",
    "Outcome",
    "Stack",
    "admin_status",
    "budget",
    "poll",
    "write_atomic",
]

P = ParamSpec("P")
T = TypeVar("T")


def budget(seconds: float) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Bound an async test (pytest-timeout is not installed): past ``seconds`` it fails with
    TimeoutError instead of hanging the suite."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def bounded(*args: P.args, **kwargs: P.kwargs) -> T:
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)

        return bounded

    return wrap


async def poll(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """Wait (bounded) until ``check()`` is true; the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(interval)


def write_atomic(path: Path, text: str) -> None:
    """Replace a file by rename, the way editors and ConfigMaps do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def admin_status(client: httpx.AsyncClient, admin: str) -> dict[str, Any]:
    response = await client.get(f"http://{admin}/status", timeout=2.0)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


# ---------------------------------------------------------------------------- load


@dataclass(slots=True)
class Outcome:
    """One request: what phase of the test it started in, what it was, how it ended."""

    index: int
    phase: str
    kind: str
    started: float
    ended: float
    status: int | str  # an HTTP status, or "timeout" / "error:<Type>"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


#: what a load sender returns: the status and anything worth keeping about the response
Sent = tuple[int, dict[str, Any]]


class Load:
    """Steady load from ``concurrency`` workers until stopped or ``max_requests`` were sent.

    ``send(index)`` -> (kind, awaitable of (status, info)); each request is bounded by
    ``timeout`` (a timeout is recorded, never raised). The test moves :attr:`phase` along as it
    injects faults; every outcome records the phase it *started* in.
    """

    def __init__(
        self,
        send: Callable[[int], tuple[str, Awaitable[Sent]]],
        *,
        concurrency: int = 4,
        max_requests: int = 5000,
        timeout: float = 5.0,
        pause: float = 0.0,
    ) -> None:
        self.send = send
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.timeout = timeout
        self.pause = pause
        self.phase = "start"
        self.outcomes: list[Outcome] = []
        self._issued = 0
        self._stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()

    async def __aenter__(self) -> Load:
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set() and self._issued < self.max_requests:
            index = self._issued
            self._issued += 1
            phase = self.phase
            kind, call = self.send(index)
            started = loop.time()
            info: dict[str, Any] = {}
            status: int | str
            try:
                status, info = await asyncio.wait_for(call, self.timeout)
            except TimeoutError:
                status = "timeout"
            except Exception as exc:
                status = f"error:{type(exc).__name__}"
            self.outcomes.append(Outcome(index, phase, kind, started, loop.time(), status, info))
            self._progress.set()
            if self.pause:
                await asyncio.sleep(self.pause)

    async def wait_for(self, n: int, *, timeout: float = 30.0, phase: str | None = None) -> None:
        """Until ``n`` more requests (of ``phase``, if given) have ended."""

        def count() -> int:
            return sum(1 for o in self.outcomes if phase is None or o.phase == phase)

        target = count() + n
        async with asyncio.timeout(timeout):
            while count() < target:
                ended = self._stop.is_set() or self._issued >= self.max_requests
                if ended and all(w.done() for w in self._workers):
                    raise AssertionError("load ended before the wanted requests")
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), 1.0)

    # ------------------------------------------------------------------ reading

    def select(self, phase: str | None = None, kind: str | None = None) -> list[Outcome]:
        return [
            o
            for o in self.outcomes
            if (phase is None or o.phase == phase) and (kind is None or o.kind == kind)
        ]

    def statuses(self, phase: str | None = None, kind: str | None = None) -> Counter[int | str]:
        return Counter(o.status for o in self.select(phase, kind))

    def figures(self) -> dict[str, Any]:
        """Counts by phase, kind and status, and the slowest request of each phase."""
        out: dict[str, Any] = {"sent": len(self.outcomes)}
        by: dict[str, dict[str, dict[str, int]]] = {}
        slowest: dict[str, float] = {}
        for o in self.outcomes:
            kinds = by.setdefault(o.phase, {})
            counts = kinds.setdefault(o.kind, {})
            counts[str(o.status)] = counts.get(str(o.status), 0) + 1
            slowest[o.phase] = max(slowest.get(o.phase, 0.0), o.elapsed)
        out["by_phase"] = by
        out["max_seconds"] = {k: round(v, 3) for k, v in slowest.items()}
        return out


def http_sender(
    client: httpx.AsyncClient,
    pick: Callable[[int], tuple[str, str, dict[str, str]]],
    *,
    keep: Callable[[httpx.Response], dict[str, Any]] | None = None,
) -> Callable[[int], tuple[str, Awaitable[Sent]]]:
    """A :class:`Load` sender of GET requests: ``pick(index) -> (kind, path, headers)``."""

    def send(index: int) -> tuple[str, Awaitable[Sent]]:
        kind, path, headers = pick(index)

        async def go() -> Sent:
            response = await client.get(path, headers=headers)
            return response.status_code, (keep(response) if keep else {})

        return kind, go()

    return send


def upstream_header(name: str) -> Callable[[httpx.Response], dict[str, Any]]:
    """Keep the value of a request header as the echo upstream saw it (``None``: not set)."""

    def keep(response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            return {"body": response.text[:200]}
        try:
            return {name: response.json()["headers"].get(name)}
        except (ValueError, KeyError):
            return {}

    return keep


# ---------------------------------------------------------------------------- stack


class Stack:
    """Echo upstream + any number of sidecar processes + one real Envoy, built from the pieces
    (``LocalStack`` takes one sidecar). The Envoy bootstrap is the one ``envoy_spec_for``
    renders for ``configs[0]``, with every sidecar listed as an endpoint."""

    def __init__(
        self,
        configs: Sequence[Path],
        *,
        failure_mode_allow: bool = False,
        admin: bool = False,
        env: dict[str, str] | None = None,
        spec_changes: Callable[[Any], Any] | None = None,
        client_timeout: float = 10.0,
        sidecar_args: Sequence[str] = (),
    ) -> None:
        self.configs = list(configs)
        self.failure_mode_allow = failure_mode_allow
        self.upstream = EchoUpstream()
        self.sidecars: list[SidecarProcess] = []
        self.admins: list[str] = []
        for cfg in self.configs:
            admin_address = f"127.0.0.1:{free_port()}" if admin else ""
            self.admins.append(admin_address)
            self.sidecars.append(
                SidecarProcess(cfg, admin=admin_address, env=env, extra_args=sidecar_args)
            )
        self.env = env
        self.sidecar_args = tuple(sidecar_args)
        self.spec_changes = spec_changes
        self.client_timeout = client_timeout
        self.envoy: EnvoyProcess | None = None
        self.client: httpx.AsyncClient | None = None
        self.spec: Any = None

    async def __aenter__(self) -> Stack:
        from extproc.cli import envoy_spec_for
        from extproc.config import load_config
        from extproc.envoy_config import render

        await self.upstream.start()
        try:
            for sidecar in self.sidecars:
                await asyncio.to_thread(sidecar.start)
            spec: Any = envoy_spec_for(
                load_config(self.configs[0]),
                listener_port=0,
                upstream=f"127.0.0.1:{self.upstream.port}",
                sidecar=[s.address for s in self.sidecars],
                failure_mode_allow=self.failure_mode_allow,
            )
            if self.spec_changes is not None:
                spec = self.spec_changes(spec)
            self.spec = spec
            self.envoy = EnvoyProcess(await asyncio.to_thread(render, spec))
            await asyncio.to_thread(self.envoy.start)
            self.client = httpx.AsyncClient(
                base_url=self.envoy.url,
                trust_env=False,
                timeout=self.client_timeout,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            )
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
        for sidecar in self.sidecars:
            await asyncio.to_thread(sidecar.stop)
        await self.upstream.stop()

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.client is not None, "the stack is not started"
        return self.client

    async def replace_sidecar(self, index: int) -> SidecarProcess:
        """Start a new sidecar process on the SAME address as sidecar ``index`` (after a kill);
        Envoy is not touched."""
        old = self.sidecars[index]
        new = SidecarProcess(
            old.config,
            listen=old.address,
            admin=self.admins[index],
            env=self.env,
            extra_args=self.sidecar_args,
        )
        self.sidecars.append(old)  # stopped again (idempotently) at close
        self.sidecars[index] = new
        await asyncio.to_thread(new.start)
        return new


def sidecar_spec_with(spec: Any, **changes: Any) -> Any:
    return replace(spec, sidecar=replace(spec.sidecar, **changes))


def ext_proc_spec_with(spec: Any, **changes: Any) -> Any:
    return replace(spec, ext_proc=replace(spec.ext_proc, **changes))


def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a sidecar log (other lines skipped)."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


async def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
