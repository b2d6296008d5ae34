"""docs/plugins.md stays executable: its code is rendered from files whose tests run, and its
API reference from the docstrings (``scripts/gen_plugin_docs.py --check``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "plugins.md"


def test_plugins_md_is_what_the_sources_give() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/gen_plugin_docs.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_tutorial_code_block_comes_from_a_tested_file() -> None:
    text = DOC.read_text()
    specs = re.findall(r"<!-- snippet: ([^ ]+) -->", text)
    assert len(specs) >= 12
    for spec in specs:
        path = spec.partition("::")[0]
        assert (REPO / path).is_file(), spec
        # the file is an example (tested by tests/authors/test_projects.py) or a tested module
        assert path.startswith(("examples/", "tests/authors/")), spec
    # python blocks outside snippets are configuration and shell, not code to keep in sync
    outside = re.sub(r"<!-- snippet: .*?<!-- /snippet -->", "", text, flags=re.DOTALL)
    assert "```python" not in outside
