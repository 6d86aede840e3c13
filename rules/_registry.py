"""The rule registry: the single list of supported ops.

A *gradient rule* returns ``VJP_op(G)`` for each input of a node; a *relevance rule* returns
``Φ`` for each input. Both take ``(b, node)`` (the builder and a ``NodeView``) and return one
entry per node input, ``None`` for weights and shape inputs. An op may have several relevance
rules, told apart by *kind* (``"z"``, ``"agf"``, ``"zB"``…); a method (``agf_onnx.compiler.methods``)
says which kind each op gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agf_onnx.compiler.builder import GraphBuilder
    from agf_onnx.compiler.graph import NodeView

Rule = Callable[["GraphBuilder", "NodeView"], list]


@dataclass
class OpRules:
    """Everything registered for one op type."""

    op_type: str
    module: str = ""
    gradient: Rule | None = None
    relevance: dict[str, Rule] = field(default_factory=dict)

    def describe(self, kind: str) -> str:
        """The one-line docstring of a relevance rule, for ``agf-onnx rules`` and the README."""
        return first_line(self.relevance[kind])

    def describe_gradient(self) -> str:
        """The one-line docstring of the gradient rule ("" without one)."""
        return first_line(self.gradient)


def first_line(function: Callable | None) -> str:
    """The first line of ``function``'s docstring, "" without one."""
    doc = (getattr(function, "__doc__", None) or "").strip() if function is not None else ""
    return doc.splitlines()[0] if doc else ""


REGISTRY: dict[str, OpRules] = {}


def lookup(op_type: str, domain: str = "") -> OpRules | None:
    """The rules of an op, ``None`` where it has none: another domain than ``ai.onnx`` (a
    ``com.microsoft`` op is unfolded or refused before the rules run), or no gradient rule. The one
    way the compiler asks the registry."""
    entry = REGISTRY.get(op_type) if domain in ("", "ai.onnx") else None
    return entry if entry is not None and entry.gradient is not None else None


def unsupported(nodes: Iterable) -> dict[str, list[str]]:
    """Op type (``domain.OpType`` outside ``ai.onnx``) → names of the ``nodes`` that no rule covers."""
    missing: dict[str, list[str]] = {}
    for node in nodes:
        if lookup(node.op_type, node.domain) is None:
            missing.setdefault(label(node), []).append(node.name)
    return missing


def label(node) -> str:
    """How errors name a node's op: ``OpType``, or ``domain.OpType`` outside ``ai.onnx``."""
    return node.op_type if not node.domain else f"{node.domain}.{node.op_type}"


def _entry(op_type: str, function: Rule) -> OpRules:
    entry = REGISTRY.setdefault(op_type, OpRules(op_type))
    if not entry.module:  # shared helpers registered for an op don't move it out of its module
        entry.module = function.__module__.rsplit(".", 1)[-1]
    return entry


def gradient(*op_types: str) -> Callable[[Rule], Rule]:
    """Register ``function`` as the VJP of ``op_types``."""

    def register(function: Rule) -> Rule:
        for op_type in op_types:
            entry = _entry(op_type, function)
            if entry.gradient is not None:
                raise ValueError(f"two gradient rules for {op_type}")
            entry.gradient = function
        return function

    return register


def relevance(*op_types: str, kind: str) -> Callable[[Rule], Rule]:
    """Register ``function`` as the relevance rule ``kind`` of ``op_types``."""

    def register(function: Rule) -> Rule:
        for op_type in op_types:
            entry = _entry(op_type, function)
            if kind in entry.relevance:
                raise ValueError(f"two '{kind}' relevance rules for {op_type}")
            entry.relevance[kind] = function
        return function

    return register
