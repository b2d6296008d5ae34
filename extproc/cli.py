"""The ``extproc`` command: ``serve``, ``check``, ``envoy-config``, ``dev``, ``new-plugin``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from extproc.config import ConfigError, LoadedConfig, instance_name, load_config

__all__ = ["envoy_spec_for", "main"]

DEFAULT_DEV_CONFIG = Path(__file__).resolve().parent / "defaults" / "local.yaml"


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)  # type: ignore[arg-type]


def envoy_spec_for(
    loaded: LoadedConfig,
    *,
    listener_port: int = 10000,
    upstream: str = "127.0.0.1:8080",
    sidecar: Sequence[str] | None = None,
    admin_port: int = 9901,
    failure_mode_allow: bool = False,
    tls: object | None = None,
) -> object:
    """The Envoy bootstrap spec matching a sidecar configuration: the processing mode is the
    union of the phases the enabled plugins declare; attributes and metadata namespaces are the
    ones they use."""
    from extproc.envoy_config import (
        BootstrapSpec,
        ExtProcSpec,
        ListenerSpec,
        SidecarSpec,
        UpstreamCluster,
        processing_mode_for,
    )

    plugins = [(entry, cls) for entry, cls, _ in loaded.plugins if entry.enabled]
    settings = loaded.config.server
    attributes: list[str] = []
    for _, cls in plugins:
        for attr in cls.attributes:
            if attr not in attributes:
                attributes.append(attr)
    host, _, port = upstream.rpartition(":")
    return BootstrapSpec(
        listener=ListenerSpec(port=listener_port),
        upstream=UpstreamCluster(host=host or "127.0.0.1", port=int(port)),
        sidecar=SidecarSpec(endpoints=tuple(sidecar or (settings.listen,)), tls=tls),  # type: ignore[arg-type]
        ext_proc=ExtProcSpec(
            processing_mode=processing_mode_for(
                cls.needs_for(cfg) for entry, cls, cfg in loaded.plugins if entry.enabled
            ),
            message_timeout_ms=settings.message_timeout_ms,
            max_message_timeout_ms=settings.max_message_timeout_ms,
            failure_mode_allow=failure_mode_allow,
            allow_mode_override=settings.allow_mode_override,
            request_attributes=tuple(attributes),
            receiving_namespaces=tuple(
                f"extproc.{instance_name(entry, cls)}" for entry, cls in plugins
            ),
        ),
        admin_port=admin_port,
    )


def _load_or_report(path: str) -> LoadedConfig | None:
    """The validated configuration, or ``None`` after printing every problem (file:line)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    names = ", ".join(f"{instance_name(e, c)} ({c.name} {c.version})" for e, c, _ in loaded.plugins)
    print(f"{args.config}: OK - plugins: {names or 'none'}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server import serve

    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    if args.workers > 1:
        from extproc.observability.logging import configure_logging
        from extproc.supervisor import supervise

        configure_logging(loaded.config.logging)
        watch = not args.no_watch
        _run(supervise(loaded, args.config, args.workers, listen=args.listen, admin=args.admin,
                       watch=watch))  # fmt: skip
        return 0
    _run(serve(args.config, listen=args.listen, admin=args.admin, watch=not args.no_watch))
    return 0


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc.envoy_config import render_yaml
    from extproc.supervisor import worker_addresses

    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    tls = None
    if args.sidecar_ca:
        from extproc.envoy_config import TlsSpec

        if (
            not (args.client_cert and args.client_key)
            and loaded.config.server.tls
            and (loaded.config.server.tls.client_ca_file)
        ):
            print(
                "the sidecar requires client certificates (mTLS): give --client-cert and "
                "--client-key",
                file=sys.stderr,
            )
            return 1
        tls = TlsSpec(
            cert_file=args.client_cert or "",
            key_file=args.client_key or "",
            ca_file=args.sidecar_ca,
        )
    elif loaded.config.server.tls is not None:
        print(
            "the sidecar serves TLS: give --sidecar-ca (and --client-cert/--client-key for mTLS)",
            file=sys.stderr,
        )
        return 1
    spec = envoy_spec_for(
        loaded,
        tls=tls,
        listener_port=args.port,
        upstream=args.upstream,
        sidecar=args.sidecar or worker_addresses(loaded.config.server.listen, max(1, args.workers)),
        admin_port=args.admin_port,
        failure_mode_allow=args.failure_mode_allow,
    )
    text = render_yaml(spec)  # type: ignore[arg-type]
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    from extproc.dev import run_local_stack

    return run_local_stack(
        args.config, port=args.port, upstream_port=args.upstream_port, duration=args.duration
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc",
        description="A plugin sidecar for Envoy's ext_proc filter. See `extproc COMMAND --help`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the sidecar")
    p.add_argument("--config", required=True)
    p.add_argument("--listen", help="override server.listen (host:port or unix:/path)")
    p.add_argument("--admin", help="override server.admin (host:port; '' disables)")
    p.add_argument("--no-watch", action="store_true", help="do not watch the config file")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one event loop each)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check", help="validate a configuration without serving")
    p.add_argument("--config", required=True)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("envoy-config", help="render the Envoy bootstrap for a configuration")
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument("--upstream", default="127.0.0.1:8080", help="upstream host:port")
    p.add_argument("--sidecar", action="append", help="sidecar endpoint (repeatable)")
    p.add_argument(
        "--workers", type=int, default=1, help="list the N worker endpoints of serve --workers N"
    )
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--failure-mode-allow", action="store_true")
    p.add_argument("--sidecar-ca", help="CA that signed the sidecar's certificate (TLS)")
    p.add_argument("--client-cert", help="Envoy's client certificate (mTLS)")
    p.add_argument("--client-key", help="Envoy's client key (mTLS)")
    p.add_argument("-o", "--output")
    p.set_defaults(func=_cmd_envoy_config)

    p = sub.add_parser("dev", help="run the local stack: Envoy + sidecar + demo upstream")
    p.add_argument("--config", default=str(DEFAULT_DEV_CONFIG))
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--upstream-port", type=int, default=8080)
    p.add_argument("--duration", type=float, default=0.0, help="stop after N s (0: Ctrl-C)")
    p.set_defaults(func=_cmd_dev)

    from extproc import scaffold

    scaffold.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
