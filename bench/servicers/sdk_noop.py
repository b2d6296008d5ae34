"""envoy-extproc-sdk's own no-op processor (``BaseExtProcService``), served on 127.0.0.1.

Runs with the separate venv's Python (``bench/.venvs/sdk``): the SDK's protos come from
xds-protos and would clash with ours in one process, so this file imports nothing of ours.

The SDK's ``create_server`` binds ``[::]``; this file builds the same server (its servicer,
default grpc.aio options) on the address it is given instead. Its ``health`` module imports
``grpc_health_check``, a module no published package provides; it is aliased here to
``grpc_health`` from grpcio-health-checking (the same generated code under another name).
Tracing (ddtrace) is left as the SDK ships it; the harness sets ``DD_TRACE_ENABLED=false``, as
an operator without a Datadog agent would.

    bench/.venvs/sdk/bin/python bench/servicers/sdk_noop.py 127.0.0.1:50051
"""

from __future__ import annotations

import asyncio
import signal
import sys


def _alias_health_module() -> None:
    import grpc_health
    import grpc_health.v1
    import grpc_health.v1.health_pb2
    import grpc_health.v1.health_pb2_grpc

    sys.modules.setdefault("grpc_health_check", grpc_health)
    sys.modules.setdefault("grpc_health_check.v1", grpc_health.v1)
    sys.modules.setdefault("grpc_health_check.v1.health_pb2", grpc_health.v1.health_pb2)
    sys.modules.setdefault("grpc_health_check.v1.health_pb2_grpc", grpc_health.v1.health_pb2_grpc)


async def serve(listen: str) -> None:
    import grpc

    _alias_health_module()
    from envoy_extproc_sdk import BaseExtProcService
    from envoy_extproc_sdk.util.envoy import add_ExternalProcessorServicer_to_server

    server = grpc.aio.server()
    add_ExternalProcessorServicer_to_server(BaseExtProcService(), server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"envoy-extproc-sdk BaseExtProcService on {listen}", flush=True)
    await stop.wait()
    await server.stop(1.0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
