"""A throw-away virtualenv that sees the project's .venv, for installing plugin projects.

``python -m venv --without-pip`` makes it in ~0.1 s; one ``.pth`` line adds the running venv's
site-packages as a *site dir* (so its own ``.pth`` files, extproc's editable install among
them, are honoured). ``pip install --no-deps --no-build-isolation --no-index -e`` then installs
a plugin project offline in ~1 s without touching the project's .venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class PluginVenv:
    root: Path
    timings: dict[str, float] = field(default_factory=dict)
    _pytest11: bool | None = None

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @classmethod
    def create(cls, root: Path) -> PluginVenv:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(root)],
            check=True,
            capture_output=True,
        )
        venv = cls(root)
        site = Path(
            subprocess.run(
                [str(venv.python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        parent = sysconfig.get_path("purelib")
        (site / "_parent_venv.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
        # the Envoy binary the e2e tests look for beside the interpreter
        envoy = Path(sys.executable).parent / "envoy"
        if envoy.exists():
            (root / "bin" / "envoy").symlink_to(envoy)
        venv.timings["create"] = time.perf_counter() - t0
        return venv

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV"))}
        env.pop("PYTHONPATH", None)
        env["VIRTUAL_ENV"] = str(self.root)
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), env.get("PATH", "")])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["SETUPTOOLS_USE_DISTUTILS"] = "local"
        return env

    def install(self, *projects: Path) -> None:
        """``pip install -e`` the projects (one pip run), offline, without dependencies."""
        t0 = time.perf_counter()
        editables = [arg for p in projects for arg in ("-e", str(p))]
        proc = subprocess.run(
            [
                str(self.python), "-m", "pip", "install", "--quiet", "--no-deps",
                "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                *editables,
            ],
            check=False,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        self.timings["pip install -e"] = time.perf_counter() - t0
        assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}{proc.stderr}"

    def sees_pytest11(self) -> bool:
        """Whether pytest in the venv loads extproc's fixtures by itself (the ``pytest11``
        entry point in extproc's pyproject.toml); if not, they are loaded with ``-p`` - never
        both, pytest refuses a plugin registered twice."""
        if self._pytest11 is None:
            proc = subprocess.run([str(self.python), "-c", _PYTEST11], env=self.env(), check=False)
            self._pytest11 = proc.returncode == 0
        return self._pytest11

    def pytest_argv(self, project: Path, *args: str) -> list[str]:
        # each run gets its own --basetemp: pytest runs side by side in one shared
        # /tmp/pytest-of-<user> clean up each other's numbered directories, and when that
        # trips, pytest leaks a scandir iterator that filterwarnings=error turns into a failure
        basetemp = self.root / "pytest-tmp" / project.name
        basetemp.parent.mkdir(exist_ok=True)
        argv = [str(self.python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        argv += [f"--basetemp={basetemp}", *args]
        if not self.sees_pytest11():
            argv += ["-p", "extproc.testing.pytest_plugin"]
        return argv

    def popen_pytest(self, project: Path, *args: str) -> subprocess.Popen[str]:
        """The project's own tests (its own pytest config) in the venv, started in the
        background (stdout and stderr together)."""
        return subprocess.Popen(
            self.pytest_argv(project, *args),
            cwd=project,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_PYTEST11 = (
    "import sys; from importlib.metadata import entry_points; "
    "sys.exit(0 if any(ep.value.startswith('extproc.testing.pytest_plugin') "
    "for ep in entry_points(group='pytest11')) else 1)"
)
