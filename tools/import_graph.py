"""The module import graph of ``agf_onnx/`` and ``rules/``, read with ``ast``, drawn as an SVG.

    python tools/import_graph.py            # writes docs/import_graph.svg, prints the cycles

Nothing is imported or executed: every ``import``/``from … import`` statement of every module is
read from its source, relative imports resolved, and classified by where it stands:

- *module*: runs when the module is imported (top level, also inside a top-level ``if``/``try``);
- *deferred*: inside a function or method, run when that is called (often a cycle in hiding);
- *typing*: under ``if TYPE_CHECKING:``, never run.

``rules/`` (installed as ``agf_onnx.rules``: one module per op family) is drawn as one box, since
its modules import only each other and the same few graph-building modules. Cycles are the
strongly connected components of the graph with every kind of edge (a deferred import that closes
a loop is still a loop in the design); the picture draws their edges red.

Layout: floor 0 holds the modules that import no other module of the package; every other module
stands one floor above the highest module it imports at module level (deferred and typing imports
do not raise a floor, which keeps the floors a DAG). Within a floor, modules are ordered by the
mean position of the modules they import (a few barycentre sweeps), ties by name, so the drawing
is deterministic and ``tests/test_readme.py`` can check that the committed SVG is fresh.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from collections.abc import Iterator
from xml.sax.saxutils import escape

ROOT = pathlib.Path(__file__).resolve().parent.parent
SVG = ROOT / "docs" / "import_graph.svg"
RULES = "rules"

#: Which half of the library a module belongs to (issue 21's "two halves"); a module not listed is
#: drawn white, as "not assigned". A box is looked up by its first dotted part, so after a split
#: into sub-packages (boxes ``subpackage.module``) listing the sub-package's name colours all of it.
ROLES = {
    "compile time": ("compiler", RULES),
    "run time": ("runtime",),
    "commands": ("cli", "__init__", "__main__", "commands", "options", "evaluate", "text_evaluate", "bank", "text_explain", "distributed", "web"),
    "shared": ("errors", "contract", "modelfile", "bankfile"),
}
COLOURS = {"compile time": "#dbe8fb", "run time": "#fde6cf", "commands": "#e3f3dc", "shared": "#eeeeee",
           "not assigned": "#ffffff"}
EDGE_STYLES = {"module": "", "deferred": ' stroke-dasharray="6 4"', "typing": ' stroke-dasharray="2 3"'}


@dataclasses.dataclass(frozen=True, order=True)
class Edge:
    source: str
    target: str
    kind: str  # "module", "deferred" or "typing"


def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name (as installed) → source file, for ``agf_onnx/`` and ``rules/``."""
    files = {}
    for folder, package in ((ROOT / "agf_onnx", "agf_onnx"), (ROOT / "rules", "agf_onnx.rules")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            files[name.removesuffix(".__init__") if parts[-1] == "__init__" else name] = path
    return files


def _statements(tree: ast.AST) -> Iterator[tuple[ast.stmt, str]]:
    """Every import statement of a module with where it stands (module, deferred or typing)."""
    def visit(node: ast.AST, kind: str) -> Iterator[tuple[ast.stmt, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, "deferred" if kind == "module" else kind)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.body:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), "typing")
                for statement in child.orelse:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), kind)
            else:
                yield from visit(child, kind)
    yield from visit(tree, "module")


def _resolve(module: str, is_package: bool, statement: ast.stmt, known: set[str]) -> list[str]:
    """The package modules one import statement names."""
    if isinstance(statement, ast.Import):
        candidates = [alias.name for alias in statement.names]
    else:
        base = statement.module or ""
        if statement.level:
            parts = module.split(".")[: len(module.split(".")) - statement.level + (1 if is_package else 0)]
            base = ".".join(parts + ([base] if base else []))
        # `from package import submodule` names a module; `from module import name` names the module
        candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in statement.names]
    found = []
    for name in candidates:
        while name and name not in known:  # `import agf_onnx.rules.conv.x` → the longest known prefix
            name = name.rpartition(".")[0]
        if name and name not in found:
            found.append(name)
    return found


def short(module: str) -> str:
    """The box a module is drawn in: ``agf_onnx.compiler.emit`` → ``compiler``; every rules module → ``rules``."""
    name = module.removeprefix("agf_onnx").lstrip(".") or "__init__"
    return RULES if name == RULES or name.startswith(RULES + ".") else name


def edges() -> list[Edge]:
    """Every import between two boxes (imports inside ``rules/`` are inside one box)."""
    files = module_files()
    known = set(files)
    found: dict[tuple[str, str], str] = {}
    rank = {"module": 0, "deferred": 1, "typing": 2}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for statement, kind in _statements(tree):
            for target in _resolve(module, path.name == "__init__.py", statement, known):
                source, imported = short(module), short(target)
                if source != imported and ((source, imported) not in found
                                           or rank[kind] < rank[found[(source, imported)]]):
                    found[(source, imported)] = kind  # the strongest kind of import between two boxes
    return sorted(Edge(s, t, k) for (s, t), k in found.items())


def cycles(graph: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one box (Tarjan), each sorted, biggest first."""
    successors: dict[str, list[str]] = {}
    for edge in graph:
        successors.setdefault(edge.source, []).append(edge.target)
        successors.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in successors[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(successors):
        if node not in index:
            connect(node)
    return sorted(components, key=lambda c: (-len(c), c))


def describe_cycles(graph: list[Edge]) -> str:
    """A Markdown list of the import cycles with the edges that close them (for architecture.md)."""
    found = cycles(graph)
    if not found:
        return "No import cycle: every import, function-level and `TYPE_CHECKING` ones included, points down."
    lines = []
    for component in found:
        inside = [e for e in graph if e.source in component and e.target in component]
        arrows = ", ".join(f"`{e.source}` → `{e.target}`" + ("" if e.kind == "module" else f" ({e.kind})")
                           for e in inside)
        lines.append(f"- {' ⇄ '.join(f'`{m}`' for m in component) if len(component) == 2 else ', '.join(f'`{m}`' for m in component)}: {arrows}")
    return "\n".join(lines)


def floors(graph: list[Edge]) -> dict[str, int]:
    """Floor of each box: 0 without module-level imports, else one above the highest it imports."""
    nodes = sorted({e.source for e in graph} | {e.target for e in graph} | {short(m) for m in module_files()})
    below = {n: sorted({e.target for e in graph if e.source == n and e.kind == "module"}) for n in nodes}
    floor: dict[str, int] = {}

    def height(node: str, seen: frozenset[str]) -> int:
        if node not in floor:
            # a module-level cycle (none should exist: Python could not import it) is cut where it closes
            floor[node] = 1 + max((height(n, seen | {node}) for n in below[node] if n not in seen), default=-1)
        return floor[node]

    for node in nodes:
        height(node, frozenset())
    return floor


def role(box: str) -> str:
    return next((name for name, members in ROLES.items() if box.split(".")[0] in members), "not assigned")


def drawn(graph: list[Edge]) -> list[Edge]:
    """The edges the picture draws: every deferred and typing import, and every module-level import
    that no chain of two or more module-level imports already implies (a transitive reduction;
    ``errors`` alone is imported by more than half of the boxes)."""
    below: dict[str, set[str]] = {}
    for e in graph:
        if e.kind == "module":
            below.setdefault(e.source, set()).add(e.target)

    def reachable(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for n in below.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    kept = []
    for e in graph:  # module-level imports form a DAG (Python could not run them otherwise)
        implied = e.kind == "module" and any(
            e.target in reachable(m) for m in below.get(e.source, ()) if m != e.target)
        if not implied:
            kept.append(e)
    return kept


def svg(graph: list[Edge]) -> str:
    """The drawing: floors bottom-up, boxes coloured by half (compile time left, run time right
    on each floor), edges by kind, cycle edges red."""
    floor = floors(graph)
    cyclic = cycles(graph)
    graph = drawn(graph)
    levels: dict[int, list[str]] = {}
    for node in sorted(floor):
        levels.setdefault(floor[node], []).append(node)
    position = {n: float(i) for level in levels.values() for i, n in enumerate(level)}
    neighbours = {n: [e.target for e in graph if e.source == n] + [e.source for e in graph if e.target == n]
                  for n in floor}
    for _ in range(8):  # barycentre sweeps: each box moves toward the mean place of what it touches
        for level in levels.values():
            level.sort(key=lambda n: (list(COLOURS).index(role(n)) if role(n) != "commands" else 0,
                                      sum(position[m] for m in neighbours[n]) / len(neighbours[n])
                                      if neighbours[n] else position[n], n))
            for i, n in enumerate(level):
                position[n] = i - (len(level) - 1) / 2
    box_h, gap_x, gap_y, margin = 26, 34, 52, 20
    box_w = max(112, 16 + 7 * max(len(n) for n in floor))  # about 7 px per character at 12 px
    widest = max(len(level) for level in levels.values())
    # the legend: the colours on one row, the four kinds of arrow two to a row
    arrows = [("#8a8a8a", EDGE_STYLES["module"], "import at module level"),
              ("#8a8a8a", EDGE_STYLES["deferred"], "import inside a function"),
              ("#8a8a8a", EDGE_STYLES["typing"], "import under TYPE_CHECKING"),
              ("#d62728", ' stroke-width="1.6"', "part of an import cycle")]
    column = 80 + 7 * max(len(label) for *_, label in arrows)
    legend_w = 2 * margin + max(sum(40 + 7 * len(name) for name in COLOURS), 2 * column)
    width = max(widest * (box_w + gap_x) - gap_x + 2 * margin, legend_w)
    top = max(levels)
    legend_h = 88
    height = (top + 1) * (box_h + gap_y) - gap_y + 2 * margin + legend_h
    centre: dict[str, tuple[float, float]] = {}
    for level, members in levels.items():
        for n in members:
            x = width / 2 + position[n] * (box_w + gap_x)
            y = margin + (top - level) * (box_h + gap_y) + box_h / 2
            centre[n] = (x, y)
    in_cycle = {n for component in cyclic for n in component}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
           "<title>agf_onnx module imports (tools/import_graph.py)</title>",
           '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="context-stroke"/></marker></defs>',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    for edge in graph:
        (x1, y1), (x2, y2) = centre[edge.source], centre[edge.target]
        red = any(edge.source in c and edge.target in c for c in cyclic)
        colour = "#d62728" if red else "#8a8a8a"
        if y2 > y1:  # downward: bottom of the importer to the top of the imported
            y1, y2 = y1 + box_h / 2, y2 - box_h / 2
        else:  # upward or level (a deferred or typing import): top to bottom, bowed sideways
            y1, y2 = y1 - box_h / 2, y2 + box_h / 2
        bend = (y2 - y1) / 2 if y2 > y1 else -gap_y
        out.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}" '
                   f'fill="none" stroke="{colour}" stroke-width="{1.6 if red else 1}"{EDGE_STYLES[edge.kind]} '
                   f'marker-end="url(#arrow)"><title>{escape(edge.source)} imports {escape(edge.target)} '
                   f'({edge.kind})</title></path>')
    for n, (x, y) in sorted(centre.items()):
        label = "rules/*" if n == RULES else n
        w = box_w
        out.append(f'<rect x="{x - w / 2:.1f}" y="{y - box_h / 2:.1f}" width="{w}" height="{box_h}" rx="5" '
                   f'fill="{COLOURS[role(n)]}" stroke="{"#d62728" if n in in_cycle else "#555555"}"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{escape(label)}</text>')
    y = height - legend_h + 14
    x = margin
    for name, colour in COLOURS.items():
        out.append(f'<rect x="{x}" y="{y - 11}" width="14" height="14" fill="{colour}" stroke="#555555"/>'
                   f'<text x="{x + 20}" y="{y}">{name}</text>')
        x += 40 + 7 * len(name)
    for i, (colour, style, label) in enumerate(arrows):
        x, y_row = margin + (i % 2) * column, y + 24 * (1 + i // 2)
        out.append(f'<path d="M{x},{y_row - 4} h36" stroke="{colour}"{style} marker-end="url(#arrow)"/>'
                   f'<text x="{x + 44}" y="{y_row}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    graph = edges()
    SVG.write_text(svg(graph))
    print(f"wrote {SVG.relative_to(ROOT)}: {len(floors(graph))} boxes on {max(floors(graph).values()) + 1} floors, "
          f"{len(graph)} imports")
    print(describe_cycles(graph))
