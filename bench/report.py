"""Results -> ``latest.md`` (tables), ``latest.json`` (everything) and ``latest.png`` (chart)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "targets", "write_all", "write_chart", "write_markdown"]

REFERENCE_FAST = "bare-fast"
#: bare-fast plus extproc's reply coalescing: the fastest bare servicer we know
REFERENCE_COALESCED = "bare-coalesced"
#: the bare servicer on extproc's own HTTP/2 (``transport: http2``): the fastest of all
REFERENCE_HTTP2 = "bare-http2"
#: bare-http2 plus one Redis round trip per request: the floor of a Redis-backed decision
REFERENCE_REDIS = "bare-http2-redis"
REFERENCE_PASS = "passthrough"
#: key suffix of a scenario's twin run from the baseline commit (``--baseline``)
BASE_SUFFIX = "-base"
HEADLINE = "extproc-jwt-rl"
#: the headline scenario per transport (the grpcio one is the default configuration)
HEADLINES = (HEADLINE, HEADLINE + "-h2")
#: the same with ``--workers 2``
WORKERS = {HEADLINE: HEADLINE + "-w2", HEADLINE + "-h2": HEADLINE + "-w2-h2"}


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


_BATCHING = ("round_trips_per_req", "mean_batch", "wait_mean_us", "wait_p50_us", "wait_p99_us")


def _batching(samples: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Medians of what adaptive batching chose (samples without it are skipped)."""
    chosen = [x["batching"] for x in samples if x.get("batching")]
    if not chosen:
        return None
    out = {k: _median([b[k] for b in chosen]) for k in _BATCHING}
    if all("ahead_share" in b for b in chosen):  # results from before grant_ahead lack it
        out["ahead_share"] = _median([b["ahead_share"] for b in chosen])
    return out


def _hot(samples: Sequence[Mapping[str, Any]], limit: int) -> dict[str, float]:
    """One key limited to ``limit`` a second, crossed every second: the 200s per second, the
    most an exact limiter may allow per second in a sample of that length (it touches one
    fixed window more than it lasts whole seconds), and the requests grant_ahead allowed past
    the limit per second (medians over rounds)."""

    def per_s(x: Mapping[str, Any], n: float) -> float:
        return float(n) / max(1e-9, float(x["duration_s"]))

    return {
        "limit_per_s": float(limit),
        "allowed_per_s": _median([per_s(x, x["statuses"].get("200", 0)) for x in samples]),
        "bound_per_s": _median(
            [per_s(x, limit * (math.ceil(x["duration_s"]) + 1)) for x in samples]
        ),
        "over_per_s": _median(
            [per_s(x, (x.get("batching") or {}).get("over", 0.0)) for x in samples]
        ),
    }


def _hooks(samples: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Medians per plugin of its hook's time (samples without it are skipped)."""
    plugins: dict[str, list[Mapping[str, float]]] = {}
    for x in samples:
        for plugin, h in (x.get("hooks") or {}).items():
            plugins.setdefault(plugin, []).append(h)
    return {
        plugin: {k: _median([h[k] for h in hs]) for k in ("mean_us", "p50_us", "p99_us")}
        for plugin, hs in plugins.items()
    }


def _gc(samples: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Medians of the collector's pauses (samples without them are skipped)."""
    seen = [x["gc"] for x in samples if x.get("gc")]
    if not seen:
        return None
    return {k: _median([g[k] for g in seen]) for k in ("pauses_per_s", "share", "long_per_s")}


def _error_causes(samples: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The 5xx and socket errors of the samples by status, and the sidecar's plugin
    failures (``"<plugin> <kind>"``) that answered them, summed."""
    out: dict[str, int] = {}
    for x in samples:
        for status, n in x.get("statuses", {}).items():
            if status.startswith("5"):
                out[status] = out.get(status, 0) + n
        if x.get("socket_errors"):
            out["socket"] = out.get("socket", 0) + x["socket_errors"]
        for cause, n in (x.get("plugin_errors") or {}).items():
            out[cause] = out.get(cause, 0) + n
    return out


def summarize(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Medians over the rounds; ratios are taken within each round first."""
    out: dict[str, dict[str, Any]] = {}
    rounds = data["rounds"]
    for s in data["scenarios"]:
        key = s["key"]
        samples = [r[key] for r in rounds if key in r]
        if not samples:
            continue

        def ratio(ref: str, key: str = key) -> float:
            vals = [r[key]["rps"] / r[ref]["rps"] for r in rounds if key in r and ref in r]
            return _median(vals)

        row: dict[str, Any] = {
            "rps": _median([x["rps"] for x in samples]),
            "p50_ms": _median([x["latency_ms"]["p50"] for x in samples]),
            "p90_ms": _median([x["latency_ms"]["p90"] for x in samples]),
            "p99_ms": _median([x["latency_ms"]["p99"] for x in samples]),
            "vs_passthrough": ratio(REFERENCE_PASS),
            "vs_bare_fast": ratio(REFERENCE_FAST),
            "vs_bare_coalesced": ratio(REFERENCE_COALESCED),
            "vs_bare_http2": ratio(REFERENCE_HTTP2),
            "cpu_us": {
                part: _median([x["cpu_us"][part] for x in samples])
                for part in ("envoy", "sidecar", "redis")
            },
            "redis_cmds_per_req": _median([x["redis_cmds_per_req"] for x in samples]),
            "redis_client_cmds_per_req": _median(
                [x.get("redis_client_cmds_per_req", math.nan) for x in samples]
            ),
            "redis_round_trips_per_req": _median([x["redis_round_trips_per_req"] for x in samples]),
            "errors": sum(x["errors"] for x in samples),
            "client_errors": sum(x["client_errors"] for x in samples),
            "requests": sum(x["requests"] for x in samples),
            "share_429": _median(
                [x["statuses"].get("429", 0) / max(1, x["requests"]) for x in samples]
            ),
            "batching": _batching(samples),
            "hooks": _hooks(samples),
            "gc": _gc(samples),
            "error_causes": _error_causes(samples),
        }
        if s.get("hot_limit"):
            row["hot"] = _hot(samples, s["hot_limit"])
        lat = [r[key] for r in data.get("latency_rounds", []) if key in r]
        if lat:
            row["open_loop"] = {
                p: _median([x["latency_ms"][p] for x in lat])
                for p in ("p50", "p90", "p99", "p99.9")
            }
            row["open_loop"]["errors"] = sum(x["errors"] for x in lat)
            row["open_loop"]["achieved_rps"] = _median([x["extra"]["achieved_rps"] for x in lat])
            added = [
                r[key]["latency_ms"]["p99"] - r[REFERENCE_PASS]["latency_ms"]["p99"]
                for r in data["latency_rounds"]
                if key in r and REFERENCE_PASS in r
            ]
            row["open_loop"]["added_p99_ms"] = _median(added)
            row["open_loop"]["added_p99_ms_rounds"] = added
            row["open_loop"]["batching"] = _batching(lat)
            row["open_loop"]["hooks"] = _hooks(lat)
            row["open_loop"]["gc"] = _gc(lat)
            row["open_loop"]["error_causes"] = _error_causes(lat)
            clear = [
                r[key]["stalls"]["p99_clear"] - r[REFERENCE_PASS]["stalls"]["p99_clear"]
                for r in data["latency_rounds"]
                if "stalls" in r.get(key, {}) and "stalls" in r.get(REFERENCE_PASS, {})
            ]
            if clear:  # --stalls: the same, for the requests no foreign task's run overlapped
                row["open_loop"]["added_p99_clear_ms"] = _median(clear)
                row["open_loop"]["added_p99_clear_ms_rounds"] = clear
            machine = [x["machine"] for x in lat if "machine" in x]  # runs before it: none
            if machine:
                row["open_loop"]["machine"] = {
                    part: _median([m[part] for m in machine]) for part in ("busy", "steal")
                }
        out[key] = row
    return out


def targets(
    summary: Mapping[str, Mapping[str, Any]], notes: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The issue's targets for the headline scenario of each transport that ran, each with
    the measured value and whether it is met."""
    rows: list[dict[str, Any]] = []
    for key in HEADLINES:
        if key in summary:
            rows += _targets_of(key, summary, notes, prefix=len(rows) > 0 or key != HEADLINE)
    if not rows:
        return [{"target": f"{HEADLINE} not run", "value": None, "goal": "", "met": None}]
    return rows


def _targets_of(
    key: str,
    summary: Mapping[str, Mapping[str, Any]],
    notes: Mapping[str, str],
    *,
    prefix: bool,
) -> list[dict[str, Any]]:
    head = summary[key]
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | str | None, goal: str, ok: bool | None) -> None:
        name = f"`{key}`: {name}" if prefix else name
        rows.append({"target": name, "value": value, "goal": goal, "met": ok})

    def rps_of(key: str) -> float | None:
        row = summary.get(key)
        return row["rps"] if row else None

    # the fastest bare servicer of the run, over every transport: the lowest ratio
    candidates = [
        (ref, head.get(field))
        for ref, field in (
            (REFERENCE_FAST, "vs_bare_fast"),
            (REFERENCE_COALESCED, "vs_bare_coalesced"),
            (REFERENCE_HTTP2, "vs_bare_http2"),
        )
    ]
    measured = [(ref, v) for ref, v in candidates if v is not None and not math.isnan(v)]
    fastest = None
    if measured:
        fastest, value = min(measured, key=lambda c: c[1])
        add(f"throughput vs fastest bare servicer ({fastest})", value, ">= 0.90", value >= 0.9)
    if fastest == REFERENCE_HTTP2:
        grpc_aio = [(ref, v) for ref, v in measured if ref != REFERENCE_HTTP2]
        if grpc_aio:
            ref, v = min(grpc_aio, key=lambda c: c[1])
            add(f"throughput vs fastest bare grpc.aio servicer ({ref})", v, "(report)", None)
    idiomatic = rps_of("bare-idiomatic")
    if idiomatic:
        ratio = head["rps"] / idiomatic
        add("throughput vs idiomatic bare servicer", ratio, ">= 1.00", ratio >= 1.0)
    sdk = rps_of("sdk")
    if sdk:
        ratio = head["rps"] / sdk
        add("throughput vs envoy-extproc-sdk", ratio, ">= 1.50", ratio >= 1.5)
    added = head.get("open_loop", {}).get("added_p99_ms")
    if added is not None:
        add("added p99 over passthrough at the open-loop rate (ms)", added, "<= 2.0", added <= 2.0)
        rounds = head["open_loop"].get("added_p99_ms_rounds")
        if rounds:  # how firmly: the median of few noisy rounds can sit on either side
            within = sum(1 for r in rounds if r <= 2.0)
            add("open-loop rounds with added p99 <= 2 ms", f"{within} of {len(rounds)}", "-", None)
        clear = head["open_loop"].get("added_p99_clear_ms")
        if clear is not None:
            add(
                "the same, requests clear of foreign CPU stalls (`--stalls`, ms)",
                clear,
                "(report)",
                None,
            )
        floor = summary.get(REFERENCE_REDIS, {}).get("open_loop", {}).get("added_p99_ms")
        if floor is not None:
            add(
                f"the same for the floor with one Redis round trip per request "
                f"({REFERENCE_REDIS}, ms)",
                floor,
                "(report)",
                None,
            )
    trips = head["redis_round_trips_per_req"]
    add("Redis round trips per request at saturation", trips, "<= 0.10", trips <= 0.1)
    commands = head.get("redis_client_cmds_per_req")
    if commands is not None and not math.isnan(commands):
        add(
            "Redis commands per request at saturation (pipelined ones each)",
            commands,
            "(report)",
            None,
        )
    workers = summary.get(WORKERS[key])
    if workers:
        ratio = workers["rps"] / head["rps"]
        add("--workers 2 vs 1 (throughput ratio)", ratio, "> 1 (report)", None)
    elif key == HEADLINE:
        add("--workers 2 vs 1", None, notes.get("workers", "not run"), None)
    return rows


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f} %"


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def write_markdown(data: dict[str, Any], path: Path) -> str:
    summary, settings = data["summary"], data["settings"]
    titles = {s["key"]: s["title"] for s in data["scenarios"]}
    lines = [
        f"# extproc benchmark ({data['mode']}, {data['started']})",
        "",
        f"{settings['rounds']} interleaved rounds x {settings['duration_s']} s per scenario, "
        f"wrk closed loop at {settings['connections']} connections ({settings['threads']} thread); "
        f"medians over rounds; ratios taken within each round. CPU is µs of process CPU "
        f"(utime+stime) per request. Traffic: {settings['subjects']} RS256 tokens / subjects.",
        "",
        "| scenario | req/s | p50 ms | p90 ms | p99 ms | vs passthrough | vs bare-fast "
        "| sidecar µs/req | Envoy µs/req | Redis µs/req | Redis round trips/req "
        "| Redis client cmds/req | Redis cmds/req (incl. in scripts) | 4xx | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in summary.items():
        cpu = row["cpu_us"]
        client = _fmt(row["client_errors"])
        if row["share_429"] > 0:
            client += f" ({row['share_429']:.0%} 429)"
        lines.append(
            f"| {titles[key]} (`{key}`) | {_fmt(row['rps'])} | {_fmt(row['p50_ms'], 2)} "
            f"| {_fmt(row['p90_ms'], 2)} | {_fmt(row['p99_ms'], 2)} "
            f"| {_fmt(row['vs_passthrough'], 2)} | {_fmt(row['vs_bare_fast'], 2)} "
            f"| {_fmt(cpu['sidecar'] or None)} | {_fmt(cpu['envoy'])} "
            f"| {_fmt(cpu['redis'] or None, 1)} "
            f"| {_fmt(row['redis_round_trips_per_req'], 3)} "
            f"| {_fmt(row['redis_client_cmds_per_req'], 3)} | {_fmt(row['redis_cmds_per_req'], 2)} "
            f"| {client} | {_fmt(row['errors'])} |"
        )
    lines += _latency_table(settings, summary)
    lines += _stalls_section(data)
    lines += _errors_section(data)
    lines += _batching_table(data)
    lines += _hot_table(data)
    lines += _hooks_table(data)
    lines += _gc_table(data)
    lines += _baseline_table(data)
    lines += _paired_table(data)
    lines += [
        "",
        "## Targets (`extproc-jwt-rl`, and `extproc-jwt-rl-h2` when it ran)",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---|---|",
    ]
    for t in data["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'], 2)} | {t['goal']} | {met} |")
    lines += ["", "## Machine and versions", ""]
    for name, value in {**data["machine"], **data["versions"]}.items():
        lines.append(f"- {name}: `{value}`")
    lines += ["", "## Commands", "", "```", data["command"], *data["commands"], "```", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"].values()] + [""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _middle_half(values: Sequence[float] | None) -> str:
    """``q1-q3`` of per-round figures (``-`` for fewer than 4 rounds: no quartiles then)."""
    if not values or len(values) < 4:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{q1:.2f}-{q3:.2f}"


def _stalls_section(data: Mapping[str, Any]) -> list[str]:
    """``--stalls``: per scenario, the open-loop tail with and without the requests that a
    foreign task's long run on a CPU overlapped (bench.stalls)."""
    rounds: dict[str, list[Mapping[str, Any]]] = {}
    for r in data.get("latency_rounds", []):
        for key, sample in r.items():
            if "stalls" in sample:
                rounds.setdefault(key, []).append(sample["stalls"])
    if not rounds:
        return []
    # (bench.stalls imports bench.stack, which imports this module)
    from bench.stalls import MIN_RUN_S, table

    return [
        "",
        "## Foreign CPU stalls in the open-loop tail (`--stalls`)",
        "",
        "perf recorded every CPU's context switches during each open-loop sample. A *stall* "
        f"is a run of {MIN_RUN_S * 1000:g} ms or more by a task outside the benchmark (the "
        "kernel's threads, the "
        "machine's other processes); a request *overlapped* one when the run fell between its "
        "scheduled send time and its reply. *Clear of stalls*: the p99 of the other requests. "
        "The targets are judged on all requests; this says how much of their tail the machine "
        "put there. Medians over rounds; *added* is less passthrough's figure of the same round.",
        "",
        *table(rounds).splitlines(),
    ]


def _latency_table(settings: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    if not any("open_loop" in row for row in summary.values()):
        return []
    lines = [
        "",
        f"## Latency at a fixed rate ({settings['latency_rate']:g} requests/s, open loop, "
        f"{settings['latency_connections']} connections, {settings['latency_rounds']} rounds x "
        f"{settings['latency_duration_s']} s)",
        "",
        "Measured from each request's scheduled send time (a stall is charged to every "
        "request it delays), by a Python generator of two threads (a sender on precise "
        "sleeps, never early, and a receiver on epoll; its own lateness in sending is "
        "`send_late_p50_ms` / `_p99_ms` in the JSON): its own cost is in every row alike, "
        "so read the *added* column. *Machine busy* and *steal*: shares of the "
        "whole machine's time (both cores) while the row ran, taken by the hypervisor and "
        "busy (neither idle nor stolen, from /proc/stat's idle and steal counts; its "
        "tick-sampled busy fields misread loads of short bursts), medians over rounds: "
        "a tail measured on a crowded or "
        "starved machine says more about the machine than about the sidecar. *Middle half*: "
        "the added p99 of the rounds between the first and third quartile, the spread a "
        "single round's figure can take.",
        "",
        "| scenario | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| added p99 vs passthrough ms | middle half of rounds ms | machine busy % | steal % "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in summary.items():
        ol = row.get("open_loop")
        if not ol:
            continue
        machine = ol.get("machine") or {}
        busy, steal = machine.get("busy"), machine.get("steal")
        lines.append(
            f"| `{key}` | {_fmt(ol['achieved_rps'])} | {_fmt(ol['p50'], 2)} "
            f"| {_fmt(ol['p90'], 2)} "
            f"| {_fmt(ol['p99'], 2)} | {_fmt(ol['p99.9'], 2)} | {_fmt(ol['added_p99_ms'], 2)} "
            f"| {_middle_half(ol.get('added_p99_ms_rounds'))} "
            f"| {_fmt(None if busy is None else busy * 100, 0)} "
            f"| {_fmt(None if steal is None else steal * 100, 1)} "
            f"| {_fmt(ol['errors'])} |"
        )
    return lines


def _baseline_table(data: dict[str, Any]) -> list[str]:
    """Each scenario against its twin from the ``--baseline`` commit, ratios per round."""
    sha = data.get("baseline")
    if not sha:
        return []
    rows = []
    for key, row in data["summary"].items():
        base = data["summary"].get(key + BASE_SUFFIX)
        if key.endswith(BASE_SUFFIX) or base is None:
            continue
        ratios = [
            r[key]["rps"] / r[key + BASE_SUFFIX]["rps"]
            for r in data["rounds"]
            if key in r and key + BASE_SUFFIX in r and r[key + BASE_SUFFIX]["rps"]
        ]
        cpu, base_cpu = row["cpu_us"]["sidecar"] or None, base["cpu_us"]["sidecar"] or None
        rows.append(
            f"| `{key}` | {_fmt(row['rps'])} | {_fmt(base['rps'])} | {_fmt(_median(ratios), 3)} "
            f"| {' '.join(f'{x:.2f}' for x in ratios)} | {_fmt(cpu)} | {_fmt(base_cpu)} |"
        )
    return [
        "",
        f"## Against the baseline (`{sha}`)",
        "",
        "The same scenario run from the baseline commit in the same rounds; the ratio is taken "
        "within each round (this run / baseline), then the median.",
        "",
        "| scenario | req/s | req/s at baseline | ratio (median) | ratio per round "
        "| sidecar µs/req | at baseline |",
        "|---|---:|---:|---:|---|---:|---:|",
        *rows,
        *_baseline_latency(data),
    ]


def _baseline_latency(data: dict[str, Any]) -> list[str]:
    """Each scenario's p99 at the open-loop rate against its baseline twin's, round by round:
    a p99 moves by a millisecond from one round to the next on a shared machine, so a
    difference means something only as the median of per-round differences, with how many
    rounds agree."""
    rows = []
    for key in data["summary"]:
        twin = key + BASE_SUFFIX
        if key.endswith(BASE_SUFFIX) or twin not in data["summary"]:
            continue
        both = [
            (r[key]["latency_ms"]["p99"], r[twin]["latency_ms"]["p99"])
            for r in data.get("latency_rounds", [])
            if key in r and twin in r
        ]
        if not both:
            continue
        diffs = [new - old for new, old in both]
        lower = sum(d < 0 for d in diffs)
        rows.append(
            f"| `{key}` | {_fmt(_median([n for n, _ in both]), 2)} "
            f"| {_fmt(_median([o for _, o in both]), 2)} | {_median(diffs):+.2f} "
            f"| {lower} of {len(diffs)} | {' '.join(f'{d:+.2f}' for d in diffs)} |"
        )
    if not rows:
        return []
    return [
        "",
        "At the open-loop rate, the p99 against the baseline's in the same rounds (ms; a "
        "difference below 0: this run's p99 is lower):",
        "",
        "| scenario | p99 (median) | at baseline | difference (median) | rounds lower "
        "| difference per round |",
        "|---|---:|---:|---:|---:|---|",
        *rows,
    ]


def _paired_table(data: dict[str, Any]) -> list[str]:
    """Two sidecars at once under the same fixed rate: CPU per request, round by round."""
    paired = data.get("paired") or {}
    rounds = paired.get("rounds") or []
    rows = []
    for ref, key in paired.get("pairs") or []:
        both = [r[f"{ref}|{key}"] for r in rounds if f"{ref}|{key}" in r]
        if not both:
            continue
        ratios = [r[key]["sidecar_us"] / r[ref]["sidecar_us"] for r in both]
        rows.append(
            f"| `{key}` | `{ref}` | {_fmt(_median([r[key]['sidecar_us'] for r in both]))} "
            f"| {_fmt(_median([r[ref]['sidecar_us'] for r in both]))} "
            f"| {_fmt(_median(ratios), 3)} | {' '.join(f'{x:.2f}' for x in ratios)} "
            f"| {_fmt(sum(r[key]['errors'] + r[ref]['errors'] for r in both))} |"
        )
    if not rows:
        return []
    return [
        "",
        "## Paired at a fixed rate",
        "",
        f"Two sidecars at once, {paired['rate']:g} req/s each (open loop, {len(rounds)} rounds x "
        f"{paired['duration_s']:g} s): neither saturated, so each pays its own CPU per request, "
        "in the same moments of the machine. Ratio: scenario / reference, per round, then the "
        "median (below 1: cheaper). At a light fixed load a request costs more CPU than at "
        "saturation (no batching or coalescing shares the loop's wake-ups).",
        "",
        "| scenario | reference | sidecar µs/req | reference µs/req | ratio (median) "
        "| ratio per round | errors |",
        "|---|---|---:|---:|---:|---|---:|",
        *rows,
    ]


def _by_load(data: dict[str, Any], field: str) -> Iterator[tuple[str, str, Any]]:
    """(scenario, load, value) of a summary ``field`` present at saturation (closed loop)
    and at the open-loop rate, in that order per scenario."""
    rate = f"{data['settings']['latency_rate']:g} req/s"
    for key, row in data["summary"].items():
        for load, value in (
            ("saturated (closed loop)", row.get(field)),
            (rate, row.get("open_loop", {}).get(field)),
        ):
            if value:
                yield key, load, value


def _errors_section(data: dict[str, Any]) -> list[str]:
    """Where there were errors: by status, and the sidecar's plugin failures behind them."""
    rows = [
        f"- `{key}`, {load}: " + ", ".join(f"{cause} {n:,}" for cause, n in sorted(causes.items()))
        for key, load, causes in _by_load(data, "error_causes")
    ]
    if not rows:
        return []
    return [
        "",
        "## Errors",
        "",
        "By status (5xx, socket errors) and, from the sidecar's "
        "`extproc_plugin_errors_total`, the plugin failures whose policy answered them "
        "(`<plugin> <kind>`; jwt_auth fails closed with 503). All rounds summed.",
        "",
        *rows,
    ]


def _section(title: str, intro: str, header: str, align: str, rows: list[str]) -> list[str]:
    """A report section: a title, a paragraph, and a table of ``rows`` (nothing without rows)."""
    if not rows:
        return []
    return ["", f"## {title}", "", intro, "", header, align, *rows]


def _batching_table(data: dict[str, Any]) -> list[str]:
    """What the rate limiter's adaptive batching chose, from its own histograms: at
    saturation (closed loop) and at the open-loop rate."""
    rows = [
        f"| `{key}` | {load} | {_fmt(b['round_trips_per_req'], 3)} "
        f"| {_fmt(b['mean_batch'], 1)} | {_fmt(b['wait_mean_us'])} "
        f"| {_fmt(b['wait_p50_us'])} | {_fmt(b['wait_p99_us'])} "
        f"| {_percent(b.get('ahead_share'))} |"
        for key, load, b in _by_load(data, "batching")
    ]
    return _section(
        "Adaptive batching (rate_limit)",
        "From the sidecar's own histograms (`extproc_rate_limit_batch_size`, "
        "`extproc_rate_limit_batch_wait_seconds`: each request's wait from reaching the "
        "batcher to its round trip being sent), medians over rounds. The wait is the latency "
        "batching added; quantiles are interpolated within buckets. *Allowed ahead*: the "
        "requests `grant_ahead` allowed before Redis answered "
        "(`extproc_rate_limit_granted_ahead_total`; their wait is not the request's), per "
        "request the generator completed: requests still in flight at a sample's end can put "
        "it a little above 100 %.",
        "| scenario | load | rate-limit round trips/req | requests per round trip "
        "| wait mean µs | wait p50 µs | wait p99 µs | allowed ahead |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        rows,
    )


def _hot_table(data: dict[str, Any]) -> list[str]:
    """The ``-hot`` scenarios: is the limit kept when one key is crossed every second?"""
    rows = [
        f"| `{key}` | {_fmt(row['rps'])} | {_fmt(h['limit_per_s'])} | {_fmt(h['allowed_per_s'])} "
        f"| {_fmt(h['bound_per_s'])} | {_fmt(h['over_per_s'], 1)} |"
        for key, row in data["summary"].items()
        if (h := row.get("hot"))
    ]
    return _section(
        "One key crossed every second (rate_limit's exactness under load)",
        "All traffic counted under one key (`key: [method]`), fixed window of one second, "
        "closed loop: most requests get 429. *Allowed*: 200s per second. *Exact at most*: "
        "what an exact limiter may allow per second in a sample (it touches one window more "
        "than its whole seconds). *Past the limit*: the requests `grant_ahead` allowed that "
        "Redis then refused (`extproc_rate_limit_granted_ahead_over_limit_total`), per "
        "second; without `grant_ahead` every decision is Redis' own. Medians over rounds.",
        "| scenario | req/s | limit per s | allowed per s | exact at most per s "
        "| allowed past the limit per s |",
        "|---|---:|---:|---:|---:|---:|",
        rows,
    )


def _hooks_table(data: dict[str, Any]) -> list[str]:
    """Where a request's time goes inside the sidecar: each plugin's request-headers hook,
    from the sidecar's own histogram, at saturation and at the open-loop rate."""
    rows = [
        f"| `{key}` | {load} | {plugin} | {_fmt(h['mean_us'])} "
        f"| {_fmt(h['p50_us'])} | {_fmt(h['p99_us'])} |"
        for key, load, hooks in _by_load(data, "hooks")
        for plugin, h in hooks.items()
    ]
    return _section(
        "Plugin hooks",
        "Each plugin's `on_request` for the request headers, from the sidecar's own "
        "`extproc_plugin_duration_seconds`: the time from the chain calling the hook to its "
        "result, including what it awaits (the rate limiter's Redis round trip) and any wait "
        "for the event loop in between; medians over rounds, quantiles interpolated within "
        "buckets. At the open-loop rate, compare with the *added p99* above: what is not here "
        "is Envoy, the sockets, the wake-ups of the processes and the server's own work.",
        "| scenario | load | plugin | mean µs | p50 µs | p99 µs |",
        "|---|---|---|---:|---:|---:|",
        rows,
    )


def _gc_table(data: dict[str, Any]) -> list[str]:
    """How long the sidecars' event loops stood still in the cyclic collector."""
    rows = [
        f"| `{key}` | {load} | {_fmt(g['pauses_per_s'], 1)} | {g['share'] * 100:.2f} % "
        f"| {g['long_per_s']:.2f} |"
        for key, load, g in _by_load(data, "gc")
    ]
    return _section(
        "Collector pauses",
        "From the sidecar's own `extproc_gc_pause_seconds` (all generations), medians over "
        "rounds. A request that arrives during a pause waits for it, so at a fixed rate the "
        "share of the time spent in pauses is about the share of requests delayed by one: "
        "read it against the 1 % above p99.",
        "| scenario | load | pauses/s | share of the time | pauses of 1 ms or more /s |",
        "|---|---|---:|---:|---:|",
        rows,
    )


def write_chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    keys = list(summary)
    rps = [summary[k]["rps"] for k in keys]
    envoy = [summary[k]["cpu_us"]["envoy"] for k in keys]
    side = [summary[k]["cpu_us"]["sidecar"] for k in keys]
    redis = [summary[k]["cpu_us"]["redis"] for k in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    colors = [
        "#888"
        if k in ("passthrough", "native", "native-deny")
        else "#4a7"
        if k.startswith("extproc")
        else "#57a"
        for k in keys
    ]
    ax1.barh(keys, rps, color=colors)
    for y, (k, v) in enumerate(zip(keys, rps, strict=True)):
        ax1.text(
            v,
            y,
            f" {v:,.0f} ({summary[k]['vs_bare_fast']:.2f}x bare-fast)",
            va="center",
            fontsize=8,
        )
    ax1.invert_yaxis()
    ax1.set_xlabel("requests/s (median of rounds, wrk closed loop)")
    ax1.set_title("Throughput")
    ax1.set_xlim(0, max(rps) * 1.45)
    ax2.barh(keys, envoy, label="Envoy", color="#888")
    ax2.barh(keys, side, left=envoy, label="sidecar", color="#4a7")
    ax2.barh(
        keys,
        redis,
        left=[a + b for a, b in zip(envoy, side, strict=True)],
        label="Redis",
        color="#c55",
    )
    ax2.invert_yaxis()
    ax2.set_xlabel("CPU µs per request")
    ax2.set_title("CPU per request")
    ax2.legend(loc="lower right")
    fig.suptitle(
        f"extproc benchmark ({data['mode']}, {data['machine']['cpu']}, "
        f"nproc {data['machine']['nproc']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(data: dict[str, Any], out: Path, stem: str = "latest") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    write_markdown(data, paths["md"])
    write_chart(data, paths["png"])
    return paths
