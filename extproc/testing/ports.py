"""Free TCP ports on 127.0.0.1 for test and benchmark processes, chosen below the kernel's
ephemeral range.

A port the OS hands out for ``bind(0)`` comes from the ephemeral range, the same range every
outgoing connection takes its local port from. Between choosing such a port and the server
binding it, any process that connects somewhere (a sidecar to Redis, an exporter to its
collector) may be given it, and the server then fails with "address already in use". A port
below the range is never handed to an outgoing connection; it is checked free when chosen,
and never chosen twice by one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Final

__all__ = ["free_port"]

_HOST: Final = "127.0.0.1"
#: where the search starts; below it lie the well-known and registered services we avoid
_LOWEST: Final = 20_000
_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def free_port(attempts: int = 200) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that no outgoing connection
    will be given. Another listener may still take it before you bind it: prefer port 0 where
    the server can report the port it got (Envoy does)."""
    top = _ephemeral_start()
    if top - _LOWEST >= 1_000:
        for _ in range(attempts):
            port = random.randrange(_LOWEST, top)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    # no room below the ephemeral range (an unusual sysctl): let the OS choose
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        chosen: int = sock.getsockname()[1]
    _given.add(chosen)
    return chosen
