"""Products of two data tensors: MatMul (batched, broadcast; registered in ``gemm.py`` beside the
constant-weight case), Einsum, and the relevance of Mul and Div by a data tensor.

Gradient: ``Y = A·B`` (MatMul) gives ``VJP_A(G) = G·Bᵀ`` and ``VJP_B(G) = Aᵀ·G`` (the last two
axes transposed), each summed over the axes it was broadcast on; Einsum ``Y = einsum(a,b→y)``
gives ``VJP_A(G) = einsum(y,b→a)``, broadcast back over indices only A has.

Relevance (spec "Attention"), with ``S = sdiv(Φ, Y ⊙ 1[Φ≠0])``:
- one operand is an attention matrix (a Softmax's output, possibly through Dropout, Identity,
  Cast, Reshape, Transpose): it is a constant of the forward pass, the other operand ``V`` gets
  all relevance by the z-rule with the attention as its weight, ``ΦV = V ⊙ VJP_V(S)``, the
  attention none;
- any other product of two data tensors splits relevance half and half, each half by the
  z-rule on its operand, ``ΦA = ½ A ⊙ VJP_A(S)``, ``ΦB = ½ B ⊙ VJP_B(S)`` (conserving ``ΣΦ``
  where ``Y ≠ 0``); for an element-wise product ``A ⊙ VJP_A(S) = Y ⊙ S`` (un-broadcast);
- with one data operand and a constant, the data operand gets all of it by the z-rule.
"""

from __future__ import annotations

from collections.abc import Callable

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import GraphView, NodeView
from agf_onnx.compiler.tokens import nan_guard

from ._helpers import batch_axis, broadcast_shape, data_only, output_ratio, unbroadcast
from ._registry import gradient, relevance

#: Ops between a Softmax and the product that leave it an attention matrix.
_KEEPS_ATTENTION = {"Dropout", "Identity", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}

#: ``(b, node, operand index, upstream)`` → the VJP of the product in that operand.
OperandVjp = Callable[[GraphBuilder, NodeView, int, str], str]


def is_attention(graph: GraphView, tensor: str) -> bool:
    """Whether ``tensor`` is a Softmax's output, possibly moved or cast on the way."""
    producer = graph.producer.get(tensor)
    while producer is not None and (producer.op_type in _KEEPS_ATTENTION or _guards_nan(graph, producer)):
        producer = graph.producer.get(producer.input[0] if producer.op_type in _KEEPS_ATTENTION else producer.input[2])
    return producer is not None and producer.op_type == "Softmax"


def _guards_nan(graph: GraphView, node) -> bool:
    """``Where(IsNaN(A), c, A)``: the NaN guard of a fully masked softmax (``tokens.nan_guard``)."""
    return node.op_type == "Where" and nan_guard(graph, node.input[2]) == node.output[0]


def _data_inputs(node: NodeView) -> list[int]:
    return [i for i in range(len(node.inputs)) if node.is_data(i)]


def product_relevance(b: GraphBuilder, node: NodeView, vjp: OperandVjp) -> list[str | None]:
    """The spec's rule for a product: all to the values of an attention product, else ½/½, each
    share ``X ⊙ VJP_X(sdiv(Φ, Y ⊙ 1[Φ≠0]))``."""
    ratio = output_ratio(b, node)
    data = _data_inputs(node)
    attention = [i for i in data if is_attention(node.graph, node.inputs[i])]
    if len(data) == 2 and len(attention) == 1:
        shares = {next(i for i in data if i not in attention): 1.0}
    else:
        shares = {i: 1.0 / len(data) for i in data}
    values = {}
    for i, share in shares.items():
        value = b.Mul(node.inputs[i], vjp(b, node, i, ratio))
        values[i] = value if share == 1.0 else b.Mul(value, b.const(share))
    return data_only(node, values)


def elementwise_product_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """½/½ (or all to the one data operand) of an element-wise product: ``X ⊙ VJP_X(S) = Y ⊙ S``."""
    ratio = output_ratio(b, node)
    contribution = b.Mul(node.outputs[0], ratio)
    data = _data_inputs(node)
    if len(data) > 1:
        contribution = b.Mul(contribution, b.const(1.0 / len(data)))
    out_shape = node.shape(node.outputs[0])
    return data_only(node, {i: unbroadcast(b, contribution, out_shape, node.shape(i)) for i in data})


# -- MatMul of two data tensors ---------------------------------------------------------------------

def _swap_last(b: GraphBuilder, x: str, rank: int) -> str:
    return b.Transpose(x, perm=[*range(rank - 2), rank - 1, rank - 2])


def check_matmul(node: NodeView) -> None:
    """Refuse what the two-operand MatMul rules do not cover: vectors, a batch among the matrix axes."""
    for i in (0, 1):
        rank = len(node.shape(i))
        if rank < 2:
            raise node.refuse(f"operand {i} is {rank}-D; MatMul of two data tensors needs matrices (rank ≥ 2)")
        axis = batch_axis(node, node.inputs[i]) if node.is_data(i) else None
        if axis is not None and axis >= rank - 2:
            raise node.refuse(f"the batch is axis {axis} of operand {i}, one of the multiplied matrix axes; "
                              "samples must stay independent")


def matmul_operand_vjp(b: GraphBuilder, node: NodeView, index: int, upstream: str) -> str:
    """``G·Bᵀ`` for A, ``Aᵀ·G`` for B, summed over the axes the operand was broadcast on."""
    a, c = node.inputs
    if index == 0:
        value = b.MatMul(upstream, _swap_last(b, c, len(node.shape(1))))
    else:
        value = b.MatMul(_swap_last(b, a, len(node.shape(0))), upstream)
    out_shape = node.shape(node.outputs[0])
    # the product of the two broadcast operands has the output's batch axes
    return unbroadcast(b, value, out_shape[:-2] + tuple(node.shape(index)[-2:]), node.shape(index))


def matmul_product_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G·Bᵀ and Aᵀ·G, un-broadcast, for every data operand."""
    check_matmul(node)
    return data_only(node, {i: matmul_operand_vjp(b, node, i, node.gradient[0]) for i in _data_inputs(node)})


def matmul_product_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Attention: all to the values (z-rule, A constant); otherwise ½/½ by the z-rule."""
    check_matmul(node)
    return product_relevance(b, node, matmul_operand_vjp)


# -- Einsum -----------------------------------------------------------------------------------------

_ELLIPSIS = "..."


def _labels(term: str) -> list[str]:
    """``"...bij"`` → ``["...", "b", "i", "j"]``."""
    return ([_ELLIPSIS] if term.startswith(_ELLIPSIS) else []) + list(term.replace(_ELLIPSIS, ""))


def parse_einsum(node: NodeView) -> tuple[list[list[str]], list[str]]:
    """The operands' and the output's labels; refuses what the rules do not cover."""
    equation = node.attr("equation", "").replace(" ", "")
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    if len(terms) != 2:
        raise node.refuse(f"equation '{equation}' has {len(terms)} operand(s); only two-operand Einsum is supported")
    for term in [*terms, right]:
        if _ELLIPSIS in term[1:] or term.count(".") not in (0, 3):
            raise node.refuse(f"equation '{equation}': an ellipsis is supported only at the start of a term")
    operands = [_labels(term) for term in terms]
    for term, labels in zip(terms, operands):
        letters = [label for label in labels if label != _ELLIPSIS]
        if len(set(letters)) != len(letters):
            raise node.refuse(f"equation '{equation}': an index repeated inside the operand '{term}' (a diagonal) "
                              "is not supported")
    if arrow:
        output = _labels(right)
    else:  # implicit mode: the ellipsis, then the indices that appear once, sorted
        everything = [label for labels in operands for label in labels if label != _ELLIPSIS]
        output = ([_ELLIPSIS] if any(_ELLIPSIS in labels for labels in operands) else []) + \
            sorted(label for label in set(everything) if everything.count(label) == 1)
    for i, labels in enumerate(operands):
        if _ELLIPSIS in labels and _ELLIPSIS not in output:
            raise node.refuse(f"equation '{equation}' sums over the ellipsis axes of operand {i}")
        if _ELLIPSIS in output and _ELLIPSIS not in labels and node.is_data(i):
            raise node.refuse(f"equation '{equation}': operand {i} has no ellipsis but the output has; not supported")
    return operands, output


def _axis_label(labels: list[str], rank: int, axis: int) -> str:
    """The label of ``axis`` of an operand of ``rank`` (``"..."`` for an ellipsis axis)."""
    explicit = [label for label in labels if label != _ELLIPSIS]
    leading = rank - len(explicit)
    return _ELLIPSIS if axis < leading else explicit[axis - leading]


def check_einsum(node: NodeView) -> tuple[list[list[str]], list[str]]:
    operands, output = parse_einsum(node)
    for i, labels in enumerate(operands):
        axis = batch_axis(node, node.inputs[i]) if node.is_data(i) else None
        if axis is not None and _axis_label(labels, len(node.shape(i)), axis) not in output:
            raise node.refuse(f"sums over axis {axis} of operand {i}, which carries the batch; samples must stay "
                              "independent")
    return operands, output


def _term(labels: list[str]) -> str:
    return "".join(labels)


def einsum_operand_vjp(b: GraphBuilder, node: NodeView, index: int, upstream: str) -> str:
    """``einsum(y, other → a)``; broadcast back over indices only this operand has, and summed over
    the ellipsis axes it was broadcast on."""
    operands, output = parse_einsum(node)
    mine, other = operands[index], operands[1 - index]
    kept = [label for label in mine if label in output or label in other]
    value = b.Einsum(upstream, node.inputs[1 - index], equation=f"{_term(output)},{_term(other)}->{_term(kept)}")
    shape = list(node.shape(index))
    explicit = [label for label in mine if label != _ELLIPSIS]
    leading = len(shape) - len(explicit)
    sizes = dict(zip(explicit, shape[leading:]))
    out_shape = list(node.shape(node.outputs[0]))
    out_explicit = len([label for label in output if label != _ELLIPSIS])
    out_leading = out_shape[:len(out_shape) - out_explicit] if _ELLIPSIS in kept else []
    kept_explicit = [label for label in kept if label != _ELLIPSIS]
    dropped = [leading + explicit.index(label) for label in explicit if label not in kept]
    kept_shape = shape[:leading] + [sizes[label] for label in kept_explicit]
    value = unbroadcast(b, value, tuple(out_leading + kept_shape[leading:]), tuple(kept_shape))
    if dropped:
        value = b.Expand(b.Unsqueeze(value, b.ints(dropped)), b.ints(broadcast_shape(shape)))
    return value


@gradient("Einsum")
def einsum_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """einsum(y, other → operand) for each data operand, broadcast back over its own indices."""
    check_einsum(node)
    return data_only(node, {i: einsum_operand_vjp(b, node, i, node.gradient[0]) for i in _data_inputs(node)})


@relevance("Einsum", kind="product")
def einsum_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Attention: all to the values (z-rule, attention constant); two data operands: ½/½ by the z-rule."""
    check_einsum(node)
    return product_relevance(b, node, einsum_operand_vjp)
