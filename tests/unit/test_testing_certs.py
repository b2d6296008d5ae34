"""``extproc.testing.certs``: the test certificates pass a strict verifier (what Python 3.13's
default context does), so TLS tests fail for what they test, not for the certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from extproc.testing.certs import CertFiles, make_certificates


def _handshake(files: CertFiles, *, client_cert: tuple[Path, Path] | None) -> None:
    """An in-memory TLS handshake: the server presents ``server_cert`` and asks for a client
    certificate verified against ``ca``; the client verifies strictly against ``ca``."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)
    server.load_verify_locations(files.ca)
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    client = ssl.create_default_context(cafile=str(files.ca))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    if client_cert is not None:
        client.load_cert_chain(*client_cert)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(10):
        for end, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            c.write(b"ping")  # TLS 1.3: the server checks the client's certificate here
            s_in.write(c_out.read())
            assert s.read(4) == b"ping"
            return
    raise AssertionError("handshake did not finish")


def test_server_and_client_certificates_verify_strictly(tmp_path: Path) -> None:
    files = make_certificates(tmp_path)
    _handshake(files, client_cert=(files.client_cert, files.client_key))


def test_a_client_certificate_from_the_other_ca_is_refused(tmp_path: Path) -> None:
    files = make_certificates(tmp_path)
    with pytest.raises(ssl.SSLError):
        _handshake(files, client_cert=(files.rogue_cert, files.rogue_key))
