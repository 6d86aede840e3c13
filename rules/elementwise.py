"""Binary element-wise ops: Add, Sum, Sub (residual merges, biases, preprocessing), Mul (gates,
constant scales, products), Div (by a constant, or by a normaliser such as RMSNorm's), and Neg.

Gradient: the partial derivatives times ``G``, summed over the axes an input was broadcast on.

Relevance:
- ``merge`` (Add, Sum, Sub): with two or more data inputs (a residual merge) the z-rule
  ``ΦXi = ±Xi ⊙ sdiv(Φ, Y ⊙ 1[Φ≠0])``; with one data input and constants (a bias, a mean
  subtracted in preprocessing, BatchNorm written out) ``ΦX = Φ``, as a linear layer's bias
  takes no relevance in the authors' rules.
- ``magnitude`` (Add, Sum; RAP's residual sums, spec "RAP at a residual sum"): the split by
  magnitude ``ΦXi = Φ ⊙ |Xi| / (Σj |Xj| + 1e-9)``: the shares have Φ's sign and sum to Φ, and
  never exceed it where the branches nearly cancel (``Y ≈ 0``), where the signed ratio ``Xi/Y`` of
  ``merge`` amplifies round-off (CUDA against CPU r 0.27–0.49 on ResNet-50). One data input: ``ΦX = Φ``.
- ``gate`` (Mul): a gate ``x ⊙ s(x)`` (SiLU, HardSwish written out, squeeze-excitation, GELU's
  ``x · ½(1 + erf(x/√2))``) gives all relevance to the signal ``x``, the input the other one is
  computed from; a constant scale passes relevance through; a product of two independent data
  tensors splits it half and half (spec "Attention", ``product.py``).
- ``pass`` (Div): division by a constant passes relevance through; so does division by a
  normaliser computed from the numerator, or from the ``x`` a numerator ``x − mean(x)`` centres
  (LayerNorm/RMSNorm written out: the normaliser is a constant of the forward pass); by an
  independent data tensor ``a / c = a · (1/c)``, half and half as a product.
- ``merge`` (Sub) of a centring ``x − ReduceMean(x)`` gives ``Φ`` to ``x``: the mean, like the
  normaliser, is a statistic of the forward pass (spec "Normalisations").
- ``pass`` (Neg): ``ΦX = Φ``.
"""

from __future__ import annotations

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import GraphView, NodeView

from ._helpers import data_only, output_ratio, pass_through, unbroadcast
from ._registry import gradient, relevance
from .product import elementwise_product_relevance


def _data_inputs(node: NodeView) -> list[int]:
    return [i for i in range(len(node.inputs)) if node.is_data(i)]


def _to_input(b: GraphBuilder, node: NodeView, index: int, value: str) -> str:
    return unbroadcast(b, value, node.shape(node.outputs[0]), node.shape(index))


@gradient("Add", "Sum")
def sum_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G to every data input, un-broadcast."""
    return data_only(node, {i: _to_input(b, node, i, node.gradient[0]) for i in _data_inputs(node)})


@gradient("Sub")
def sub_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G to the minuend, −G to the subtrahend, un-broadcast."""
    gradient_out = node.gradient[0]
    return data_only(node, {i: _to_input(b, node, i, gradient_out if i == 0 else b.Neg(gradient_out))
                            for i in _data_inputs(node)})


def _merge(b: GraphBuilder, node: NodeView, negated: int | None) -> list[str | None]:
    """z-rule over the data inputs, input ``negated`` entering with a minus sign; Φ through a lone one."""
    data, relevance_out = _data_inputs(node), node.relevance[0]
    if len(data) == 1:
        return data_only(node, {data[0]: _to_input(b, node, data[0], relevance_out)})
    ratio = output_ratio(b, node)
    shares = {}
    for i in data:
        share = b.Mul(node.inputs[i], ratio)
        shares[i] = _to_input(b, node, i, b.Neg(share) if i == negated else share)
    return data_only(node, shares)


@relevance("Add", "Sum", kind="merge")
def sum_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """z-rule across data inputs (residual merge); Φ passes through a constant bias."""
    return _merge(b, node, negated=None)


@relevance("Add", "Sum", kind="magnitude")
def sum_magnitude_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """split by magnitude across data inputs, Φ·abs(Xi) / (Σ abs(Xj) + 1e-9) (RAP's residual sums); Φ passes through a bias."""
    data, relevance_out = _data_inputs(node), node.relevance[0]
    if len(data) == 1:
        return data_only(node, {data[0]: _to_input(b, node, data[0], relevance_out)})
    magnitudes = {i: b.Abs(node.inputs[i]) for i in data}
    total = magnitudes[data[0]]
    for i in data[1:]:
        total = b.Add(total, magnitudes[i])
    ratio = b.Div(relevance_out, b.Add(total, b.const(1e-9)))
    return data_only(node, {i: _to_input(b, node, i, b.Mul(magnitudes[i], ratio)) for i in data})


def centred(graph: GraphView, tensor: str) -> str | None:
    """``x`` where ``tensor = x − ReduceMean(x)`` (a normalisation written out centres its input), else None."""
    producer = graph.producer.get(tensor)
    if producer is None or producer.op_type != "Sub":
        return None
    mean = graph.producer.get(producer.input[1])
    return producer.input[0] if mean is not None and mean.op_type == "ReduceMean" and \
        mean.input[0] == producer.input[0] else None


@relevance("Sub", kind="merge")
def sub_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """z-rule across data inputs (subtrahend's share −X₂ ⊙ S); Φ to x in a centring x − mean(x), and past a constant."""
    if centred(node.graph, node.outputs[0]) is not None:  # the mean is a statistic of the forward pass
        return data_only(node, {0: node.relevance[0]})
    return _merge(b, node, negated=1)


@gradient("Mul")
def mul_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G times the other factor, un-broadcast."""
    a, c = node.inputs
    return data_only(node, {i: _to_input(b, node, i, b.Mul(node.gradient[0], c if i == 0 else a))
                            for i in _data_inputs(node)})


def signal_input(node: NodeView) -> int | None:
    """Which input of a two-data-input Mul is the signal: the one the other is computed from
    (``None``: two independent data tensors, a product)."""
    a, c = node.inputs
    if node.graph.depends_on(c, a):
        return 0
    if node.graph.depends_on(a, c):
        return 1
    return None


@relevance("Mul", kind="gate")
def mul_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """A gate x·s(x) gives all relevance to x; a constant scale passes it; two independent data tensors: ½/½."""
    data = _data_inputs(node)
    keep = data[0] if len(data) == 1 else signal_input(node)
    if keep is None:
        return elementwise_product_relevance(b, node)
    return data_only(node, {keep: _to_input(b, node, keep, node.relevance[0])})


@gradient("Div")
def div_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G / c to the numerator, −G ⊙ Y / c to a data divisor, un-broadcast."""
    quotient, divisor = node.outputs[0], node.inputs[1]
    values = {0: b.Div(node.gradient[0], divisor),
              1: b.Neg(b.Div(b.Mul(node.gradient[0], quotient), divisor))}
    return data_only(node, {i: _to_input(b, node, i, values[i]) for i in _data_inputs(node)})


@relevance("Div", kind="pass")
def div_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Φ to the numerator when the divisor is a constant or computed from it (a normaliser); else ½/½."""
    numerator, divisor = node.inputs[0], node.inputs[1]
    normalised = [numerator, centred(node.graph, numerator)]  # x − mean(x) over a divisor computed from x
    if node.is_data(1) and not (node.is_data(0) and any(tensor is not None and node.graph.depends_on(divisor, tensor)
                                                        for tensor in normalised)):
        return elementwise_product_relevance(b, node)
    return data_only(node, {0: _to_input(b, node, 0, node.relevance[0])})


@gradient("Neg")
def neg_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """−G."""
    return data_only(node, {0: b.Neg(node.gradient[0])})


relevance("Neg", kind="pass")(pass_through)
