"""Add and Sum: residual merges of data tensors, or a data tensor plus a constant (a bias).

Gradient: ``G`` to every data input, summed over the axes it was broadcast on.

Relevance (``merge``):
- two or more data inputs (a residual merge): the z-rule ``ΦXi = Xi ⊙ sdiv(Φ, Y ⊙ 1[Φ≠0])``;
- one data input plus constants (a bias, as in MatMul+Add): ``ΦX = Φ``, as a linear layer's
  bias takes no relevance in the authors' rules.
"""

from __future__ import annotations

from agf_onnx.graph import NodeView
from agf_onnx.maths import nonzero, safe_divide

from ._helpers import data_only, unbroadcast
from ._registry import gradient, relevance


def _data_inputs(node: NodeView) -> list[int]:
    return [i for i in range(len(node.inputs)) if node.is_data(i)]


@gradient("Add", "Sum")
def sum_gradient(b, node: NodeView) -> list[str | None]:
    """G to every data input, un-broadcast."""
    out_shape = node.shape(node.outputs[0])
    return data_only(node, {i: unbroadcast(b, node.gradient[0], out_shape, node.shape(i)) for i in _data_inputs(node)})


@relevance("Add", "Sum", kind="merge")
def sum_relevance(b, node: NodeView) -> list[str | None]:
    """z-rule across data inputs (residual merge); Φ passes through a constant bias."""
    data, relevance_out = _data_inputs(node), node.relevance[0]
    out_shape = node.shape(node.outputs[0])
    if len(data) == 1:
        return data_only(node, {data[0]: unbroadcast(b, relevance_out, out_shape, node.shape(data[0]))})
    ratio = safe_divide(b, relevance_out, b.Mul(node.outputs[0], nonzero(b, relevance_out)))
    return data_only(node, {i: unbroadcast(b, b.Mul(node.inputs[i], ratio), out_shape, node.shape(i)) for i in data})
