"""The scaffold and the examples, as a plugin author gets them: generated (or copied), installed
with ``pip install -e`` into a throw-away virtualenv, and tested with their own pytest config -
unit tests through FakeEnvoy and end-to-end tests through a real Envoy.

The four projects install with one pip call and their test runs go in parallel (most of an e2e
run is waiting for Envoy and the sidecar to start).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from extproc import scaffold
from tests.authors.plugin_venv import REPO, PluginVenv

EXAMPLES = ("apikey", "json_validator", "security_headers")
SCAFFOLD_NAME = "author_demo"


def new_plugin(argv: list[str]) -> int:
    """``extproc new-plugin ...`` through the real CLI when it is wired, else through the
    parser ``scaffold.add_parser`` registers (what the CLI wiring calls)."""
    from extproc import cli

    parser = cli.build_parser()
    choices = next(
        (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {}
    )
    if choices and "new-plugin" in choices:
        return cli.main(["new-plugin", *argv])
    parser = argparse.ArgumentParser(prog="extproc")
    scaffold.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["new-plugin", *argv])
    code: int = args.func(args)
    return code


@dataclass
class Run:
    project: Path
    proc: subprocess.Popen[str]
    started: float
    output: str = ""
    seconds: float = 0.0

    def wait(self, timeout: float = 170) -> Run:
        if self.proc.returncode is None:
            self.output, _ = self.proc.communicate(timeout=timeout)
            self.seconds = time.perf_counter() - self.started
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    root = tmp_path_factory.mktemp("authors")
    t0 = time.perf_counter()
    assert new_plugin([SCAFFOLD_NAME, "--directory", str(root)]) == 0
    projects = {SCAFFOLD_NAME: root / SCAFFOLD_NAME}
    for name in EXAMPLES:  # copied, so that build artefacts never land in the repository
        projects[name] = root / name
        shutil.copytree(REPO / "examples" / name, projects[name])
    venv = PluginVenv.create(root / "venv")
    venv.install(*projects.values())
    started: dict[str, Run] = {}
    try:
        for name, project in projects.items():
            proc = venv.popen_pytest(project)
            started[name] = Run(project, proc, time.perf_counter())
        yield started
    finally:
        for run in started.values():
            if run.proc.poll() is None:
                run.proc.kill()  # our own child, by its handle
                run.proc.wait()
        timings = {k: round(v, 1) for k, v in venv.timings.items()}
        timings.update({f"pytest {k}": round(r.seconds, 1) for k, r in started.items()})
        timings["total"] = round(time.perf_counter() - t0, 1)
        print(f"\nauthor projects timings (s): {timings}", file=sys.stderr)
        venv.remove()


def _passed(run: Run) -> None:
    run.wait()
    assert run.proc.returncode == 0, f"pytest in {run.project} failed:\n{run.output[-6000:]}"
    assert " passed" in run.output and "skipped" not in run.output, run.output[-2000:]


def test_new_plugin_project_passes_its_own_tests_right_after_generation(
    runs: dict[str, Run],
) -> None:
    run = runs[SCAFFOLD_NAME]
    _passed(run)
    assert "5 passed" in run.output  # 4 unit tests + 1 through real Envoy


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_passes_its_own_tests(runs: dict[str, Run], example: str) -> None:
    _passed(runs[example])


def test_generated_project_is_lint_clean(tmp_path: Path) -> None:
    assert new_plugin(["lint_me", "--directory", str(tmp_path)]) == 0
    ruff = Path(sys.executable).parent / "ruff"
    project = tmp_path / "lint_me"
    for argv in ([str(ruff), "check", "."], [str(ruff), "format", "--check", "."]):
        proc = subprocess.run(argv, check=False, cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_new_plugin_refuses_bad_names_and_existing_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert new_plugin(["9lives", "--directory", str(tmp_path)]) == 2
    assert "not usable" in capsys.readouterr().err
    assert new_plugin(["headers", "--directory", str(tmp_path)]) == 2  # a built-in's name
    assert "already installed" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert new_plugin(["taken", "--directory", str(tmp_path)]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_names_are_derived_consistently() -> None:
    names = scaffold.plugin_names("My-Plugin")
    assert (names.name, names.package, names.dist, names.class_prefix, names.header) == (
        "my_plugin", "extproc_my_plugin", "extproc-my-plugin", "MyPlugin", "x-my-plugin",
    )  # fmt: skip
