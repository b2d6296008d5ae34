"""The deployment files, checked without a Docker engine (none runs on our machines).

* ``docker-compose.yml`` validates against the Compose specification's schema, mounts the same
  ``envoy/envoy.yaml`` and sidecar config the rest of the repository uses, and its Envoy start
  script produces a config the real Envoy 1.40 binary accepts;
* ``deploy/compose/extproc.yaml`` passes ``extproc check``;
* every metric the Grafana dashboard and the alert rules name exists in a LIVE ``/metrics`` of
  a sidecar running the compose configuration (real Redis, the demo token issuer, requests
  driven through it), or in the live ``/stats/prometheus`` of a real Envoy running the compose
  Envoy config, with the labels the queries use;
* the Kubernetes manifest has the expected containers, probes and shutdown budget, and its
  embedded configs are valid (``extproc check``, ``envoy --mode validate``);
* the Dockerfile's default config path is the one the compose file mounts.

A missing Envoy binary, redis-server or check-jsonschema fails these tests: they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.config import load_config
from extproc.server import Server
from extproc.testing.fake_envoy import EnvoyMode, FakeEnvoy
from extproc.testing.processes import EnvoyProcess, envoy_binary, free_port
from extproc.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
SIDECAR_CONFIG = COMPOSE_DIR / "extproc.yaml"
ENVOY_START = COMPOSE_DIR / "envoy-start.sh"
ENVOY_OVERRIDES = COMPOSE_DIR / "envoy-overrides.yaml"
ALERTS = COMPOSE_DIR / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "extproc.json"
POD = ROOT / "deploy" / "kubernetes" / "pod.yaml"
DOCKERFILE = ROOT / "Dockerfile"

#: services that share the `pod` container's network namespace (like containers in a pod)
POD_MEMBERS = {"envoy", "extproc", "upstream", "jwks"}
#: an extra instance of the headers plugin the live test adds: its forbidden mutation makes
#: the sidecar refuse it, so the series of extproc_mutations_dropped_total exists
MUTATION_PROBE = {
    "plugin": "headers",
    "name": "mutation_probe",
    "config": {"rules": [{"path_prefix": "/probe/", "request_set": {"x-envoy-probe": "1"}}]},
}
#: labels Prometheus adds at scrape time, and the histogram bucket label
SCRAPE_LABELS = {"job", "instance", "le"}
#: metrics Prometheus itself produces (scrape health), not the targets
PROMETHEUS_OWN = {"up"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(COMPOSE_FILE)
    return data


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes of a service: container path -> host path (relative to the repo)."""
    out: dict[str, str] = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "use the short volume syntax in docker-compose.yml"
        host, container, *_ = volume.split(":")
        out[container] = host
    return out


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env
    )


# ---------------------------------------------------------------------------- (a) schema


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = _run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_are_complete_pinned_and_healthchecked() -> None:
    services = _compose()["services"]
    expected = {"pod", "envoy", "extproc", "upstream", "jwks", "redis", "otel-collector",
                "jaeger", "prometheus", "grafana"}  # fmt: skip
    assert expected <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
    for name in ("envoy", "extproc", "upstream", "jwks", "redis", "prometheus"):
        assert "healthcheck" in services[name], f"{name} needs a healthcheck"
    envoy_deps = services["envoy"]["depends_on"]
    assert envoy_deps["extproc"]["condition"] == "service_healthy"
    assert services["extproc"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["extproc"]["depends_on"]["jwks"]["condition"] == "service_healthy"


# ---------------------------------------------------------------------------- (b) same files


def test_pod_members_share_one_network_namespace_and_only_the_pod_publishes_ports() -> None:
    services = _compose()["services"]
    for name in POD_MEMBERS:
        assert services[name].get("network_mode") == "service:pod", name
        assert "ports" not in services[name], f"{name}: publish ports on `pod` instead"
    published = {int(p.rsplit(":", 1)[1]) for p in services["pod"]["ports"]}
    assert {10000, 9902, 9180, 9000} <= published


def test_compose_mounts_the_same_envoy_yaml_and_the_sidecar_config() -> None:
    services = _compose()["services"]
    envoy_mounts = _mounts(services["envoy"])
    assert envoy_mounts["/etc/envoy/envoy.yaml"] == "./envoy/envoy.yaml"
    assert envoy_mounts["/etc/envoy/compose/envoy-start.sh"] == "./deploy/compose/envoy-start.sh"
    assert (
        envoy_mounts["/etc/envoy/compose/envoy-overrides.yaml"]
        == "./deploy/compose/envoy-overrides.yaml"
    )
    # no other service brings its own Envoy config
    for name, service in services.items():
        if name != "envoy":
            assert not any(
                "envoy" in host and host.endswith(".yaml") for host in _mounts(service).values()
            )
    assert (
        _mounts(services["extproc"])["/etc/extproc/extproc.yaml"] == "./deploy/compose/extproc.yaml"
    )
    for name, service in services.items():
        for host in _mounts(service).values():
            assert (ROOT / host).exists(), f"{name} mounts {host}, which does not exist"
    # the start script's defaults are the mount points
    script = ENVOY_START.read_text()
    assert "/etc/envoy/envoy.yaml" in script
    assert "/etc/envoy/compose/envoy-overrides.yaml" in script


def test_envoy_start_script_changes_only_the_listener_bind_and_envoy_accepts_it(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "ENVOY_BIN": envoy_binary(),
        "ENVOY_CONFIG": str(ENVOY_YAML),
        "ENVOY_OVERRIDES": str(ENVOY_OVERRIDES),
        "ENVOY_RUN_DIR": str(tmp_path),
    }
    result = _run(["sh", str(ENVOY_START), "--mode", "validate", "--disable-hot-restart"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
    original = ENVOY_YAML.read_text().splitlines()
    effective = (tmp_path / "envoy.yaml").read_text().splitlines()
    assert len(original) == len(effective)
    changed = [(a, b) for a, b in zip(original, effective, strict=True) if a != b]
    assert changed == [
        (
            "        socket_address: { address: 127.0.0.1, port_value: 10000 }",
            "        socket_address: { address: 0.0.0.0, port_value: 10000 }",
        )
    ]


def _endpoint(envoy: dict[str, Any], cluster: str) -> str:
    for c in envoy["static_resources"]["clusters"]:
        if c["name"] == cluster:
            sock = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            return f"{sock['socket_address']['address']}:{sock['socket_address']['port_value']}"
    raise AssertionError(f"no cluster {cluster}")


def _ext_proc_filter(envoy: dict[str, Any]) -> dict[str, Any]:
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for f in hcm["typed_config"]["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            config: dict[str, Any] = f["typed_config"]
            return config
    raise AssertionError("no ext_proc filter")


def _seconds(value: str) -> float:
    return float(value.rstrip("s"))


def test_compose_sidecar_config_matches_envoy_yaml() -> None:
    envoy = _yaml(ENVOY_YAML)
    server = load_config(SIDECAR_CONFIG).config.server
    assert server.listen == _endpoint(envoy, "extproc")
    ext_proc = _ext_proc_filter(envoy)
    assert server.message_timeout_ms == round(_seconds(ext_proc["message_timeout"]) * 1000)
    assert server.max_message_timeout_ms == round(_seconds(ext_proc["max_message_timeout"]) * 1000)
    assert server.allow_mode_override == ext_proc["allow_mode_override"]
    namespaces = set(ext_proc["metadata_options"]["receiving_namespaces"]["untyped"])
    for entry, cls, _ in load_config(SIDECAR_CONFIG).plugins:
        assert f"extproc.{entry.name or cls.name}" in namespaces
    # the demo upstream listens where envoy.yaml's demo_upstream cluster points
    assert "127.0.0.1:8080" in (COMPOSE_DIR / "demo_upstream.py").read_text()
    assert _endpoint(envoy, "demo_upstream") == "127.0.0.1:8080"


def test_demo_issuer_settings_match_the_sidecar_config() -> None:
    jwks = _compose()["services"]["jwks"]["environment"]
    (entry,) = [p for p in _yaml(SIDECAR_CONFIG)["plugins"] if p["plugin"] == "jwt_auth"]
    provider = entry["config"]["providers"]["demo"]
    assert provider["issuer"] == jwks["DEMO_ISSUER"]
    assert provider["audiences"] == [jwks["DEMO_AUDIENCE"]]
    port = jwks["DEMO_ISSUER_LISTEN"].rsplit(":", 1)[1]
    assert provider["jwks"]["uri"] == f"http://127.0.0.1:{port}/.well-known/jwks.json"


# ---------------------------------------------------------------------------- (c) check


def test_compose_sidecar_config_passes_extproc_check() -> None:
    result = _run([str(BIN / "extproc"), "check", "--config", str(SIDECAR_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jwt_auth" in result.stdout and "rate_limit" in result.stdout


def test_compose_sidecar_exports_spans_to_the_collector_in_plaintext() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    tracing = load_config(SIDECAR_CONFIG).config.tracing
    assert tracing.exporter == "otlp" and tracing.otlp_endpoint
    exporter = OTLPSpanExporter(endpoint=tracing.otlp_endpoint)
    try:
        # the collector listens without TLS: a bare host:port would make the exporter use TLS
        assert exporter._insecure
        assert exporter._endpoint == "otel-collector:4317"
    finally:
        exporter.shutdown()
    assert "otel-collector" in _compose()["services"]
    receivers = _yaml(COMPOSE_DIR / "otel-collector.yaml")["receivers"]
    assert receivers["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


# ---------------------------------------------------------------------------- (d) metrics

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression (label names, functions and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\w+", " ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Label names each metric selector of the expression matches on."""
    out: dict[str, set[str]] = {}
    for name, inner in _SELECTOR.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        out.setdefault(name, set()).update(_MATCHER.findall(inner))
    return out


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in _GROUPING.findall(expr)
        for label in group.split(",")
        if label.strip()
    }


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, str) and var.get("type") == "query":
            exprs.append(query)
    return exprs


def alert_exprs() -> list[str]:
    return [rule["expr"] for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (plugin, le) (rate(extproc_plugin_duration_seconds_bucket{plugin=~"a|b"}[5m]))'
        ' / on (instance) group_left max(envoy_cluster_membership_healthy{envoy_cluster_name="x"})'
        " > 0 and up == 1"
    )
    assert metric_names(expr) == {
        "extproc_plugin_duration_seconds_bucket",
        "envoy_cluster_membership_healthy",
        "up",
    }
    assert selector_labels(expr) == {
        "extproc_plugin_duration_seconds_bucket": {"plugin"},
        "envoy_cluster_membership_healthy": {"envoy_cluster_name"},
    }
    assert grouping_labels(expr) == {"plugin", "le", "instance"}


class Exposition:
    """A Prometheus text exposition: declared families and the labels seen on samples."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind
            elif line and not line.startswith("#"):
                name, _, rest = line.partition("{")
                name = name.split(" ")[0]
                labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', rest)) if rest else set()
                self.labels.setdefault(name, set()).update(labels)

    def family(self, name: str) -> str | None:
        """The declared family a sample name belongs to (histogram suffixes stripped)."""
        if name in self.types:
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) == "histogram":
                return base
        return None

    def sample_labels(self, name: str) -> set[str] | None:
        return self.labels.get(name)


def check_exprs(exprs: list[str], sidecar: Exposition, envoy: Exposition) -> list[str]:
    """Every problem with the metric names and labels of the expressions."""
    problems: list[str] = []
    for expr in exprs:
        names = metric_names(expr)
        seen_labels: set[str] = set(SCRAPE_LABELS)
        for name in sorted(names):
            if name in PROMETHEUS_OWN:
                continue
            if name.startswith("extproc_"):
                source, where = sidecar, "the sidecar's /metrics"
            elif name.startswith("envoy_"):
                source, where = envoy, "Envoy's /stats/prometheus"
            else:
                problems.append(f"{name}: neither extproc_* nor envoy_* (in {expr!r})")
                continue
            family = source.family(name)
            if family is None:
                problems.append(f"{name}: not in {where}")
                continue
            labels = source.sample_labels(name)
            if labels is None:
                problems.append(f"{name}: declared but no series in {where}")
                continue
            seen_labels |= labels
            wanted = selector_labels(expr).get(name, set()) - SCRAPE_LABELS
            if not wanted <= labels:
                problems.append(f"{name}: no label {sorted(wanted - labels)} in {where}")
        missing = grouping_labels(expr) - seen_labels
        if missing:
            problems.append(f"grouping by {sorted(missing)}: no such label in {expr!r}")
    return problems


def test_dashboard_and_alerts_parse_and_cover_the_panels_asked_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "extproc"
    exprs = dashboard_exprs()
    names = set().union(*(metric_names(e) for e in exprs))
    for needed in (
        "extproc_messages_total",
        "extproc_plugin_decisions_total",
        "extproc_plugin_duration_seconds_bucket",
        "extproc_plugin_errors_total",
        "extproc_active_streams",
        "extproc_config_generation",
        "extproc_config_reloads_total",
        "extproc_loop_stalls_total",
        "extproc_jwt_auth_token_cache_total",
        "extproc_jwt_auth_failures_total",
        "extproc_rate_limit_decisions_total",
        "extproc_rate_limit_redis_round_trips_total",
        "extproc_rate_limit_breaker_state",
    ):
        assert needed in names, f"the dashboard has no panel on {needed}"
    assert sum("histogram_quantile(0.99" in e for e in exprs) >= 1
    assert all(
        rule.get("alert") and rule.get("expr")
        for g in _yaml(ALERTS)["groups"]
        for rule in g["rules"]
    )
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = _yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    assert {"uid": "prometheus", "url": "http://prometheus:9090"}.items() <= datasources[0].items()
    providers = _yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    grafana = _mounts(_compose()["services"]["grafana"])
    assert grafana[providers[0]["options"]["path"]] == "./deploy/grafana/dashboards"
    prometheus = _mounts(_compose()["services"]["prometheus"])
    assert prometheus["/etc/prometheus/alerts.yml"] == "./deploy/compose/alerts.yml"
    assert _yaml(COMPOSE_DIR / "prometheus.yml")["rule_files"] == ["/etc/prometheus/alerts.yml"]


@contextlib.contextmanager
def demo_issuer(port: int) -> Iterator[str]:
    """deploy/compose/demo_issuer.py in a subprocess on 127.0.0.1:port; yields its base URL."""
    env = {**os.environ, **_compose()["services"]["jwks"]["environment"]}
    env["DEMO_ISSUER_LISTEN"] = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(COMPOSE_DIR / "demo_issuer.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        for _ in range(300):
            assert proc.poll() is None, "the demo issuer exited"
            try:
                with opener.open(base + "/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("the demo issuer did not start")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def live_sidecar_config(tmp_path: Path, redis_url: str, jwks_port: int) -> Path:
    """deploy/compose/extproc.yaml with only its addresses moved to this test's processes."""
    data = _yaml(SIDECAR_CONFIG)
    data["server"]["listen"] = "127.0.0.1:0"
    data["server"]["admin"] = "127.0.0.1:0"
    data["server"]["drain_delay_s"] = 0
    data["redis"]["url"] = redis_url
    data["tracing"] = {"exporter": "none"}
    for entry in data["plugins"]:
        if entry["plugin"] == "jwt_auth":
            jwks = entry["config"]["providers"]["demo"]["jwks"]
            jwks["uri"] = re.sub(r":\d+/", f":{jwks_port}/", jwks["uri"])
    data["plugins"].append(MUTATION_PROBE)
    path = tmp_path / "extproc.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def scrape_live_sidecar(tmp_path: Path) -> str:
    """Run the compose configuration in process, drive requests through it, return /metrics."""
    with RedisServer() as redis_server, demo_issuer(free_port()) as issuer:
        config = live_sidecar_config(tmp_path, redis_server.url, int(issuer.rsplit(":", 1)[1]))
        port = free_port()
        server = Server(
            load_config(config),
            config_path=str(config),
            listen=f"127.0.0.1:{port}",
            admin="127.0.0.1:0",
        )
        await server.start()
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10.0) as http:
                token = (await http.get(f"{issuer}/token", params={"sub": "alice"})).json()
                gold = await http.get(f"{issuer}/token", params={"sub": "bob", "tier": "gold"})
                envoy = FakeEnvoy.connect(f"127.0.0.1:{port}", EnvoyMode(response_headers=True))
                attrs = {"source.address": "10.1.2.3:4567"}
                bearer = {"authorization": f"Bearer {token['access_token']}"}
                try:
                    ok = await envoy.request(path="/hello", headers=bearer, attributes=attrs)
                    again = await envoy.request(path="/hello", headers=bearer, attributes=attrs)
                    gold_ok = await envoy.request(
                        path="/hello",
                        headers={"authorization": f"Bearer {gold.json()['access_token']}"},
                        attributes=attrs,
                    )
                    missing = await envoy.request(path="/hello", attributes=attrs)
                    garbage = await envoy.request(
                        path="/hello", headers={"authorization": "Bearer x.y.z"}, attributes=attrs
                    )
                    forbidden = await envoy.request(
                        path="/admin/x", headers=bearer, attributes=attrs
                    )
                    public = await envoy.request(path="/public/x", attributes=attrs)
                    probe = await envoy.request(path="/probe/x", headers=bearer, attributes=attrs)
                finally:
                    await envoy.aclose()
                assert (ok.status, again.status, gold_ok.status) == (200, 200, 200)
                assert ok.upstream_header("x-user") == "alice"
                assert ok.upstream_header("x-extproc") == "hello from extproc"
                assert (missing.status, garbage.status, forbidden.status) == (401, 401, 403)
                assert public.status == 200
                assert probe.status == 200 and probe.upstream_header("x-envoy-probe") is None
                # a stall of the event loop (blocking it is the point), so the stall counter
                # has a series
                stall = 4 * load_config(config).config.server.loop_lag_threshold_ms / 1000
                time.sleep(stall)  # noqa: ASYNC251
                await asyncio.sleep(0.2)
                # a reload, so the reload counter has a series
                config.write_text(config.read_text() + "\n# touched by the test\n")
                assert await server.reload()
                admin = f"http://127.0.0.1:{server._admin.port}"
                response = await http.get(f"{admin}/metrics")
                assert response.status_code == 200
                return response.text
        finally:
            await server.stop()


def live_envoy_stats(tmp_path: Path) -> str:
    """A real Envoy running the compose Envoy config (ports from the OS): /stats/prometheus."""
    env = {
        **os.environ,
        "ENVOY_BIN": envoy_binary(),
        "ENVOY_CONFIG": str(ENVOY_YAML),
        "ENVOY_OVERRIDES": str(ENVOY_OVERRIDES),
        "ENVOY_RUN_DIR": str(tmp_path),
    }
    result = _run(["sh", str(ENVOY_START), "--mode", "validate", "--disable-hot-restart"], env)
    assert result.returncode == 0, result.stderr
    bootstrap = compose_effective_envoy(_yaml(tmp_path / "envoy.yaml"))
    for listener in bootstrap["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    with EnvoyProcess(bootstrap, workdir=tmp_path / "envoy-run") as envoy:
        return envoy.admin_get("/stats/prometheus")


def compose_effective_envoy(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with envoy-overrides.yaml merged as Envoy's --config-yaml does (lists append)."""
    out = copy.deepcopy(base)
    overrides = _yaml(ENVOY_OVERRIDES)["static_resources"]
    out["static_resources"]["listeners"] += overrides["listeners"]
    out["static_resources"]["clusters"] += overrides["clusters"]
    return out


@pytest.mark.redis
@pytest.mark.e2e
async def test_every_dashboard_and_alert_metric_exists_live(tmp_path: Path) -> None:
    sidecar = Exposition(await scrape_live_sidecar(tmp_path))
    (tmp_path / "envoy-run").mkdir()
    envoy = Exposition(await asyncio.to_thread(live_envoy_stats, tmp_path))
    problems = check_exprs(dashboard_exprs(), sidecar, envoy)
    problems += check_exprs(alert_exprs(), sidecar, envoy)
    assert not problems, "\n".join(problems)
    # the plugins' own families are really there (a renamed metric fails here, not in Grafana)
    assert sidecar.family("extproc_jwt_auth_failures_total")
    assert sidecar.family("extproc_rate_limit_redis_round_trips_total")


# ---------------------------------------------------------------------------- (e) Kubernetes


def _k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(POD.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_kubernetes_pod_has_the_sidecars_probes_and_a_shutdown_budget() -> None:
    docs = _k8s()
    spec = docs["Deployment/extproc-demo"]["spec"]["template"]["spec"]
    init = {c["name"]: c for c in spec.get("initContainers", [])}
    main = {c["name"]: c for c in spec["containers"]}
    assert set(init) == {"extproc"} and {"envoy", "app"} <= set(main)
    extproc, envoy = init["extproc"], main["envoy"]
    assert extproc["restartPolicy"] == "Always"  # a native sidecar: stops after Envoy
    assert extproc["args"] == ["serve", "--config", "/etc/extproc/extproc.yaml"]
    assert extproc["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert extproc["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert extproc["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/ready"
    for container in (extproc, envoy, main["app"]):
        assert container["resources"]["requests"], container["name"]
    ports = {p["name"]: p["containerPort"] for p in extproc["ports"]}
    assert ports == {"grpc": 50051, "admin": 9180}

    config_text = docs["ConfigMap/extproc-config"]["data"]["extproc.yaml"]
    server = yaml.safe_load(config_text)["server"]
    assert server["admin"].endswith(":9180") and server["admin"].startswith("0.0.0.0")
    pre_stop = max(
        _pre_stop_seconds(c) for c in spec["containers"] if c.get("lifecycle", {}).get("preStop")
    )
    needed = pre_stop + server["drain_delay_s"] + server["shutdown_grace_s"]
    assert spec["terminationGracePeriodSeconds"] >= needed + 5


def _pre_stop_seconds(container: dict[str, Any]) -> float:
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    (seconds,) = re.findall(r"sleep (\d+)", " ".join(hook["exec"]["command"]))
    return float(seconds)


def test_kubernetes_configs_are_valid(tmp_path: Path) -> None:
    docs = _k8s()
    config = tmp_path / "extproc.yaml"
    config.write_text(docs["ConfigMap/extproc-config"]["data"]["extproc.yaml"])
    env = {**os.environ, "REDIS_PASSWORD": "test"}
    result = _run([str(BIN / "extproc"), "check", "--config", str(config)], env)
    assert result.returncode == 0, result.stdout + result.stderr

    envoy_text = docs["ConfigMap/extproc-envoy"]["data"]["envoy.yaml"]
    # exactly envoy/envoy.yaml + the pod's two changes (so the copy cannot drift)
    expected = compose_effective_envoy(_yaml(ENVOY_YAML))
    for listener in expected["static_resources"]["listeners"]:
        if listener["name"] == "ingress":
            listener["address"]["socket_address"]["address"] = "0.0.0.0"
    assert yaml.safe_load(envoy_text) == expected
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_text)
    result = _run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- (f) Dockerfile


def _dockerfile_json(instruction: str) -> list[str]:
    (line,) = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith(instruction + " ")]
    value: list[str] = json.loads(line[len(instruction) + 1 :])
    return value


def test_dockerfile_default_config_is_where_compose_mounts_it() -> None:
    cmd = _dockerfile_json("CMD")
    assert _dockerfile_json("ENTRYPOINT") == ["extproc"]
    assert cmd[:2] == ["serve", "--config"]
    extproc = _compose()["services"]["extproc"]
    assert cmd[2] in _mounts(extproc)
    assert extproc["command"] == cmd
    text = DOCKERFILE.read_text()
    assert 'pip install -c constraints.txt ".[otlp]"' in text
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS runtime$", text, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^EXPOSE 50051 9180$", text, re.M)
    assert "/healthz" in text and "HEALTHCHECK" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :][:1] == ["*"] and "!extproc/" in ignored
