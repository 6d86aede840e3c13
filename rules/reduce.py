"""Reductions over any axes but the batch's (axes as attribute or, from opset 18 (ReduceSum: 13),
input; negative axes, ``keepdims`` 0 or 1): ReduceSum and ReduceMean (global pooling as newer
exporters write it, the means of a normalisation written out, token pooling); ReduceL2, ReduceL1,
ReduceLogSumExp (cosine attention, GRN layers); and LpNormalization ``Y = X / ‖X‖_p`` along an axis.

Gradient: ``G`` broadcast back over the reduced axes (``/ count`` for the mean); times ``X / Y``
(L2), ``sign(X)`` (L1), ``exp(X − Y)`` (log-sum-exp). LpNormalization, ``n = ‖X‖_p``:
``(G − Y ⊙ Σ G ⊙ Y) / n`` for p = 2, ``G / n − sign(X) ⊙ Σ(G ⊙ X) / n²`` for p = 1.
Relevance: the z-rule over what each element contributes to the reduced value, ``ΦX = c ⊙
broadcast(sdiv(Φ, Σ c))``: ``c = X`` for ReduceSum/Mean (``ΦX = X ⊙ VJP_op(sdiv(Φ, Y ⊙ 1[Φ≠0]))``),
``c = X²`` for ReduceL2 (``Y² = Σ X²``), ``c = |X|`` for ReduceL1, ``c = exp(X − Y)`` for
log-sum-exp (``Σ c = 1``). LpNormalization is a normalisation: ``ΦX = Φ`` (spec, "normalisations
pass through"; the norm is a constant of the forward pass, as LayerNormalization's is).
"""

from __future__ import annotations

import math

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView
from agf_onnx.compiler.maths import safe_divide

from ._helpers import broadcast_shape, data_only, named, pass_through, refuse_batch_axes, static_sizes, z_rule_op
from ._registry import gradient, relevance


def reduced_axes(node: NodeView) -> list[int]:
    """The axes the node reduces, non-negative and sorted; ``[]`` for a no-op."""
    rank = len(node.shape(0))
    if len(node.inputs) > 1 and node.inputs[1]:
        if node.is_data(1) or not node.graph.is_constant(node.inputs[1]):
            raise node.refuse("the axes are computed from the input; constant axes are needed")
        axes = [int(a) for a in node.value(1).reshape(-1)]
    else:
        axes = list(node.attr("axes", []))
    if not axes:
        return [] if node.attr("noop_with_empty_axes", 0) else list(range(rank))
    axes = sorted({a % rank for a in axes})
    refuse_batch_axes(node, node.inputs[0], axes, "reduces")
    return axes


def _spread(b: GraphBuilder, node: NodeView, g: str, mean: bool) -> str:
    """``G`` broadcast back over the reduced axes, divided by their size for a mean."""
    axes, in_shape = reduced_axes(node), node.shape(0)
    if not axes:
        return g
    if not node.attr("keepdims", 1):
        g = b.Unsqueeze(g, b.ints(axes))
    if mean:
        g = b.Div(g, b.const(float(math.prod(static_sizes(node, node.inputs[0], axes)))))
    return b.Expand(g, b.ints(broadcast_shape(in_shape)))


@z_rule_op("ReduceSum", "G broadcast back over the summed axes.",
           "z-rule: ΦX = X ⊙ broadcast(sdiv(Φ, Y ⊙ 1[Φ≠0])), Φ shared in proportion to each summand.")
def _sum_vjp(b: GraphBuilder, node: NodeView, g: str) -> str:
    return _spread(b, node, g, mean=False)


@z_rule_op("ReduceMean", "G / (number of averaged elements), broadcast back over the averaged axes.",
           "z-rule: ΦX = X ⊙ broadcast(sdiv(Φ, Y ⊙ 1[Φ≠0])) / count, Φ shared in proportion to each element.")
def _mean_vjp(b: GraphBuilder, node: NodeView, g: str) -> str:
    return _spread(b, node, g, mean=True)


def _spread_output(b: GraphBuilder, node: NodeView) -> str:
    """``Y`` broadcast back to ``X``'s shape."""
    return _spread(b, node, node.outputs[0], mean=False)


def _norm_reduction(op_type: str, gradient_doc: str, relevance_doc: str, factor, share):
    """Register the gradient ``broadcast(G) ⊙ factor(X, Y)`` and the z-rule over the contributions
    ``c``: ``ΦX = share(b, node, Φ)`` of a norm-like reduction."""

    def gradient_rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
        return data_only(node, {0: b.Mul(_spread(b, node, node.gradient[0], mean=False), factor(b, node))})

    def relevance_rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
        return data_only(node, {0: share(b, node, node.relevance[0])})

    name = op_type.lower()
    gradient(op_type)(named(gradient_rule, f"{name}_gradient", gradient_doc, __name__))
    relevance(op_type, kind="z")(named(relevance_rule, f"{name}_relevance", relevance_doc, __name__))


_norm_reduction(
    "ReduceL2", "G broadcast back ⊙ X / Y (0 where Y = 0).",
    "z-rule over the squares: ΦX = X² ⊙ broadcast(sdiv(Φ, Y²)) (Y² = Σ X²).",
    lambda b, node: safe_divide(b, node.inputs[0], _spread_output(b, node), nonnegative=True),
    lambda b, node, phi: b.Mul(b.Mul(node.inputs[0], node.inputs[0]),
                               _spread(b, node, safe_divide(b, phi, b.Mul(node.outputs[0], node.outputs[0]),
                                                            nonnegative=True), mean=False)))
_norm_reduction(
    "ReduceL1", "G broadcast back ⊙ sign(X).",
    "z-rule over the magnitudes: ΦX = abs(X) ⊙ broadcast(sdiv(Φ, Y)) (Y = Σ abs(X)).",
    lambda b, node: b.Sign(node.inputs[0]),
    lambda b, node, phi: b.Mul(b.Abs(node.inputs[0]),
                               _spread(b, node, safe_divide(b, phi, node.outputs[0], nonnegative=True), mean=False)))
_norm_reduction(
    "ReduceLogSumExp", "G broadcast back ⊙ exp(X − Y) (the softmax over the reduced axes).",
    "z-rule over the exponentials: ΦX = exp(X − Y) ⊙ broadcast(Φ) (their shares of Σ exp X).",
    lambda b, node: b.Exp(b.Sub(node.inputs[0], _spread_output(b, node))),
    lambda b, node, phi: b.Mul(b.Exp(b.Sub(node.inputs[0], _spread_output(b, node))), _spread(b, node, phi, mean=False)))


@gradient("LpNormalization")
def lp_normalization_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """(G − Y ⊙ Σ G ⊙ Y) / ‖X‖₂ (p = 2) or G / ‖X‖₁ − sign(X) ⊙ Σ(G ⊙ X) / ‖X‖₁² (p = 1), sums along the axis."""
    x, y, g = node.inputs[0], node.outputs[0], node.gradient[0]
    rank = len(node.shape(0))
    axis = node.attr("axis", -1) % rank
    refuse_batch_axes(node, x, [axis], "normalises")
    p = node.attr("p", 2)
    if p == 2:
        norm = b.ReduceL2(x, axes=[axis], keepdims=1)
        inner = b.ReduceSum(b.Mul(g, y), b.ints([axis]), keepdims=1)
        return data_only(node, {0: safe_divide(b, b.Sub(g, b.Mul(y, inner)), norm, nonnegative=True)})
    if p == 1:
        norm = b.ReduceL1(x, axes=[axis], keepdims=1)
        inner = b.ReduceSum(b.Mul(g, x), b.ints([axis]), keepdims=1)
        correction = b.Mul(b.Sign(x), safe_divide(b, inner, b.Mul(norm, norm), nonnegative=True))
        return data_only(node, {0: b.Sub(safe_divide(b, g, norm, nonnegative=True), correction)})
    raise node.refuse(f"p={p}: only p = 1 and p = 2 are defined")


relevance("LpNormalization", kind="pass")(pass_through)
