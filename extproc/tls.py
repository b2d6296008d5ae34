"""Server TLS for the gRPC port, with certificates re-read from disk when they change.

grpc's dynamic credentials ask a fetcher for the configuration on each new TLS handshake; the
fetcher compares the files' modification times and hands over new certificates only when they
changed (cert-manager and Kubernetes secret volumes rotate them in place). Envoy keeps its
HTTP/2 connections to the sidecar open, so handshakes - and file checks - are rare.

The http2 transport checks the files the same way at each handshake (:class:`ServerTls`) and
builds a new :class:`ssl.SSLContext` when they changed; the listener's context hands each
handshake over to the newest one. A new context rather than the live one changed in place: an
OpenSSL context can add trusted CAs but not drop one. With client certificates (mTLS) TLS
sessions are not resumed: a resumed session skips the client certificate's verification, so a
client whose CA was removed could come back on an old session.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from extproc.config import TlsSettings

__all__ = ["ServerTls", "server_credentials"]

log = logging.getLogger("extproc.tls")

T = TypeVar("T")


class _Certificates:
    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._stamp = self._mtimes()

    def _files(self) -> list[str]:
        s = self.settings
        return [f for f in (s.cert_file, s.key_file, s.client_ca_file) if f]

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(os.stat(f).st_mtime_ns for f in self._files())

    def config(self) -> Any:
        s = self.settings
        key = Path(s.key_file).read_bytes()
        cert = Path(s.cert_file).read_bytes()
        ca = Path(s.client_ca_file).read_bytes() if s.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self, load: Callable[[], T]) -> T | None:
        """``load()``'s result when a file changed since the last successful load, else None.
        A failed load is logged and tried again next time; the old certificates stay."""
        try:
            stamp = self._mtimes()
            with self._lock:
                if stamp == self._stamp:
                    return None
                loaded = load()
                self._stamp = stamp
        except Exception as exc:  # keep serving with the certificates we have
            log.error("TLS certificates could not be reloaded", extra={"error": repr(exc)})
            return None
        log.info("TLS certificates reloaded", extra={"cert_file": self.settings.cert_file})
        return loaded

    def fetch(self) -> Any:
        """Called by grpc on each handshake: a new configuration, or None to keep the old."""
        return self.reload(self.config)


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; mTLS when ``client_ca_file`` is set."""
    certs = _Certificates(settings)
    return grpc.dynamic_ssl_server_credentials(
        certs.config(),
        certs.fetch,
        require_client_authentication=settings.client_ca_file is not None,
    )


class ServerTls:
    """TLS 1.2+ with ALPN ``h2`` for :class:`extproc.http2.Http2Server`; mTLS when
    ``client_ca_file`` is set. :attr:`context` is the listener's: at each handshake it hands
    the connection to :meth:`current`, built anew when a file changed, so a rotated
    certificate, key or CA bundle - a CA removed included - applies to the next connection."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._files = _Certificates(settings)
        # the listener's context is the first one handed over to (to itself: no change)
        self.context = self._current = self._build()
        self.context.sni_callback = self._handover  # called with or without SNI

    def _build(self) -> ssl.SSLContext:
        s = self.settings
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9113 9.2
        context.set_alpn_protocols(["h2"])
        context.load_cert_chain(s.cert_file, s.key_file)
        if s.client_ca_file:
            context.load_verify_locations(cafile=s.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
            # no resumption: every connection's client certificate is verified (against the
            # CAs of its moment). Envoy keeps its connections, so handshakes are rare.
            context.options |= ssl.OP_NO_TICKET
            context.num_tickets = 0
        return context

    def current(self) -> ssl.SSLContext:
        """The context for a new connection: a new one when a file changed and the new files
        load (a half-written rotation - a new certificate with the old key - does not: the
        old context stays, and the next handshake tries again)."""
        fresh = self._files.reload(self._build)
        if fresh is not None:
            self._current = fresh
        return self._current

    def _handover(self, conn: ssl.SSLSocket | ssl.SSLObject, _name: str | None, _: object) -> None:
        conn.context = self.current()
