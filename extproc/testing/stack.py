"""A whole stack for end-to-end tests: echo upstream + sidecar (a real process) + real Envoy.

::

    async with LocalStack(config_path) as stack:
        response = await stack.client.get("/hello")
        assert stack.upstream.requests[-1]["headers"]["x-added"] == "1"

The Envoy bootstrap is the one ``extproc envoy-config`` renders for the configuration, so the
test exercises the processing mode, attributes and timeouts an operator would deploy.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from extproc.config import load_config
from extproc.testing.processes import EchoUpstream, EnvoyProcess, SidecarProcess

__all__ = ["LocalStack"]


class LocalStack:
    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        failure_mode_allow: bool = False,
        sidecar_args: tuple[str, ...] = ("--admin", ""),
        env: dict[str, str] | None = None,
        listen: str | None = None,
        ext_proc_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = Path(config)
        self.failure_mode_allow = failure_mode_allow
        self.upstream = EchoUpstream()
        self.sidecar = SidecarProcess(self.config, extra_args=sidecar_args, env=env, listen=listen)
        self.envoy: EnvoyProcess | None = None
        self.client: httpx.AsyncClient | None = None
        self.ext_proc_overrides = ext_proc_overrides or {}

    async def __aenter__(self) -> Self:
        from extproc.cli import envoy_spec_for
        from extproc.envoy_config import render

        await self.upstream.start()
        try:
            await asyncio.to_thread(self.sidecar.start)
            spec: Any = envoy_spec_for(
                load_config(self.config),
                listener_port=0,
                upstream=f"127.0.0.1:{self.upstream.port}",
                sidecar=[self.sidecar.address],
                failure_mode_allow=self.failure_mode_allow,
            )
            if self.ext_proc_overrides:
                spec = replace(spec, ext_proc=replace(spec.ext_proc, **self.ext_proc_overrides))
            bootstrap = await asyncio.to_thread(render, spec)
            self.envoy = EnvoyProcess(bootstrap)
            await asyncio.to_thread(self.envoy.start)
            self.client = httpx.AsyncClient(base_url=self.envoy.url, trust_env=False, timeout=10.0)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
        await asyncio.to_thread(self.sidecar.stop)
        await self.upstream.stop()

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.client is not None, "the stack is not started"
        return self.client
