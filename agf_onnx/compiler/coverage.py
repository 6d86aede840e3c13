"""The coverage table, generated from the rule registry (README and ``agf-onnx rules``)."""

from __future__ import annotations

from ..rules import REGISTRY
from .methods import METHODS, get_method
from .planning import HEAD_OPS


def coverage_table(method: str = "agf") -> str:
    """A Markdown table: op type, rule module, gradient rule, relevance rule(s) under ``method``."""
    chosen = get_method(method)
    rows = ["| op | rules/ | gradient (VJP) | relevance under `" + method + "` |", "|---|---|---|---|"]
    for op_type in sorted(REGISTRY):
        entry = REGISTRY[op_type]
        kinds = list(entry.relevance)
        used = [k for k in chosen.map.preferred(op_type) if k in kinds] or kinds
        relevance = "<br>".join(f"`{k}`: {entry.describe(k)}" for k in dict.fromkeys(used))
        rows.append(f"| {op_type} | `{entry.module}.py` | {entry.describe_gradient()} | {relevance} |")
    for op_type in HEAD_OPS:  # a trailing Softmax is stripped; one with rules of its own is listed above
        if op_type not in REGISTRY:
            rows.append(f"| {op_type} | — | trailing only: the logits are its input | — |")
    return "\n".join(rows)


def methods_table() -> str:
    """A Markdown table of the compile targets (``--method``) with their definitions."""
    rows = ["| `--method` | what | heatmap |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {m.summary} | {m.formula} |" for m in METHODS.values()]
    return "\n".join(rows)
