"""gRPC over TLS and mTLS, with certificates reloaded from disk, on both transports."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import parse_config
from extproc.server import Server
from extproc.testing.certs import CertFiles, make_certificates
from extproc.testing.processes import free_port
from tests.support import TRANSPORTS


async def _check(target: str, creds: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(target, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        return int(resp.status)


def _creds(files: CertFiles, cert: Path | None = None, key: Path | None = None):  # type: ignore[no-untyped-def]
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _server(
    files: CertFiles, mtls: bool, transport: str, client_ca: Path | None = None
) -> tuple[Server, str]:
    ca = f", client_ca_file: {client_ca or files.ca}" if mtls else ""
    text = (
        f"server: {{admin: '', drain_delay_s: 0, transport: {transport}, tls: {{"
        f"cert_file: {files.server_cert}, key_file: {files.server_key}{ca}"
        "}}\n"
    )
    port = free_port()
    server = Server(parse_config(text), listen=f"127.0.0.1:{port}", admin="")
    await server.start()
    return server, f"localhost:{port}"


async def test_tls_serves_and_plaintext_is_refused(tmp_path: Path, transport: str) -> None:
    files = make_certificates(tmp_path)
    server, target = await _server(files, mtls=False, transport=transport)
    try:
        assert await _check(target, _creds(files)) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    finally:
        await server.stop()


async def test_mtls_requires_a_client_certificate_from_the_ca(
    tmp_path: Path, transport: str
) -> None:
    files = make_certificates(tmp_path)
    server, target = await _server(files, mtls=True, transport=transport)
    try:
        good = _creds(files, files.client_cert, files.client_key)
        assert await _check(target, good) == health_pb2.HealthCheckResponse.SERVING
        for creds in (_creds(files), _creds(files, files.rogue_cert, files.rogue_key)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _check(target, creds)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_rotated_certificates_are_used_for_new_connections(
    tmp_path: Path, transport: str
) -> None:
    first = make_certificates(tmp_path / "one")
    server, target = await _server(first, mtls=False, transport=transport)
    try:
        assert await _check(target, _creds(first)) == health_pb2.HealthCheckResponse.SERVING
        second = make_certificates(tmp_path / "two")  # a new CA and server certificate
        first.server_cert.write_bytes(second.server_cert.read_bytes())
        first.server_key.write_bytes(second.server_key.read_bytes())
        assert await _check(target, _creds(second)) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError):
            await _check(target, _creds(first))  # the old CA no longer verifies the server
    finally:
        await server.stop()


async def test_http2_keeps_its_certificate_while_a_rotation_is_half_written(
    tmp_path: Path,
) -> None:
    """The certificate is replaced, its key not yet: the pair does not load, the old one keeps
    serving new connections; once the key follows, the new pair is served."""
    first = make_certificates(tmp_path / "one")
    server, target = await _server(first, mtls=False, transport="http2")
    try:
        second = make_certificates(tmp_path / "two")
        first.server_cert.write_bytes(second.server_cert.read_bytes())
        assert await _check(target, _creds(first)) == health_pb2.HealthCheckResponse.SERVING
        first.server_key.write_bytes(second.server_key.read_bytes())
        assert await _check(target, _creds(second)) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


def _trust(bundle: Path, *cas: Path) -> None:
    """Write the client CA bundle; its modification time moves on even within one tick of the
    file system's clock (the server notices a change by it)."""
    before = bundle.stat().st_mtime_ns if bundle.exists() else 0
    bundle.write_bytes(b"".join(ca.read_bytes() for ca in cas))
    os.utime(bundle, ns=(before + 1_000_000_000, before + 1_000_000_000))


async def test_a_client_ca_removed_from_the_bundle_is_refused_without_a_restart(
    tmp_path: Path, transport: str
) -> None:
    files = make_certificates(tmp_path)
    bundle = tmp_path / "client-cas.pem"
    _trust(bundle, files.ca, files.other_ca)
    server, target = await _server(files, mtls=True, transport=transport, client_ca=bundle)
    good = _creds(files, files.client_cert, files.client_key)
    rogue = _creds(files, files.rogue_cert, files.rogue_key)
    try:
        assert await _check(target, rogue) == health_pb2.HealthCheckResponse.SERVING
        _trust(bundle, files.ca)  # the rogue CA is no longer trusted
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _check(target, rogue)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _check(target, good) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


def _tls_client(files: CertFiles, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # to connect without SNI too (the certificate is checked)
    context.load_verify_locations(cafile=files.ca)
    context.load_cert_chain(files.rogue_cert, files.rogue_key)
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    return context


def _connect(
    context: ssl.SSLContext, port: int, session: ssl.SSLSession | None, sni: bool = True
) -> tuple[bool, ssl.SSLSession | None, bool]:
    """(the server let us in: its HTTP/2 SETTINGS arrived, the session, it was resumed)."""
    name = "localhost" if sni else None  # Envoy sends no SNI unless its config names one
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=name, session=session) as tls:
                tls.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                head = tls.recv(9)  # a frame header: type 4 is SETTINGS
                return len(head) == 9 and head[3] == 4, tls.session, tls.session_reused
        except (ssl.SSLError, ConnectionError):
            return False, None, False


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
VERSIONS = pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)


@VERSIONS
async def test_no_tls_session_of_a_removed_client_ca_resumes(
    tmp_path: Path, version: ssl.TLSVersion, transport: str
) -> None:
    """A resumed TLS session skips the client certificate's verification: once a CA is removed
    from the bundle, a client it signed must not come back on a session from before. grpc.aio
    gets there by a new TLS context per change, whose sessions are new; on http2 (the
    listener's context keeps the session cache) mTLS connections never resume. Without mTLS
    sessions do resume on both (which shows that this test sees a resumption)."""
    files = make_certificates(tmp_path)
    bundle = tmp_path / "client-cas.pem"
    _trust(bundle, files.ca, files.other_ca)
    client = _tls_client(files, version)
    for mtls in (False, True):
        server, target = await _server(files, mtls=mtls, transport=transport, client_ca=bundle)
        port = int(target.rpartition(":")[2])
        try:
            admitted, session, _ = await asyncio.to_thread(_connect, client, port, None)
            assert admitted and session is not None
            admitted, _, resumed = await asyncio.to_thread(_connect, client, port, session)
            assert admitted
            if not mtls:
                assert resumed
            elif transport == "http2":
                assert not resumed
            if mtls:
                _trust(bundle, files.ca)
                for sni in (True, False):
                    admitted, _, _ = await asyncio.to_thread(_connect, client, port, session, sni)
                    assert not admitted, f"sni={sni}"
                    admitted, _, _ = await asyncio.to_thread(_connect, client, port, None, sni)
                    assert not admitted, f"sni={sni}"
        finally:
            await server.stop()


async def test_http2_handshakes_that_never_finish_neither_block_others_nor_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that opens TCP and stays silent, and one that talks plaintext to the TLS port:
    neither keeps a TLS client out; the silent one is dropped after the handshake timeout,
    and a stop does not wait for it."""
    monkeypatch.setattr("extproc.http2.TLS_HANDSHAKE_TIMEOUT_S", 1.0)
    files = make_certificates(tmp_path)
    server, target = await _server(files, mtls=True, transport="http2")
    port = int(target.rpartition(":")[2])
    loop = asyncio.get_running_loop()
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
    plain_reader, plain = await asyncio.open_connection("127.0.0.1", port)
    plain.write(PREFACE + b"\x00" * 64)
    try:
        await asyncio.wait_for(plain_reader.read(), 5)  # the server's alert, if any, then EOF
        assert plain_reader.at_eof()
        good = _creds(files, files.client_cert, files.client_key)
        assert await _check(target, good) == health_pb2.HealthCheckResponse.SERVING
        assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # dropped
    finally:
        began = loop.time()
        await server.stop()
        took = loop.time() - began
        silent.close()
        plain.close()
    assert took < 5, f"the stop took {took:.1f} s"
