"""Ops that move data without changing it: Flatten, Reshape, Transpose, Identity, Dropout.

Gradient: the adjoint move (reshape back, inverse permutation, identity).
Relevance: moved the same way, ``ΦX = VJP_op(Φ)`` (spec "Pass-through ops"); for Identity and
Dropout (inference) that is ``ΦX = Φ``.
"""

from __future__ import annotations

import numpy as np

from agf_onnx.graph import NodeView

from ._helpers import adjoint, data_only, pass_through
from ._registry import gradient, relevance


def _reshape_back(b, node: NodeView, g: str) -> list[str | None]:
    in_shape, out_shape = node.shape(0), node.shape(node.outputs[0])
    if in_shape[0] is None and out_shape[0] is not None:
        raise node.refuse(f"reshapes the batch axis away ({list(in_shape)} → {list(out_shape)})")
    if any(d is None for d in in_shape[1:]):
        raise node.refuse(f"input shape {list(in_shape)} is not static; pass --input-shape")
    return data_only(node, {0: b.Reshape(g, b.ints([0 if d is None else d for d in in_shape]))})


def _transpose_back(b, node: NodeView, g: str) -> list[str | None]:
    perm = node.attr("perm", list(range(len(node.shape(0))))[::-1])
    return data_only(node, {0: b.Transpose(g, perm=[int(i) for i in np.argsort(perm)])})


def _identity(b, node: NodeView, g: str) -> list[str | None]:
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2]:
        if not node.graph.is_constant(node.inputs[2]) or bool(node.value(2)):
            raise node.refuse("training_mode must be a constant false")
    return data_only(node, {0: g})


_MOVES = {"Flatten": _reshape_back, "Reshape": _reshape_back, "Transpose": _transpose_back}


@gradient("Flatten", "Reshape", "Transpose")
def move_gradient(b, node: NodeView, g: str | None = None) -> list[str | None]:
    """The adjoint move: reshape back / inverse permutation."""
    return _MOVES[node.op_type](b, node, node.gradient[0] if g is None else g)


relevance("Flatten", "Reshape", "Transpose", kind="adjoint")(adjoint(move_gradient))


@gradient("Identity", "Dropout")
def identity_gradient(b, node: NodeView) -> list[str | None]:
    """G unchanged (Dropout at inference)."""
    return _identity(b, node, node.gradient[0])


relevance("Identity", "Dropout", kind="pass")(pass_through)
