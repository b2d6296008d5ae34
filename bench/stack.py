"""The scenarios and the processes behind them: one Envoy (``--concurrency 1``) with one
listener per scenario, each answering from a ``direct_response`` route (an upstream that costs
almost nothing), the sidecars / servicers the listeners call, and one Redis when needed.

Everything binds 127.0.0.1 on ports the OS picks; :class:`Stack` stops every process it
started, by pid, when its ``with`` block ends (also on Ctrl-C or an error).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench.envoy_native import NativeLimits, native_filters
from bench.procs import Proc, ensure_sdk_venv, process_tree, wait_tcp
from bench.report import BASE_SUFFIX
from bench.traffic import AUDIENCE, ISSUER, Traffic
from extproc.envoy_config import (
    BootstrapSpec,
    DirectResponse,
    ExtProcSpec,
    ListenerSpec,
    ProcessingModeSpec,
    SidecarSpec,
    render,
)
from extproc.testing.otlp import OtlpSink
from extproc.testing.processes import EnvoyProcess, SidecarProcess, free_port
from extproc.testing.redis_server import RedisServer

__all__ = [
    "HOT_LIMIT",
    "SCENARIOS",
    "ListenerPlan",
    "Scenario",
    "Stack",
    "compose_bootstrap",
    "scenario",
]

REPO = Path(__file__).resolve().parents[1]

#: limits of the throughput scenarios: far above what one machine can send per user
OPEN_LIMIT = 100_000
#: the ``-hot`` scenarios' one key for all traffic: this many requests a second, far below
#: what the sidecar serves, so it is crossed early in every second
HOT_LIMIT = 1_000


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    #: none | native | bare-idiomatic | bare-fast | bare-coalesced | bare-http2 |
    #: bare-http2-redis | extproc | sdk (and the optional bare-eof, bare-fast-redis, bare-h2lib)
    backend: str
    #: plugins of an extproc backend: () | ("hdr",) | ("noop",) | ("jwt",) | ("jwt", "rl")
    plugins: tuple[str, ...] = ()
    batch: int = 100
    #: most requests are expected to be denied (429)
    deny: bool = False
    #: ``extproc serve --workers N``
    workers: int = 1
    #: rate_limit's ``redis_pipeline`` (False: the shared redis-py pool)
    pipeline: bool = True
    #: only with ``--scenarios`` (comparisons for development, not in --full)
    optional: bool = False
    #: ``server.coalesce_replies_ms`` (None: the default)
    coalesce_ms: float | None = None
    #: the share of streams traced (None: :data:`TRACE_RATIO`; 0: tracing off)
    trace_ratio: float | None = None
    #: more of rate_limit's ``batch`` settings (development comparisons)
    batch_extra: tuple[tuple[str, Any], ...] = ()
    #: more ``server`` settings (development comparisons)
    server_extra: tuple[tuple[str, Any], ...] = ()
    #: rate_limit's ``grant_ahead`` (allow keys far below their limits before Redis answers)
    grant_ahead: bool = False
    #: rate_limit counts all traffic under one key (``key: [method]``) limited to this many
    #: requests a second (None: a key per user, ``OPEN_LIMIT``)
    hot_limit: int | None = None
    #: ``server.transport`` (grpcio: grpc.aio; http2: extproc's own HTTP/2)
    transport: str = "grpcio"
    #: bare-fast / bare-http2: µs of Python spun per request (a stand-in for a plugin's work)
    burn_us: float = 0.0
    #: the Redis floors: each round trip runs the rate limiter's script (one hit), not INCR
    redis_script: bool = False
    #: run the sidecar from this source tree (``--baseline``: an earlier commit) instead
    source: Path | None = None

    @property
    def needs_redis(self) -> bool:
        return "rl" in self.plugins or self.backend in ("bare-http2-redis", "bare-fast-redis")

    @property
    def denies(self) -> bool:
        """429s are expected: the scenario's limits are reached on purpose."""
        return self.deny or self.hot_limit is not None

    @property
    def sidecar(self) -> bool:
        return self.backend not in ("none", "native")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("passthrough", "Envoy passthrough (no ext_proc)", "none"),
    Scenario("native", "Envoy jwt_authn + local_ratelimit", "native"),
    Scenario("bare-idiomatic", "bare grpc.aio, async generator", "bare-idiomatic"),
    Scenario(
        "bare-fast", "bare grpc.aio, read/write + uvloop + raw bytes + early end", "bare-fast"
    ),
    Scenario(
        "bare-coalesced",
        "bare-fast + reply coalescing when saturated (as extproc)",
        "bare-coalesced",
    ),
    Scenario(
        "bare-eof",
        "bare-fast reading until Envoy closes the stream (no early end)",
        "bare-eof",
        optional=True,
    ),
    Scenario(
        "bare-http2",
        "bare servicer on extproc.http2 (transport http2's floor) + uvloop + early end",
        "bare-http2",
    ),
    Scenario(
        "bare-http2-redis",
        "bare-http2 + one Redis round trip (INCR) per request: the floor of a Redis-backed "
        "decision",
        "bare-http2-redis",
    ),
    Scenario(
        "bare-fast-redis",
        "bare-fast + one Redis round trip (INCR) per request: grpc.aio's floor of a "
        "Redis-backed decision",
        "bare-fast-redis",
        optional=True,
    ),
    *(
        Scenario(
            f"{base}-script",
            f"{base} with the rate limiter's script (EVALSHA, one hit) as the round trip",
            base,
            optional=True,
            redis_script=True,
        )
        for base in ("bare-http2-redis", "bare-fast-redis")
    ),
    *(
        Scenario(
            f"{base}-burn{us}",
            f"{base} spinning {us} µs of Python per request (a stand-in for a plugin's work)",
            base,
            optional=True,
            burn_us=float(us),
        )
        for base, us in (
            ("bare-fast", 100),
            ("bare-fast", 300),
            ("bare-http2", 100),
            ("bare-http2", 300),
            ("bare-fast-redis", 300),
            ("bare-http2-redis", 300),
        )
    ),
    Scenario(
        "bare-h2lib",
        "bare servicer on the h2 library (no grpc.aio) + uvloop + early end",
        "bare-h2lib",
        optional=True,
    ),
    Scenario("extproc", "extproc, no plugins", "extproc"),
    Scenario("extproc-jwt", "extproc + jwt_auth", "extproc", ("jwt",)),
    Scenario(
        "extproc-jwt-rl", "extproc + jwt_auth + rate_limit (batched)", "extproc", ("jwt", "rl")
    ),
    Scenario(
        "extproc-jwt-rl-b1",
        "extproc + jwt_auth + rate_limit (batch_size 1)",
        "extproc",
        ("jwt", "rl"),
        batch=1,
    ),
    Scenario(
        "extproc-jwt-rl-w2",
        "extproc + jwt_auth + rate_limit (batched), --workers 2",
        "extproc",
        ("jwt", "rl"),
        workers=2,
    ),
    Scenario("sdk", "envoy-extproc-sdk no-op (PyPI)", "sdk"),
    Scenario(
        "extproc-deny",
        "extproc + jwt_auth + rate_limit, mostly 429",
        "extproc",
        ("jwt", "rl"),
        deny=True,
    ),
    Scenario("native-deny", "Envoy jwt_authn + local_ratelimit, mostly 429", "native", deny=True),
    Scenario(
        "extproc-jwt-rl-pool",
        "extproc-jwt-rl over the redis-py pool (redis_pipeline: false)",
        "extproc",
        ("jwt", "rl"),
        pipeline=False,
        optional=True,
    ),
    *(
        Scenario(
            f"{key}-nc",
            f"{key} without reply coalescing (coalesce_replies_ms: 0)",
            "extproc",
            plugins,
            coalesce_ms=0.0,
            optional=True,
        )
        for key, plugins in (
            ("extproc", ()),
            ("extproc-jwt", ("jwt",)),
            ("extproc-jwt-rl", ("jwt", "rl")),
        )
    ),
    Scenario(
        "extproc-hdr",
        "extproc + headers (one fixed request header): the cost of one trivial plugin",
        "extproc",
        ("hdr",),
        optional=True,
    ),
    Scenario(
        "extproc-noop",
        "extproc + headers matching no path: a plugin that runs and changes nothing",
        "extproc",
        ("noop",),
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-ifw0",
        "extproc-jwt-rl, no wait behind a round trip in flight (in_flight_wait_ms: 0)",
        "extproc",
        ("jwt", "rl"),
        batch_extra=(("in_flight_wait_ms", 0.0),),
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-mw0",
        "extproc-jwt-rl, never gathering for company (max_wait_ms: 0)",
        "extproc",
        ("jwt", "rl"),
        batch_extra=(("max_wait_ms", 0.0),),
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-if8",
        "extproc-jwt-rl with 8 round trips in flight at once (max_in_flight: 8)",
        "extproc",
        ("jwt", "rl"),
        batch_extra=(("max_in_flight", 8),),
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-nt",
        "extproc-jwt-rl with tracing off (no span of any stream)",
        "extproc",
        ("jwt", "rl"),
        trace_ratio=0.0,
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-nowd",
        "extproc-jwt-rl without the loop-lag watchdog (loop_lag_threshold_ms: 0)",
        "extproc",
        ("jwt", "rl"),
        server_extra=(("loop_lag_threshold_ms", 0),),
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-wd1s",
        "extproc-jwt-rl with a 1 s loop-lag threshold (the watchdog's thread looks ~1/s, "
        "not ~20/s; the loop still beats 100/s)",
        "extproc",
        ("jwt", "rl"),
        server_extra=(("loop_lag_threshold_ms", 1000),),
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-ahead",
        "extproc-jwt-rl with grant_ahead (opt-in; answers before Redis, counts all the same)",
        "extproc",
        ("jwt", "rl"),
        grant_ahead=True,
        optional=True,
    ),
    Scenario(
        "extproc-jwt-rl-ahead-w2",
        "extproc-jwt-rl-ahead with --workers 2 (share 0.5 each: workers x share = 1)",
        "extproc",
        ("jwt", "rl"),
        grant_ahead=True,
        workers=2,
        optional=True,
    ),
    *(
        Scenario(
            f"extproc-jwt-rl{ahead}-hot{w2}",
            f"one key for all traffic at {HOT_LIMIT:,} req/s (crossed every second)"
            f"{', grant_ahead' if ahead else ''}{', --workers 2' if w2 else ''}",
            "extproc",
            ("jwt", "rl"),
            grant_ahead=bool(ahead),
            workers=2 if w2 else 1,
            hot_limit=HOT_LIMIT,
            optional=True,
        )
        for ahead in ("", "-ahead")
        for w2 in ("", "-w2")
    ),
    Scenario(
        "extproc-jwt-rl-b1-pool",
        "extproc-jwt-rl-b1 over the redis-py pool (redis_pipeline: false)",
        "extproc",
        ("jwt", "rl"),
        batch=1,
        pipeline=False,
        optional=True,
    ),
)


#: scenarios run again with ``server.transport: http2`` as ``<key>-h2``: (key, in the full run)
HTTP2_TWINS: tuple[tuple[str, bool], ...] = (
    ("extproc", True),
    ("extproc-jwt", False),
    ("extproc-jwt-rl", True),
    ("extproc-jwt-rl-w2", True),
    ("extproc-jwt-rl-nc", False),
    ("extproc-jwt-rl-ifw0", False),
    ("extproc-jwt-rl-mw0", False),
    ("extproc-jwt-rl-if8", False),
    ("extproc-jwt-rl-nt", False),
    ("extproc-jwt-rl-nowd", False),
    ("extproc-jwt-rl-ahead", True),
    ("extproc-jwt-rl-ahead-w2", False),
    ("extproc-jwt-rl-hot", False),
    ("extproc-jwt-rl-hot-w2", False),
    ("extproc-jwt-rl-ahead-hot", False),
    ("extproc-jwt-rl-ahead-hot-w2", False),
)


def _http2_twin(s: Scenario, full: bool) -> Scenario:
    return replace(
        s,
        key=f"{s.key}-h2",
        title=f"{s.title}, transport http2",
        transport="http2",
        optional=not full,
    )


SCENARIOS += tuple(
    _http2_twin(next(s for s in SCENARIOS if s.key == key), full) for key, full in HTTP2_TWINS
)


def scenario(key: str) -> Scenario:
    for s in SCENARIOS:
        if s.key == key:
            return s
    raise KeyError(f"unknown scenario {key!r}; known: {', '.join(s.key for s in SCENARIOS)}")


def baseline_tree(rev: str, into: Path) -> tuple[str, Path]:
    """Extract commit ``rev`` of this repository into ``into/<sha>`` (``git archive``); its
    short sha and the tree."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    tree = into / f"baseline-{sha}"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", sha],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return sha, tree


def with_baseline(chosen: Sequence[Scenario], sha: str, tree: Path) -> list[Scenario]:
    """Each extproc scenario followed by its twin from the baseline tree: the same config and
    traffic, in the same rounds, so the two are compared like any other pair."""
    out: list[Scenario] = []
    for s in chosen:
        out.append(s)
        if s.backend == "extproc":
            out.append(
                replace(s, key=s.key + BASE_SUFFIX, title=f"{s.title} at {sha}", source=tree)
            )
    return out


# ---------------------------------------------------------------------------- Envoy bootstrap


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """One listener of the shared Envoy: ``filters`` (before the router) replace the ext_proc
    filter when given; ``ext_proc`` + ``endpoints`` configure it otherwise; neither means
    passthrough."""

    name: str
    filters: Sequence[dict[str, Any]] | None = None
    ext_proc: ExtProcSpec | None = None
    endpoints: tuple[str, ...] = ()


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def compose_bootstrap(plans: Sequence[ListenerPlan]) -> dict[str, Any]:
    """One bootstrap with a listener (and an ext_proc cluster, where used) per plan, rendered
    with extproc's own typed renderer so the listener settings are the production ones (less
    the access log, which every scenario would pay alike)."""
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for plan in plans:
        cluster_name = f"extproc_{plan.name}"
        spec = BootstrapSpec(
            listener=ListenerSpec(port=0, access_log=False),
            upstream=DirectResponse(status=200, body="ok\n"),
            sidecar=SidecarSpec(endpoints=plan.endpoints or ("127.0.0.1:9",), health_check=None),
            ext_proc=plan.ext_proc or ExtProcSpec(),
        )
        data = render(spec)
        base = base or data
        listener = data["static_resources"]["listeners"][0]
        listener["name"] = plan.name
        hcm = _hcm(listener)
        hcm["stat_prefix"] = plan.name
        router = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
        if plan.ext_proc is not None and plan.endpoints:
            ext_proc = hcm["http_filters"][0]
            ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster_name
            ext_proc["typed_config"]["stat_prefix"] = plan.name
            cluster = data["static_resources"]["clusters"][0]
            cluster["name"] = cluster_name
            cluster["load_assignment"]["cluster_name"] = cluster_name
            clusters.append(cluster)
        else:
            hcm["http_filters"] = [*copy.deepcopy(list(plan.filters or ())), *router]
        listeners.append(listener)
    assert base is not None
    out = copy.deepcopy(base)
    out["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return out


# ---------------------------------------------------------------------------- sidecar configs


#: rate_limit's ``grant_ahead`` in the ``-ahead`` scenarios. What a key's last answer said is
#: used for 5 minutes (the default is 10 s): between two rounds of a scenario the harness runs
#: every other one, up to ~2 minutes, and the steady state measured is that of keys in use.
#: One sidecar alone counts each key, so knowledge of any age is safe (config.py).
GRANT_AHEAD: dict[str, Any] = {"enabled": True, "max_age_ms": 300_000}

#: the share of streams traced in every extproc scenario (the sidecar's default)
TRACE_RATIO = 0.01


def _key_prefix(key: str) -> str:
    """rate_limit's ``key_prefix`` for a scenario: its key, within the 32 characters allowed
    (a long one, e.g. a ``-base`` twin's, keeps its start and a digest of the whole)."""
    prefix = key.replace("-", "_")
    if len(prefix) <= 32:
        return prefix
    return f"{prefix[:23]}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def sidecar_config(
    s: Scenario, traffic: Traffic, redis_url: str | None, otlp_endpoint: str | None = None
) -> dict[str, Any]:
    plugins: list[dict[str, Any]] = []
    if "hdr" in s.plugins or "noop" in s.plugins:
        prefix = "/api/" if "hdr" in s.plugins else "/nowhere/"
        rule = {"path_prefix": prefix, "request_set": {"x-bench": "1"}}
        plugins.append({"plugin": "headers", "config": {"rules": [rule]}})
    if "jwt" in s.plugins:
        plugins.append(
            {
                "plugin": "jwt_auth",
                "config": {
                    "providers": {
                        "idp": {
                            "issuer": ISSUER,
                            "audiences": [AUDIENCE],
                            "jwks": {"inline": traffic.jwks},
                            "claim_to_headers": [{"claim": "sub", "header": "x-user"}],
                        }
                    }
                },
            }
        )
    if "rl" in s.plugins:
        limit: dict[str, Any] = {"requests": OPEN_LIMIT, "per": "second"}
        name, key = "per_user", "claim:sub"
        if s.hot_limit is not None:
            limit, name, key = {"requests": s.hot_limit, "per": "second"}, "hot", "method"
        elif s.deny:
            limit = {"requests": 1, "per": "minute"}
        counted = {"name": name, "key": [key], "limits": [limit]}
        plugins.append(
            {
                "plugin": "rate_limit",
                "config": {
                    "key_prefix": _key_prefix(s.key),
                    "rules": [counted],
                    "batch": {"max_batch": s.batch, **dict(s.batch_extra)},
                    "redis_pipeline": s.pipeline,
                    **({"grant_ahead": GRANT_AHEAD} if s.grant_ahead else {}),
                },
            }
        )
    server: dict[str, Any] = {"admin": None, "drain_delay_s": 0, "shutdown_grace_s": 1}
    if s.coalesce_ms is not None:
        server["coalesce_replies_ms"] = s.coalesce_ms
    if s.transport != "grpcio":
        server["transport"] = s.transport
    server.update(s.server_extra)
    config: dict[str, Any] = {"version": 1, "server": server, "plugins": plugins}
    ratio = TRACE_RATIO if s.trace_ratio is None else s.trace_ratio
    if otlp_endpoint and ratio:
        # production-like: 1 % of streams traced, exported over OTLP/gRPC
        config["tracing"] = {
            "exporter": "otlp",
            "otlp_endpoint": otlp_endpoint,
            "sample_ratio": ratio,
        }
    if s.needs_redis:
        config["redis"] = {"url": redis_url}
    return config


# ---------------------------------------------------------------------------- the stack


@dataclass
class Running:
    """A scenario's listener port and the process behind it (if any)."""

    scenario: Scenario
    proc: Proc | SidecarProcess | None = None
    address: str = ""
    endpoints: tuple[str, ...] = ()
    ext_proc: ExtProcSpec | None = None
    port: int = 0
    #: the sidecar's admin address (extproc scenarios: the harness reads the batcher's and
    #: the plugin hooks' histograms from /metrics between samples); "" when off
    admin: str = ""
    #: starts the sidecar and waits until it serves (again, after :meth:`Stack.stop_sidecar`)
    start: Callable[[], None] | None = None


class Stack:
    """Start with ``with Stack(scenarios, traffic, workdir) as stack:``."""

    def __init__(self, scenarios: Sequence[Scenario], traffic: Traffic, workdir: Path) -> None:
        self.scenarios = list(scenarios)
        self.traffic = traffic
        self.workdir = workdir
        self.running: dict[str, Running] = {}
        self.redis: RedisServer | None = None
        #: where the sidecars' sampled spans go (the collector's place)
        self.otlp: OtlpSink | None = None
        self.envoy: EnvoyProcess | None = None
        self._stack = contextlib.ExitStack()
        self.commands: list[str] = []
        #: scenarios whose sidecar is stopped now (:meth:`stop_sidecar`)
        self.stopped: set[str] = set()

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if any(s.needs_redis for s in self.scenarios):
            self.redis = self._stack.enter_context(RedisServer())
            self.commands.append(
                f"redis-server --port {self.redis.port} --bind 127.0.0.1 --save ''"
            )
        if any(s.backend == "extproc" for s in self.scenarios):
            self.otlp = self._stack.enter_context(OtlpSink())
        starts: list[Callable[[], None]] = []
        for s in self.scenarios:
            run = Running(s)
            self.running[s.key] = run
            if s.sidecar:
                run.start = self._sidecar(run)
                starts.append(run.start)
        _side_by_side(starts)
        plans = [self._plan(self.running[s.key]) for s in self.scenarios]
        bootstrap = compose_bootstrap(plans)
        envoy = EnvoyProcess(bootstrap, workdir=self.workdir / "envoy", startup_timeout=60)
        self.envoy = self._stack.enter_context(envoy)
        self.commands.append(
            f"envoy -c {envoy.config_path} --disable-hot-restart --concurrency 1 -l warning"
        )
        ports = envoy.listener_ports
        for s in self.scenarios:
            self.running[s.key].port = ports[s.key]

    def _plan(self, run: Running) -> ListenerPlan:
        s = run.scenario
        if s.backend == "none":
            return ListenerPlan(s.key)
        if s.backend == "native":
            limits = NativeLimits(1, 60) if s.deny else NativeLimits(OPEN_LIMIT, 1)
            filters = native_filters(ISSUER, AUDIENCE, self.traffic.jwks, limits)
            return ListenerPlan(s.key, filters=filters)
        ext_proc = run.ext_proc or ExtProcSpec(
            processing_mode=ProcessingModeSpec(), request_attributes=()
        )
        return ListenerPlan(s.key, ext_proc=ext_proc, endpoints=run.endpoints or (run.address,))

    def _sidecar(self, run: Running) -> Callable[[], None]:
        """Prepare the scenario's sidecar; the returned call starts it and waits for it."""
        s = run.scenario
        address = run.address = f"127.0.0.1:{_free_ports(s.workers)}"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if s.backend == "extproc":
            path = self.workdir / f"{s.key}.yaml"
            redis_url = self.redis.url if self.redis else None
            otlp = self.otlp.endpoint if self.otlp else None
            path.write_text(yaml.safe_dump(sidecar_config(s, self.traffic, redis_url, otlp)))
            run.ext_proc = _ext_proc_for(path)
            extra = (
                ("--no-watch",) if s.workers == 1 else ("--no-watch", "--workers", str(s.workers))
            )
            if s.workers > 1:
                from extproc.supervisor import worker_addresses

                run.endpoints = tuple(worker_addresses(address, s.workers))
            # the harness reads the rate limiter's batching and every hook's duration there
            run.admin = f"127.0.0.1:{free_port()}"
            sidecar = SidecarProcess(
                path,
                listen=address,
                admin=run.admin,
                extra_args=extra,
                workdir=self.workdir / s.key,
                startup_timeout=60,
                source_root=s.source,
            )
            self.commands.append(
                (f"PYTHONPATH={s.source} " if s.source else "")
                + f"python -m extproc serve --config {path} --listen {address} "
                f"--admin '{run.admin}' " + " ".join(extra)
            )
            run.proc = sidecar
            self._stack.callback(sidecar.stop)
            return sidecar.start
        if s.backend in (
            "bare-idiomatic", "bare-fast", "bare-fast-redis", "bare-coalesced", "bare-eof"
        ):  # fmt: skip
            style = s.backend.removeprefix("bare-")
            argv = [
                sys.executable,
                "-m",
                "bench.servicers.bare",
                "--style",
                style,
                "--listen",
                address,
            ]
        elif s.backend in ("bare-http2", "bare-http2-redis", "bare-h2lib"):
            style = {"bare-http2": "own", "bare-http2-redis": "own-redis"}.get(s.backend, "h2lib")
            argv = [sys.executable, "-m", "bench.servicers.h2_bare", "--style", style]
            argv += ["--listen", address]
        else:  # sdk
            python = ensure_sdk_venv(self.workdir / "sdk-pip.log")
            argv = [str(python), str(REPO / "bench" / "servicers" / "sdk_noop.py"), address]
            env = dict(os.environ, DD_TRACE_ENABLED="false")
            env.pop("PYTHONPATH", None)
        if s.backend.startswith("bare-"):  # both bare servicers take the floor's options
            if self.redis is not None and s.needs_redis:
                argv += ["--redis", f"127.0.0.1:{self.redis.port}"]
            if s.burn_us:
                argv += ["--burn-us", str(s.burn_us)]
            if s.redis_script:
                argv += ["--redis-script"]
        self.commands.append(" ".join(argv))
        proc = Proc(s.key, argv, self.workdir, env=env, cwd=REPO)
        run.proc = proc
        self._stack.callback(proc.stop)
        host, _, port = address.rpartition(":")

        def start() -> None:
            proc.start()
            wait_tcp(host, int(port), 60, alive=proc)

        return start

    def port(self, key: str) -> int:
        return self.running[key].port

    def stop_sidecar(self, key: str) -> None:
        """Stop ``key``'s sidecar, every process of it (SIGTERM, then SIGKILL); Envoy keeps
        its listener and cluster, and :meth:`start_sidecar` brings it back on the same
        addresses (its caches cold)."""
        run = self.running[key]
        if run.proc is not None and key not in self.stopped:
            run.proc.stop()
            self.stopped.add(key)

    def start_sidecar(self, key: str) -> None:
        """Start ``key``'s sidecar again after :meth:`stop_sidecar` and wait until it serves
        (a no-op when it runs)."""
        run = self.running[key]
        if key in self.stopped:
            assert run.start is not None
            run.start()
            self.stopped.discard(key)

    def alone(self, key: str) -> bool:
        """Leave ``key``'s sidecar the only one running, as one sidecar per Envoy is: every
        other scenario's stopped (not paused: a paused one lengthened the measured tail,
        docs/performance.md "The stack's size"), and ``key``'s started again if it was
        stopped. True when it was: its caches are cold, and a measurement wants it warmed
        first."""
        for other in self.running:
            if other != key:
                self.stop_sidecar(other)
        if key in self.stopped:
            self.start_sidecar(key)
            return True
        return False

    def start_stopped(self) -> None:
        """Start every stopped sidecar again, side by side, and wait until all serve."""
        _side_by_side([functools.partial(self.start_sidecar, key) for key in self.stopped])

    def sidecar_pids(self, key: str) -> list[int]:
        """The scenario's sidecar process and its children (workers), at this moment."""
        proc = self.running[key].proc
        pid = proc.pid if proc is not None else None
        return process_tree(pid) if pid else []


def _side_by_side(starts: Sequence[Callable[[], None]]) -> None:
    """Run the sidecar starts at once (each blocks until its process serves: booting them
    one after another would take their sum); the first failure is raised."""
    with ThreadPoolExecutor(max_workers=max(1, len(starts))) as pool:
        for done in [pool.submit(start) for start in starts]:
            done.result()


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports that were free a moment ago."""
    import socket

    for _ in range(50):
        first = free_port()
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + n):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {n} consecutive free ports")


def _ext_proc_for(path: Path) -> ExtProcSpec:
    """The ext_proc filter extproc's own renderer gives this config, except that a sidecar
    with no plugins still gets the request headers (else Envoy would open no stream at all
    and the scenario would measure nothing)."""
    from extproc.cli import envoy_spec_for
    from extproc.config import load_config

    spec = envoy_spec_for(load_config(path))
    ext_proc: ExtProcSpec = spec.ext_proc  # type: ignore[attr-defined]
    if not ext_proc.processing_mode.request_headers:
        ext_proc = ExtProcSpec(
            processing_mode=ProcessingModeSpec(),
            message_timeout_ms=ext_proc.message_timeout_ms,
            max_message_timeout_ms=ext_proc.max_message_timeout_ms,
            request_attributes=ext_proc.request_attributes,
            receiving_namespaces=ext_proc.receiving_namespaces,
        )
    return ext_proc
