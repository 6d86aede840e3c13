"""ReduceSum and ReduceMean over any axes but the batch's (axes as attribute or input, negative
axes, ``keepdims`` 0 or 1): global pooling as newer exporters write it, the means of a normalisation
written out (RMSNorm, GroupNorm), token pooling.

Gradient: ``G`` broadcast back over the reduced axes (``/ count`` for the mean).
Relevance: the z-rule ``ΦX = X ⊙ VJP_op(sdiv(Φ, Y ⊙ 1[Φ≠0]))``.
"""

from __future__ import annotations

import math

from agf_onnx.builder import GraphBuilder
from agf_onnx.graph import NodeView

from ._helpers import broadcast_shape, refuse_batch_axes, static_sizes, z_rule_op


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
