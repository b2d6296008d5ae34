"""Secrets from the environment or from files (Kubernetes secret volumes), never from config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SecretNotFoundError", "Secrets"]


class SecretNotFoundError(KeyError):
    """The named secret is in neither place. The message names the places, never a value."""


class Secrets:
    """Resolve ``env:NAME`` or ``file:/path`` references; a bare name means ``env:NAME``.

    Values are read when asked for (file secrets may be rotated on disk) and are never logged.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def get(self, ref: str) -> str:
        kind, sep, name = ref.partition(":")
        if not sep:
            kind, name = "env", ref
        if kind == "env":
            try:
                return self._environ[name]
            except KeyError:
                raise SecretNotFoundError(f"environment variable {name} is not set") from None
        if kind == "file":
            try:
                return Path(name).read_text().strip()
            except OSError as exc:
                raise SecretNotFoundError(f"secret file {name}: {exc.strerror}") from None
        raise SecretNotFoundError(f"unknown secret reference kind {kind!r} (use env: or file:)")
