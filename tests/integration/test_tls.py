"""gRPC over TLS and mTLS, with certificates reloaded from disk, on both transports."""

from __future__ import annotations

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


async def _server(files: CertFiles, mtls: bool, transport: str) -> tuple[Server, str]:
    ca = f", client_ca_file: {files.ca}" if mtls else ""
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
