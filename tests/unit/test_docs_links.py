"""Every relative link in the project's Markdown points at a file that is in the repository
(a dated benchmark copy the README cited was once kept out by a .gitignore)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked() -> set[str]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], check=True, capture_output=True, text=True
    ).stdout
    return set(out.splitlines())


DOCS = [
    "README.md",
    "bench/README.md",
    "bench/results/HISTORY.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_point_at_committed_files(doc: str) -> None:
    tracked = _tracked()
    base = (ROOT / doc).parent
    missing = []
    for target in LINK.findall((ROOT / doc).read_text()):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (base / target.split("#", 1)[0]).resolve()
        rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        if rel not in tracked and not any(t.startswith(rel + "/") for t in tracked):
            missing.append(target)
    assert not missing, f"{doc}: links to files that are not committed: {missing}"
