"""The full mode's open-loop phase measures each sidecar alone: every other scenario's sidecar
stopped (not paused), the measured one started again and warmed first; the stack brings a
stopped sidecar back on the same addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import run as bench_run
from bench.load import LoadResult
from bench.run import LATENCY_WARM_S, MODES, _alone
from bench.stack import Running, Stack, scenario


class _Proc:
    def __init__(self, log: list[str], key: str) -> None:
        self.log = log
        self.key = key

    def stop(self) -> None:
        self.log.append(f"stop {self.key}")


def _stack(tmp_path: Path, log: list[str], *keys: str) -> Stack:
    stack = Stack([], traffic=None, workdir=tmp_path)  # type: ignore[arg-type]
    for key in keys:
        run = Running(scenario(key), port=1000 + len(stack.running))
        if run.scenario.sidecar:
            run.proc = _Proc(log, key)  # type: ignore[assignment]
            run.start = lambda key=key: log.append(f"start {key}")  # type: ignore[misc]
        stack.running[key] = run
    return stack


def test_stop_and_start_again(tmp_path: Path) -> None:
    log: list[str] = []
    stack = _stack(tmp_path, log, "passthrough", "extproc-h2", "bare-fast")
    stack.stop_sidecar("passthrough")  # no sidecar: nothing to stop
    stack.start_sidecar("extproc-h2")  # running: nothing to start
    assert log == [] and stack.stopped == set()
    stack.stop_sidecar("extproc-h2")
    stack.stop_sidecar("extproc-h2")  # once
    assert log == ["stop extproc-h2"] and stack.stopped == {"extproc-h2"}
    stack.start_sidecar("extproc-h2")
    assert log == ["stop extproc-h2", "start extproc-h2"] and stack.stopped == set()
    for key in ("extproc-h2", "bare-fast"):
        stack.stop_sidecar(key)
    log.clear()
    stack.start_stopped()  # every stopped one, once each
    assert sorted(log) == ["start bare-fast", "start extproc-h2"] and stack.stopped == set()


def test_alone_stops_the_others_and_says_when_it_started_the_measured_one(
    tmp_path: Path,
) -> None:
    log: list[str] = []
    stack = _stack(tmp_path, log, "passthrough", "bare-fast", "extproc-h2")
    assert stack.alone("extproc-h2") is False  # it ran all along: nothing to warm
    assert log == ["stop bare-fast"] and stack.stopped == {"bare-fast"}
    assert stack.alone("extproc-h2") is False and len(log) == 1  # nothing more to do
    assert stack.alone("bare-fast") is True  # started again: cold, to be warmed
    assert log[1:] == ["stop extproc-h2", "start bare-fast"]
    assert stack.stopped == {"extproc-h2"}
    assert stack.alone("passthrough") is False  # no sidecar: Envoy alone
    assert stack.stopped == {"bare-fast", "extproc-h2"}


def test_each_measurement_has_its_sidecar_alone_and_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    stack = _stack(tmp_path, log, "passthrough", "bare-fast", "extproc-h2", "extproc-jwt-rl-h2")
    warmed: list[tuple[int, float]] = []

    def fake_open_loop(port: int, requests: Any, **kw: Any) -> LoadResult:
        warmed.append((port, kw["duration_s"]))
        return LoadResult(0, 1.0, {}, 0, {})

    monkeypatch.setattr(bench_run, "open_loop", fake_open_loop)
    monkeypatch.setattr(bench_run, "_requests", lambda *a: [b""])
    mode = MODES["full"]
    _alone(stack, scenario("extproc-h2"), None, mode)  # type: ignore[arg-type]
    # the others stopped; the measured one ran all along: no restart, no warm-up
    assert sorted(log) == ["stop bare-fast", "stop extproc-jwt-rl-h2"] and warmed == []
    log.clear()
    _alone(stack, scenario("extproc-jwt-rl-h2"), None, mode)  # type: ignore[arg-type]
    assert log == ["stop extproc-h2", "start extproc-jwt-rl-h2"]
    assert warmed == [(stack.port("extproc-jwt-rl-h2"), LATENCY_WARM_S)]
    assert stack.stopped == {"bare-fast", "extproc-h2"}
    log.clear()
    _alone(stack, scenario("passthrough"), None, mode)  # type: ignore[arg-type]
    assert log == ["stop extproc-jwt-rl-h2"]  # Envoy alone: every sidecar stopped
    assert stack.stopped == {"bare-fast", "extproc-h2", "extproc-jwt-rl-h2"}


def test_only_the_full_mode_restarts_sidecars_per_measurement() -> None:
    assert MODES["full"].latency_alone
    # a restart and a warm-up per measurement would not fit the quick mode's minute
    assert not MODES["quick"].latency_alone and not MODES["smoke"].latency_alone
