"""The README stays true: its test command is CI's, it stays short, its links resolve, and every
generated part of it and of the docs pages (tables, import cycles, the import graph picture) is
what ``tools/update_docs.py`` renders from the code today."""

from __future__ import annotations

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOOL = runpy.run_path(str(ROOT / "tools" / "update_docs.py"))
STALE = "is stale: run python tools/update_docs.py"


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in README.read_text()


def test_readme_is_a_five_minute_read():
    """Issue 21: the rest lives in the docs site; the README links to it."""
    assert len(README.read_text().splitlines()) <= 400


def test_generated_parts_are_fresh():
    for page in TOOL["pages"]():
        text = page.read_text()
        assert TOOL["render"](text, str(page)) == text, f"{page.relative_to(ROOT)} {STALE}"


def test_every_generated_part_has_a_page():
    assert TOOL["used"]() == set(TOOL["SECTIONS"]), "a generated part has no markers in README.md or docs/"


def test_import_graph_picture_is_fresh():
    svg = TOOL["IMPORT_GRAPH"]["SVG"]
    assert svg.read_text() == TOOL["import_graph_svg"](), f"{svg.relative_to(ROOT)} {STALE}"


def test_readme_links_resolve():
    """MkDocs checks the site's links; the README (read on GitHub, not built) is checked here."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_no_import_cycle_in_the_package():
    """agf_onnx/ and rules/ import downwards only (issue 21), function-level and TYPE_CHECKING imports
    included; tools/import_graph.py reads the imports with ast."""
    graph = runpy.run_path(str(ROOT / "tools" / "import_graph.py"))
    described = graph["describe_cycles"](graph["edges"]())
    assert described.startswith("No import cycle"), described


def test_run_time_never_imports_the_compiler():
    """agf_onnx.runtime (sessions, the Explainer, outputs, metrics) imports nothing of
    agf_onnx.compiler, at any level (issue 21's two halves); what both halves agree on is
    agf_onnx.contract. The compiler imports nothing of run time either."""
    graph = runpy.run_path(str(ROOT / "tools" / "import_graph.py"))
    crossing = [f"{e.source} → {e.target} ({e.kind})" for e in graph["edges"]()
                if {e.source.split(".")[0], e.target.split(".")[0]} == {"runtime", "compiler"}
                or (e.source.split(".")[0] == "runtime" and e.target == "rules")]
    assert crossing == [], crossing


def test_the_sizes_a_newcomer_reads():
    """Issue 21's bounds: the CLI only parses and prints, the emitter stays one file's read, and a
    method is a few fields (its kind's own in a map class of its kind)."""
    import dataclasses

    from agf_onnx.compiler.methods import Method

    lines = {path: len((ROOT / path).read_text().splitlines()) for path in ("agf_onnx/cli.py", "agf_onnx/compiler/emit.py")}
    assert lines["agf_onnx/cli.py"] <= 400 and lines["agf_onnx/compiler/emit.py"] <= 500, lines
    assert len(dataclasses.fields(Method)) <= 10

