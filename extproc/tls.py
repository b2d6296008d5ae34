"""Server TLS for the gRPC port, with certificates re-read from disk when they change.

grpc's dynamic credentials ask a fetcher for the configuration on each new TLS handshake; the
fetcher compares the files' modification times and hands over new certificates only when they
changed (cert-manager and Kubernetes secret volumes rotate them in place). Envoy keeps its
HTTP/2 connections to the sidecar open, so handshakes - and file checks - are rare.

The http2 transport uses an :class:`ssl.SSLContext` (:class:`ServerTls`) checked the same way
each time a connection is accepted; a changed certificate and key are loaded into the live
context, which the following handshakes use.
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
    ``client_ca_file`` is set. :meth:`refresh` (called per accepted connection) reloads the
    certificate and key when their files changed. A changed ``client_ca_file`` is added to
    the trusted CAs (OpenSSL's context cannot drop one): removing a CA takes a restart."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._files = _Certificates(settings)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9113 9.2
        self.context.set_alpn_protocols(["h2"])
        self._load()
        if settings.client_ca_file:
            self.context.verify_mode = ssl.CERT_REQUIRED

    def _load(self, context: ssl.SSLContext | None = None) -> None:
        s = self.settings
        context = context or self.context
        context.load_cert_chain(s.cert_file, s.key_file)
        if s.client_ca_file:
            context.load_verify_locations(cafile=s.client_ca_file)

    def refresh(self) -> None:
        self._files.reload(self._swap)

    def _swap(self) -> bool:
        # OpenSSL installs the certificate before it finds that the key does not match: try
        # the files on a scratch context first, so a half-written rotation (new certificate,
        # old key) leaves the live one as it was; retried on the next accept
        self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        self._load()
        return True
