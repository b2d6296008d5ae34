"""Helpers shared by the test suites."""

from __future__ import annotations

from typing import get_args

from extproc.config import ServerSettings

#: every ``server.transport`` the config accepts: the suites that take one run on each
TRANSPORTS: tuple[str, ...] = get_args(ServerSettings.model_fields["transport"].annotation)
