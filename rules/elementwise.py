"""Binary element-wise ops: Add, Sum, Sub (residual merges, biases, preprocessing), Mul (gates
and constant scales), Div by a constant.

Gradient: the partial derivatives times ``G``, summed over the axes an input was broadcast on.

Relevance:
- ``merge`` (Add, Sum, Sub): with two or more data inputs (a residual merge) the z-rule
  ``ΦXi = ±Xi ⊙ sdiv(Φ, Y ⊙ 1[Φ≠0])``; with one data input and constants (a bias, a mean
  subtracted in preprocessing, BatchNorm written out) ``ΦX = Φ``, as a linear layer's bias
  takes no relevance in the authors' rules.
- ``gate`` (Mul): a gate ``x ⊙ s(x)`` (SiLU, HardSwish written out, squeeze-excitation) gives
  all relevance to the signal ``x``, the input the other one is computed from; a constant scale
  passes relevance through.
- ``pass`` (Div): division by a constant passes relevance through.
"""

from __future__ import annotations

from agf_onnx.graph import NodeView
from agf_onnx.maths import nonzero, safe_divide

from ._helpers import data_only, unbroadcast
from ._registry import gradient, relevance


def _data_inputs(node: NodeView) -> list[int]:
    return [i for i in range(len(node.inputs)) if node.is_data(i)]


def _to_input(b, node: NodeView, index: int, value: str) -> str:
    return unbroadcast(b, value, node.shape(node.outputs[0]), node.shape(index))


@gradient("Add", "Sum")
def sum_gradient(b, node: NodeView) -> list[str | None]:
    """G to every data input, un-broadcast."""
    return data_only(node, {i: _to_input(b, node, i, node.gradient[0]) for i in _data_inputs(node)})


@gradient("Sub")
def sub_gradient(b, node: NodeView) -> list[str | None]:
    """G to the minuend, −G to the subtrahend, un-broadcast."""
    gradient_out = node.gradient[0]
    return data_only(node, {i: _to_input(b, node, i, gradient_out if i == 0 else b.Neg(gradient_out))
                            for i in _data_inputs(node)})


@relevance("Add", "Sum", "Sub", kind="merge")
def sum_relevance(b, node: NodeView) -> list[str | None]:
    """z-rule across data inputs (residual merge); Φ passes through a constant bias."""
    data, relevance_out = _data_inputs(node), node.relevance[0]
    if len(data) == 1:
        return data_only(node, {data[0]: _to_input(b, node, data[0], relevance_out)})
    ratio = safe_divide(b, relevance_out, b.Mul(node.outputs[0], nonzero(b, relevance_out)))
    shares = {}
    for i in data:
        share = b.Mul(node.inputs[i], ratio)
        shares[i] = _to_input(b, node, i, b.Neg(share) if node.op_type == "Sub" and i == 1 else share)
    return data_only(node, shares)


@gradient("Mul")
def mul_gradient(b, node: NodeView) -> list[str | None]:
    """G times the other factor, un-broadcast."""
    a, c = node.inputs
    return data_only(node, {i: _to_input(b, node, i, b.Mul(node.gradient[0], c if i == 0 else a))
                            for i in _data_inputs(node)})


def signal_input(node: NodeView) -> int:
    """Which input of a two-data-input Mul is the signal: the one the other is computed from."""
    a, c = node.inputs
    if node.graph.depends_on(c, a):
        return 0
    if node.graph.depends_on(a, c):
        return 1
    raise node.refuse("multiplies two independent data tensors; only gates x·s(x) and constant scales "
                      "have a relevance rule")


@relevance("Mul", kind="gate")
def mul_relevance(b, node: NodeView) -> list[str | None]:
    """A gate x·s(x) gives all relevance to the signal x; a constant scale passes it through."""
    data = _data_inputs(node)
    keep = data[0] if len(data) == 1 else signal_input(node)
    return data_only(node, {keep: _to_input(b, node, keep, node.relevance[0])})


@gradient("Div")
def div_gradient(b, node: NodeView) -> list[str | None]:
    """G / c for a constant divisor c."""
    if node.is_data(1):
        raise node.refuse("divides by a data tensor; only division by a constant is supported")
    return data_only(node, {0: _to_input(b, node, 0, b.Div(node.gradient[0], node.inputs[1]))})


@relevance("Div", kind="pass")
def div_relevance(b, node: NodeView) -> list[str | None]:
    """Division by a constant passes relevance through."""
    return data_only(node, {0: _to_input(b, node, 0, node.relevance[0])})
