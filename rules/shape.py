"""Ops that move data without changing it: Flatten, Reshape, Squeeze, Unsqueeze, Transpose,
Concat, Split, Slice, Pad, and Identity, Dropout, Cast.

Gradient: the adjoint move (reshape back, inverse permutation, split ↔ concat, slice ↔ pad).
Relevance: moved the same way, ``ΦX = VJP_op(Φ)`` (spec "Pass-through ops"); for Identity,
Dropout (inference) and Cast that is ``ΦX = Φ``.
"""

from __future__ import annotations

import numpy as np

from agf_onnx.graph import NodeView

from ._helpers import data_only, pass_through
from ._registry import gradient, relevance


def _static(node: NodeView, name: str) -> list:
    shape = node.shape(name)
    if any(d is None for d in shape[1:]):
        raise node.refuse(f"tensor '{name}' has shape {list(shape)}; every axis but the batch must be static")
    return list(shape)


def _reshape_back(b, node: NodeView, values: list) -> list[str | None]:
    in_shape, out_shape = _static(node, node.inputs[0]), node.shape(node.outputs[0])
    if in_shape[0] is None and out_shape and out_shape[0] is not None:
        raise node.refuse(f"reshapes the batch axis away ({in_shape} → {list(out_shape)})")
    return data_only(node, {0: b.Reshape(values[0], b.ints([-1 if d is None else d for d in in_shape]))})


def _transpose_back(b, node: NodeView, values: list) -> list[str | None]:
    perm = node.attr("perm", list(range(len(node.shape(0))))[::-1])
    if perm[0] != 0:
        raise node.refuse(f"moves the batch axis (perm {list(perm)})")
    return data_only(node, {0: b.Transpose(values[0], perm=[int(i) for i in np.argsort(perm)])})


def _axis(node: NodeView, default: int = 0) -> int:
    rank = len(node.shape(node.inputs[0]))
    axis = node.attr("axis", default) % rank
    if axis == 0:
        raise node.refuse("works along the batch axis; samples must stay independent")
    return axis


def _concat_back(b, node: NodeView, values: list) -> list[str | None]:
    axis = _axis(node)
    sizes = [node.shape(i)[axis] for i in range(len(node.inputs))]
    parts = b.Split(values[0], b.ints(sizes), axis=axis, outputs=len(sizes)) if len(sizes) > 1 else (values[0],)
    return data_only(node, dict(enumerate(parts)))


def _split_back(b, node: NodeView, values: list) -> list[str | None]:
    axis = _axis(node)
    parts = [value if value is not None else b.Mul(output, b.const(0.0))  # an unused part carries 0
             for value, output in zip(values, node.outputs)]
    return data_only(node, {0: b.Concat(*parts, axis=axis) if len(parts) > 1 else parts[0]})


def _slice_back(b, node: NodeView, values: list) -> list[str | None]:
    shape = _static(node, node.inputs[0])
    rank = len(shape)
    starts, ends = node.value(1), node.value(2)
    axes = node.value(3) if len(node.inputs) > 3 and node.inputs[3] else np.arange(len(starts))
    steps = node.value(4) if len(node.inputs) > 4 and node.inputs[4] else np.ones(len(starts), np.int64)
    pads = [0] * 2 * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        if step != 1:
            raise node.refuse("slices with a step other than 1 are not supported")
        if axis == 0:
            raise node.refuse("slices the batch axis; samples must stay independent")
        begin, stop = slice(int(start), int(end)).indices(shape[axis])[:2]
        pads[axis], pads[axis + rank] = begin, shape[axis] - max(stop, begin)
    return data_only(node, {0: b.Pad(values[0], b.ints(pads))})


def _pad_back(b, node: NodeView, values: list) -> list[str | None]:
    if node.attr("mode", "constant") != "constant":
        raise node.refuse(f"mode '{node.attr('mode')}' is not supported (constant padding only)")
    pads = [int(p) for p in node.value(1)]
    rank = len(pads) // 2
    if any(p < 0 for p in pads) or pads[0] or pads[rank]:
        raise node.refuse(f"pads {pads}: only non-negative padding of non-batch axes is supported")
    shape = _static(node, node.inputs[0])
    axes = list(range(1, rank))
    starts = [pads[a] for a in axes]
    ends = [pads[a] + shape[a] for a in axes]
    return data_only(node, {0: b.Slice(values[0], b.ints(starts), b.ints(ends), b.ints(axes))})


_MOVES = {"Flatten": _reshape_back, "Reshape": _reshape_back, "Squeeze": _reshape_back,
          "Unsqueeze": _reshape_back, "Transpose": _transpose_back, "Concat": _concat_back,
          "Split": _split_back, "Slice": _slice_back, "Pad": _pad_back}


@gradient(*_MOVES)
def move_gradient(b, node: NodeView) -> list[str | None]:
    """The adjoint move: reshape back, inverse permutation, split ↔ concat, slice ↔ pad."""
    return _MOVES[node.op_type](b, node, node.gradient)


@relevance(*_MOVES, kind="adjoint")
def move_relevance(b, node: NodeView) -> list[str | None]:
    """Moves relevance the way the op moves data: ΦX = VJP_op(Φ)."""
    return _MOVES[node.op_type](b, node, node.relevance)


@gradient("Identity", "Dropout", "Cast")
def identity_gradient(b, node: NodeView) -> list[str | None]:
    """G unchanged (Dropout at inference; Cast: G as float)."""
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2]:
        if not node.graph.is_constant(node.inputs[2]) or bool(node.value(2)):
            raise node.refuse("training_mode must be a constant false")
    return data_only(node, {0: node.gradient[0]})


relevance("Identity", "Dropout", "Cast", kind="pass")(pass_through)
