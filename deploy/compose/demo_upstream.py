"""DEMO ONLY - the compose stack's upstream: the same echo server ``extproc dev`` starts.

Answers every request 200 with JSON describing what reached it (method, path, headers, body),
so you can see what the sidecar added or removed. Listens on 127.0.0.1:8080 inside the shared
network namespace, where ``envoy/envoy.yaml``'s ``demo_upstream`` cluster expects it.

Settings (environment): DEMO_UPSTREAM_LISTEN (host:port, default 127.0.0.1:8080).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal

from extproc.testing.processes import EchoUpstream

LISTEN = os.environ.get("DEMO_UPSTREAM_LISTEN", "127.0.0.1:8080")


async def main() -> None:
    host, _, port = LISTEN.rpartition(":")
    upstream = EchoUpstream(host=host or "127.0.0.1", port=int(port))
    # EchoUpstream keeps every request for tests to inspect; a long-running demo keeps the last
    # few only, so memory stays flat under load.
    upstream.requests = collections.deque(maxlen=100)  # type: ignore[assignment]
    await upstream.start()
    print(f"DEMO echo upstream (not for production) on {LISTEN}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await upstream.stop()


if __name__ == "__main__":
    asyncio.run(main())
