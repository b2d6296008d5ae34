"""TLS and mTLS between Envoy and the sidecar (``server.tls``): Envoy with its client
certificate gets through; plaintext, no client certificate, or one from another CA do not."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.envoy_config import TlsSpec
from extproc.testing.processes import SidecarProcess
from tests.faults.harness import Stack, budget, sidecar_spec_with
from tests.support import TRANSPORTS

pytestmark = pytest.mark.e2e

SERVER_NAME = "extproc.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, pem


def make_pki(directory: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    ca_key, rogue_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _cert("test-ca", ca_key, None, ca=True)
    rogue_ca = _cert("rogue-ca", rogue_key, None, ca=True)
    out["ca"], _ = _write(directory, "ca", ca, ca_key)
    for name, issuer, server in (
        ("server", (ca.subject, ca_key), True),
        ("client", (ca.subject, ca_key), False),
        ("rogue", (rogue_ca.subject, rogue_key), False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        out[f"{name}_crt"], out[f"{name}_key"] = _write(
            directory, name, _cert(name, key, issuer, server=server), key
        )
    return out


def credentials(pki: dict[str, Path], client: str | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}_crt"].read_bytes() if client else None,
    )


def check(target: str, creds: grpc.ChannelCredentials | None) -> str:
    options = [("grpc.enable_http_proxy", 0), ("grpc.ssl_target_name_override", SERVER_NAME)]
    channel = (
        grpc.secure_channel(target, creds, options=options)
        if creds is not None
        else grpc.insecure_channel(target, options=options)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2.0
            )
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class TlsSidecar(SidecarProcess):
    """Started means SERVING over mTLS (the helper's own check is plaintext)."""

    pki: dict[str, Path] = {}

    def health(self, timeout: float = 1.0) -> str:
        return check(self.grpc_target, credentials(self.pki, "client"))


@pytest.mark.parametrize("transport", TRANSPORTS)
@budget(60)
async def test_mtls_between_envoy_and_the_sidecar(
    tmp_path: Path, figures: dict[str, Any], monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    pki = make_pki(tmp_path)
    cfg = tmp_path / "extproc.yaml"
    cfg.write_text(
        "version: 1\n"
        "server:\n"
        "  drain_delay_s: 0\n"
        f"  transport: {transport}\n"
        f"  tls: {{cert_file: {pki['server_crt']}, key_file: {pki['server_key']},"
        f" client_ca_file: {pki['ca']}}}\n"
        "plugins:\n"
        "  - plugin: headers\n"
        "    config: {rules: [{path_prefix: /, request_set: {x-added: 'yes'}}]}\n"
    )
    TlsSidecar.pki = pki
    monkeypatch.setattr("tests.faults.harness.SidecarProcess", TlsSidecar)
    tls = TlsSpec(
        cert_file=str(pki["client_crt"]),
        key_file=str(pki["client_key"]),
        ca_file=str(pki["ca"]),
        server_name=SERVER_NAME,
    )
    async with Stack([cfg], spec_changes=lambda s: sidecar_spec_with(s, tls=tls)) as stack:
        responses = [await stack.http.get(f"/r{i}") for i in range(20)]
        target = stack.sidecars[0].grpc_target
        direct = {
            "mtls": check(target, credentials(pki, "client")),
            "no_client_cert": check(target, credentials(pki, None)),
            "rogue_client_cert": check(target, credentials(pki, "rogue")),
            "plaintext": check(target, None),
        }
        assert stack.envoy is not None
        stats = stack.envoy.stats("cluster.extproc.ssl")
    figures["through_envoy"] = [r.status_code for r in responses].count(200)
    figures["direct"] = direct
    assert all(r.status_code == 200 and r.json()["headers"]["x-added"] == "yes" for r in responses)
    assert direct["mtls"] == "SERVING"
    assert direct["no_client_cert"] != "SERVING"
    assert direct["rogue_client_cert"] != "SERVING"
    assert direct["plaintext"] != "SERVING"
    assert stats.get("cluster.extproc.ssl.handshake", 0) >= 1
