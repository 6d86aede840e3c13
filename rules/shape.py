"""Ops that move data without changing it: Flatten, Reshape, Squeeze, Unsqueeze, Transpose,
Concat, Split, Slice (any step), Pad (constant, edge, reflect, wrap; opset 18's axes), Gather and GatherElements with constant indices, Expand,
Tile, Where; and Identity, Dropout, Cast.

Gradient: the adjoint move (reshape back, inverse permutation, split ↔ concat, slice ↔ pad,
gather ↔ scatter-add, expand/tile ↔ sum over the copies, where ↔ the branch's share of ``G``).
Relevance: moved the same way, ``ΦX = VJP_op(Φ)`` (spec "Pass-through ops", "Class token,
position embeddings, gathers"): what a constant branch would get is dropped; for Identity,
Dropout (inference) and Cast that is ``ΦX = Φ``.

The batch may sit at any axis (after a Transpose) or be merged with its neighbours (``[N·T, C]``):
reshapes back use ``-1`` at the one dynamic axis, and an op that moves or picks along the axis that
carries the batch is refused, since it would mix samples.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView

from ._helpers import batch, data_only, named, pass_through, refuse_batch_axes, static_shape, static_sizes, unbroadcast
from ._registry import gradient, relevance

#: ``(b, node, one value per output)`` → one value per input: the adjoint of the op's move.
Move = Callable[[GraphBuilder, NodeView, list], list]


_GRADIENT = re.compile(r"\bG\b")


def moves(op_type: str, summary: str) -> Callable[[Move], Move]:
    """Register ``back`` as the gradient of ``op_type`` (``VJP(G)``, described by ``summary``) and as
    its ``adjoint`` relevance rule (``ΦX = VJP(Φ)``)."""

    def register(back: Move) -> Move:
        def gradient_rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
            return back(b, node, node.gradient)

        def relevance_rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
            return back(b, node, node.relevance)

        name, module = op_type.lower(), back.__module__
        gradient(op_type)(named(gradient_rule, f"{name}_gradient", summary, module))
        moved = f"Moves relevance as {op_type} moves data: " + _GRADIENT.sub("Φ", summary)
        relevance(op_type, kind="adjoint")(named(relevance_rule, f"{name}_relevance", moved, module))
        return back

    return register


def _reshape_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    if batch(node, node.inputs[0]) is not None and batch(node, node.outputs[0]) is None:
        raise node.refuse(f"reshapes the batch axis away ({list(node.shape(0))} → {list(node.shape(node.outputs[0]))})")
    return data_only(node, {0: b.Reshape(values[0], b.ints(static_shape(node, node.inputs[0])))})


for _op, _what in (("Flatten", "X's shape"), ("Reshape", "X's shape"), ("Squeeze", "X's shape (the axes back)"),
                   ("Unsqueeze", "X's shape (the axes dropped)")):
    moves(_op, f"G reshaped back to {_what}.")(_reshape_back)


@moves("Transpose", "G permuted back (inverse permutation).")
def _transpose_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    perm = node.attr("perm", list(range(len(node.shape(0))))[::-1])
    return data_only(node, {0: b.Transpose(values[0], perm=[int(i) for i in np.argsort(perm)])})


def _axis(node: NodeView, doing: str, default: int = 0) -> int:
    rank = len(node.shape(node.inputs[0]))
    axis = node.attr("axis", default) % rank
    refuse_batch_axes(node, node.inputs[0], [axis], doing)
    return axis


@moves("Concat", "G split back into the concatenated parts.")
def _concat_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    axis = _axis(node, "concatenates")
    sizes = [static_sizes(node, name, [axis])[0] for name in node.inputs]
    parts = b.Split(values[0], b.ints(sizes), axis=axis, outputs=len(sizes)) if len(sizes) > 1 else (values[0],)
    return data_only(node, dict(enumerate(parts)))


@moves("Split", "the parts' G concatenated back (0 for an unused part).")
def _split_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    axis = _axis(node, "splits")
    parts = [value if value is not None else b.Mul(output, b.const(0.0))  # an unused part carries 0
             for value, output in zip(values, node.outputs)]
    return data_only(node, {0: b.Concat(*parts, axis=axis) if len(parts) > 1 else parts[0]})


def _pad_axis(b: GraphBuilder, value: str, rank: int, axis: int, begin: int, end: int) -> str:
    pads = [0] * 2 * rank
    pads[axis], pads[axis + rank] = begin, end
    return b.Pad(value, b.ints(pads))


def _unstride(b: GraphBuilder, value: str, shape: list, axis: int, picked: range, size: int) -> str:
    """The adjoint of picking ``picked`` along ``axis`` (``shape``: ``value``'s shape): the picked
    entries put back at their places among ``size`` zeros, with Pad and Reshape only."""
    rank, count = len(shape), len(picked)
    step, first = picked.step, picked[0]
    if step < 0:  # reversed: entry j belongs at picked[-1] + j·|step|
        value = b.Slice(value, b.ints([-1]), b.ints([-(2 ** 62)]), b.ints([axis]), b.ints([-1]))
        step, first = -step, picked[-1]
    length = count
    if step > 1:  # [.., count, ..] → [.., count, step, ..] (zeros after each entry) → [.., count·step, ..]
        value = _pad_axis(b, b.Unsqueeze(value, b.ints([axis + 1])), rank + 1, axis + 1, 0, step - 1)
        merged = [-1 if d is None else d for d in shape]
        merged[axis] = length = count * step
        value = b.Reshape(value, b.ints(merged))
    end = size - first - length
    if end < 0:  # the last entry's trailing zeros run past the end
        value = b.Slice(value, b.ints([0]), b.ints([length + end]), b.ints([axis]))
        end = 0
    return _pad_axis(b, value, rank, axis, first, end)


@moves("Slice", "G put back where the slice took it from (zeros elsewhere; Pad and Reshape, any step).")
def _slice_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    shape = list(node.shape(0))
    rank = len(shape)
    starts, ends = node.value(1), node.value(2)
    axes = node.value(3) if len(node.inputs) > 3 and node.inputs[3] else np.arange(len(starts))
    steps = node.value(4) if len(node.inputs) > 4 and node.inputs[4] else np.ones(len(starts), np.int64)
    current = list(node.shape(node.outputs[0]))
    value, pads = values[0], [0] * 2 * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        if shape[axis] is None:  # the batch axis: only a slice that keeps all of it
            if int(step) == 1 and int(start) == 0 and int(end) >= 2 ** 31 - 1:
                continue
            refuse_batch_axes(node, node.inputs[0], [axis], "slices")
            raise node.refuse(f"slices axis {axis}, whose size is unknown")
        picked = range(*slice(int(start), int(end), int(step)).indices(shape[axis]))
        if not picked:
            raise node.refuse(f"takes nothing along axis {axis}")
        if step == 1 and len(picked) == shape[axis]:
            continue
        if step == 1:
            pads[axis], pads[axis + rank] = picked[0], shape[axis] - picked[-1] - 1
        else:
            value = _unstride(b, value, current, axis, picked, shape[axis])
            current[axis] = shape[axis]
    return data_only(node, {0: b.Pad(value, b.ints(pads)) if any(pads) else value})


def _full_pads(node: NodeView) -> list[int]:
    """The node's pads as ``[begin_0 … begin_r-1, end_0 … end_r-1]`` over every axis (opset 18's
    ``axes`` input lists the padded axes; the others get 0)."""
    if not node.graph.is_constant(node.inputs[1]):
        raise node.refuse("the pads are computed from the input; constant pads are needed")
    pads = [int(p) for p in node.value(1).reshape(-1)]
    rank = len(node.shape(0))
    if len(node.inputs) > 3 and node.inputs[3]:
        axes = [int(a) % rank for a in node.value(3).reshape(-1)]
        full = [0] * 2 * rank
        for i, axis in enumerate(axes):
            full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
        pads = full
    if any(p < 0 for p in pads):
        raise node.refuse(f"pads {pads}: only non-negative padding is supported")
    return pads


def _source_indices(mode: str, size: int, begin: int, end: int) -> np.ndarray:
    """For each position along a padded axis, the input entry it holds (``edge``: the nearest end;
    ``reflect``: mirrored without repeating the end; ``wrap``: periodic)."""
    positions = np.arange(-begin, size + end)
    if mode == "edge":
        return np.clip(positions, 0, size - 1)
    if mode == "wrap":
        return positions % size
    period = 2 * (size - 1)  # reflect: …, 2, 1, [0, 1, …, n−1], n−2, …
    folded = np.abs(positions) % period if period else np.zeros_like(positions)
    return np.where(folded >= size, period - folded, folded)


def contract_axis(b: GraphBuilder, value: str, rank: int, axis: int, one_hot: np.ndarray) -> str:
    """``value`` with its ``axis`` (of length ``one_hot.shape[0]``) contracted with ``one_hot`` [k, n]: entry
    ``j`` of the result is the sum of the entries ``i`` with ``one_hot[i, j] = 1`` (a scatter-add as MatMul)."""
    if axis == rank - 1:
        return b.MatMul(value, b.const(one_hot))
    if axis == rank - 2:
        return b.MatMul(b.const(np.ascontiguousarray(one_hot.T)), value)
    last = [*[a for a in range(rank) if a != axis], axis]
    spread = b.MatMul(b.Transpose(value, perm=last), b.const(one_hot))
    return b.Transpose(spread, perm=[int(i) for i in np.argsort(last)])


@moves("Pad", "G with the padding cut off (constant mode); edge, reflect and wrap modes: also the padded "
              "entries' G added back onto the entries they copy (the adjoint of the copy, per axis).")
def _pad_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise node.refuse(f"mode '{mode}' is not supported")
    pads = _full_pads(node)
    rank = len(pads) // 2
    padded = [a for a in range(rank) if pads[a] or pads[a + rank]]
    refuse_batch_axes(node, node.inputs[0], padded, "pads")
    if not padded:
        return data_only(node, {0: values[0]})
    shape = node.shape(0)
    if mode == "constant":
        starts = [pads[a] for a in padded]
        ends = [pads[a] + shape[a] for a in padded]
        return data_only(node, {0: b.Slice(values[0], b.ints(starts), b.ints(ends), b.ints(padded))})
    sizes = static_sizes(node, node.inputs[0], padded)
    value = values[0]
    for axis, size in zip(padded, sizes):  # the copies along each axis are independent: undone one by one
        if mode == "reflect" and max(pads[axis], pads[axis + rank]) >= size:
            raise node.refuse(f"reflect pads of {max(pads[axis], pads[axis + rank])} along an axis of {size}")
        sources = _source_indices(mode, size, pads[axis], pads[axis + rank])
        one_hot = np.zeros((sources.size, size), np.float32)
        one_hot[np.arange(sources.size), sources] = 1.0
        value = contract_axis(b, value, rank, axis, one_hot)
    return data_only(node, {0: value})


def _constant_indices(node: NodeView) -> np.ndarray:
    if not node.graph.is_constant(node.inputs[1]):
        raise node.refuse("the indices are computed from the input; constant indices are needed")
    return node.value(1).astype(np.int64)


@moves("Gather", "G scattered back to the gathered places, added where an index repeats (a one-hot MatMul).")
def _gather_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    shape = list(node.shape(0))
    rank = len(shape)
    axis = _axis(node, "gathers")
    indices = _constant_indices(node)
    size = static_sizes(node, node.inputs[0], [axis])[0]
    flat = indices.reshape(-1) % size
    one_hot = np.zeros((flat.size, size), np.float32)
    np.add.at(one_hot, (np.arange(flat.size), flat), 1.0)
    value = values[0]
    if indices.ndim == 0:
        value = b.Unsqueeze(value, b.ints([axis]))
    elif indices.ndim > 1:
        merged = [-1 if d is None else d for d in shape]
        merged[axis] = flat.size
        value = b.Reshape(value, b.ints(merged))
    # value: X's shape with the gathered entries along `axis`; contract them with the one-hot rows
    return data_only(node, {0: contract_axis(b, value, rank, axis, one_hot)})


@moves("GatherElements", "G scatter-added back at the indices (ScatterElements, reduction add).")
def _gather_elements_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    axis = _axis(node, "gathers")
    zeros = b.Mul(node.inputs[0], b.const(0.0))
    return data_only(node, {0: b.ScatterElements(zeros, node.inputs[1], values[0], axis=axis, reduction="add")})


@moves("Expand", "G summed over the broadcast copies.")
def _expand_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    return data_only(node, {0: unbroadcast(b, values[0], node.shape(node.outputs[0]), node.shape(0))})


@moves("Tile", "G summed over the tiled copies.")
def _tile_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    shape = list(node.shape(0))
    repeats = [int(r) for r in node.value(1)]
    tiled = [a for a, r in enumerate(repeats) if r != 1]
    refuse_batch_axes(node, node.inputs[0], tiled, "tiles")
    if not tiled:
        return data_only(node, {0: values[0]})
    split, copies = [], []
    for size, repeat in zip(shape, repeats):
        if repeat != 1:  # tile is copy-major: entry k·size + j is copy k of entry j
            copies.append(len(split))
            split.append(repeat)
        split.append(-1 if size is None else size)
    summed = b.ReduceSum(b.Reshape(values[0], b.ints(split)), b.ints(copies), keepdims=0)
    return data_only(node, {0: summed})


@moves("Where", "G where the condition picks the data branch, 0 elsewhere, summed over broadcast axes.")
def _where_back(b: GraphBuilder, node: NodeView, values: list) -> list[str | None]:
    condition, zero, out_shape = node.inputs[0], b.const(0.0), node.shape(node.outputs[0])
    branches = {1: lambda v: b.Where(condition, v, zero), 2: lambda v: b.Where(condition, zero, v)}
    return data_only(node, {i: unbroadcast(b, pick(values[0]), out_shape, node.shape(i))
                            for i, pick in branches.items() if node.is_data(i)})


@gradient("Identity")
def identity_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G unchanged."""
    return data_only(node, {0: node.gradient[0]})


@gradient("Cast")
def cast_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G unchanged, as float (the cast of an integer image to float)."""
    return data_only(node, {0: node.gradient[0]})


@gradient("Dropout")
def dropout_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G unchanged (inference: training_mode a constant false)."""
    if len(node.inputs) > 2 and node.inputs[2]:
        if not node.graph.is_constant(node.inputs[2]) or bool(node.value(2)):
            raise node.refuse("training_mode must be a constant false")
    return data_only(node, {0: node.gradient[0]})


relevance("Identity", "Dropout", "Cast", kind="pass")(pass_through)
