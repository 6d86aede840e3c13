"""The README stays true: its coverage table is the registry's, its test command is CI's."""

from __future__ import annotations

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_coverage_table_is_generated_from_the_registry():
    tool = runpy.run_path(str(ROOT / "tools" / "update_readme.py"))
    text = (ROOT / "README.md").read_text()
    assert tool["render"](text) == text, "README coverage table is stale: run python tools/update_readme.py"


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in (ROOT / "README.md").read_text()
