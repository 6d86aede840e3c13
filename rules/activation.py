"""Element-wise activations and functions, and Softmax/LogSoftmax.

Relu: ``VJP(G) = G ⊙ 1[X > 0]`` (PyTorch's convention at 0); relevance by the z-rule
``ΦX = X ⊙ VJP(sdiv(Φ, Y ⊙ 1[Φ≠0]))``, which passes ``Φ`` through where the unit is active
(the spec's proportional rule, as the authors' ReLU layer does).

Every other element-wise op ``Y = f(X)`` (Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, PRelu,
Clip, Erf, Gelu (opset 20: the same relevance as its written-out form's gate), Exp, Sqrt, Reciprocal, Pow by a constant, Softplus, Max/Min with constants):
``VJP(G) = G ⊙ f'(X)``; relevance ``ΦX = Φ ⊙ 1[Y ≠ 0]`` (``active``): the spec's rule for
activations the authors never met — relevance passes where the unit's output is non-zero (a gate
``x ⊙ s(x)`` such as GELU's ``x · ½(1 + erf(x/√2))`` is the Mul's rule: all relevance to ``x``).

Softmax / LogSoftmax along any axis but the batch's: ``VJP(G) = Y ⊙ (G − Σ_axis G ⊙ Y)`` and
``G − e^Y ⊙ Σ_axis G``. Their input gets no relevance (``none``): a softmax inside the network
computes attention weights, which the spec treats as constants of the forward pass; the relevance
goes to the values they weight (``rules/product.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from onnx import TensorProto

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView
from agf_onnx.compiler.maths import where_nonzero

from ._helpers import data_only, named, refuse_batch_axes, routed_share
from ._registry import gradient, relevance


@gradient("Relu")
def relu_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G ⊙ 1[X > 0], read as G where Y ≠ 0 (the same set; the test is shared with the relevance rule)."""
    return data_only(node, {0: where_nonzero(b, node.gradient[0], node.outputs[0])})


@relevance("Relu", kind="z")
def relu_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """z-rule: ΦX = X ⊙ 1[X>0] ⊙ sdiv(Φ, Y ⊙ 1[Φ≠0]), computed as the equal (Φ ⊙ Y) / (Y + 1e-9)."""
    return data_only(node, {0: routed_share(b, node)})


# -- element-wise functions: G ⊙ f'(X), relevance where the unit is active ------------------------
# The spec's spirit for element-wise activations: ΦX = Φ ⊙ 1[Y ≠ 0]. For ReLU that is what the
# z-rule gives (X/Y = 1 where active); smooth activations (Sigmoid, Tanh) are never exactly 0
# and pass everything; HardSwish, HardSigmoid, Clip and LeakyReLU block where they output 0.

Derivative = Callable[[GraphBuilder, NodeView], str]


def _greater(b: GraphBuilder, x: str, value: float) -> str:
    return b.Cast(b.Greater(x, b.const(value)), to=1)


def _constant_parameters(node: NodeView) -> None:
    if any(node.is_data(i) for i in range(1, len(node.inputs))):
        raise node.refuse("slope, exponent, min and max must be constants (they depend on the input here)")


def elementwise(op_type: str, summary: str) -> Callable[[Derivative], Derivative]:
    """Register ``derivative`` (``f'(X)`` from the node's tensors) as the gradient ``G ⊙ f'(X)`` of
    ``op_type`` with the one-line description ``summary``, and ``active`` as its relevance."""

    def register(derivative: Derivative) -> Derivative:
        def rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
            _constant_parameters(node)
            return data_only(node, {0: b.Mul(node.gradient[0], derivative(b, node))})

        gradient(op_type)(named(rule, f"{op_type.lower()}_gradient", summary, derivative.__module__))
        relevance(op_type, kind="active")(activation_relevance)
        return derivative

    return register


def activation_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Passes relevance where the unit is active: ΦX = Φ ⊙ 1[Y ≠ 0]."""
    return data_only(node, {0: where_nonzero(b, node.relevance[0], node.outputs[0])})


@elementwise("Sigmoid", "G ⊙ Y(1 − Y).")
def _sigmoid(b: GraphBuilder, node: NodeView) -> str:
    y = node.outputs[0]
    return b.Mul(y, b.Sub(b.const(1.0), y))


@elementwise("Tanh", "G ⊙ (1 − Y²).")
def _tanh(b: GraphBuilder, node: NodeView) -> str:
    y = node.outputs[0]
    return b.Sub(b.const(1.0), b.Mul(y, y))


@elementwise("HardSigmoid", "G ⊙ α where 0 < αX + β < 1, else 0.")
def _hard_sigmoid(b: GraphBuilder, node: NodeView) -> str:
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    inner = b.Add(b.Mul(node.inputs[0], b.const(alpha)), b.const(beta))
    return b.Mul(b.Mul(_greater(b, inner, 0.0), b.Cast(b.Less(inner, b.const(1.0)), to=1)), b.const(alpha))


@elementwise("HardSwish", "G ⊙ (0 below −3, X/3 + ½ in between, 1 above 3), PyTorch's convention.")
def _hard_swish(b: GraphBuilder, node: NodeView) -> str:
    x = node.inputs[0]
    middle = b.Add(b.Div(x, b.const(3.0)), b.const(0.5))
    above = _greater(b, x, 3.0)
    inside = b.Mul(b.Cast(b.Not(b.Less(x, b.const(-3.0))), to=1), b.Sub(b.const(1.0), above))
    return b.Add(b.Mul(inside, middle), above)


def _leaky(b: GraphBuilder, node: NodeView, slope: str) -> str:
    positive = _greater(b, node.inputs[0], 0.0)
    return b.Add(positive, b.Mul(b.Sub(b.const(1.0), positive), slope))


@elementwise("LeakyRelu", "G ⊙ (1 where X > 0, else α).")
def _leaky_relu(b: GraphBuilder, node: NodeView) -> str:
    return _leaky(b, node, b.const(node.attr("alpha", 0.01)))


@elementwise("PRelu", "G ⊙ (1 where X > 0, else the constant slope).")
def _prelu(b: GraphBuilder, node: NodeView) -> str:
    if len(node.shape(1)) > len(node.shape(0)):
        raise node.refuse("the slope has more axes than the input")
    return _leaky(b, node, node.inputs[1])


@gradient("Clip")
def clip_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G ⊙ 1[min < X < max] (PyTorch's hardtanh/ReLU6), read as G where Y is at neither bound:
    ``Y > min`` and ``Y < max``, tested as bools and cast once (a min of 0 tests ``Y ≠ 0``, the
    relevance rule's mask)."""
    _constant_parameters(node)
    y, inside = node.outputs[0], None
    for index, compare in ((1, b.Greater), (2, b.Less)):
        if len(node.inputs) <= index or not node.inputs[index]:
            continue
        bound = node.inputs[index]
        if index == 1 and node.graph.is_constant(bound) and _is_zero(node, bound):
            test = b.Cast(y, to=TensorProto.BOOL)  # Y ≥ 0: Y > 0 is Y ≠ 0
        else:
            test = compare(y, bound)
        inside = test if inside is None else b.And(inside, test)
    if inside is None:
        return data_only(node, {0: node.gradient[0]})
    return data_only(node, {0: b.Mul(node.gradient[0], b.Cast(inside, to=TensorProto.FLOAT))})


def _is_zero(node: NodeView, name: str) -> bool:
    value = node.graph.value(name)
    return value.size == 1 and float(value.reshape(-1)[0]) == 0.0


relevance("Clip", kind="active")(activation_relevance)


@elementwise("Erf", "G ⊙ 2/√π · exp(−X²).")
def _erf(b: GraphBuilder, node: NodeView) -> str:
    x = node.inputs[0]
    return b.Mul(b.Exp(b.Neg(b.Mul(x, x))), b.const(2.0 / math.sqrt(math.pi)))


@elementwise("Gelu", "G ⊙ (Φ(X) + X·φ(X)), or the derivative of the tanh form with approximate='tanh' (opset 20).")
def _gelu(b: GraphBuilder, node: NodeView) -> str:
    x = node.inputs[0]
    if node.attr("approximate", "none") == "tanh":  # ½(1 + t) + ½X(1 − t²)·√(2/π)(1 + 3c·X²), t = tanh(u)
        c, root = 0.044715, math.sqrt(2.0 / math.pi)
        squared = b.Mul(x, x)
        t = b.Tanh(b.Mul(b.Mul(x, b.Add(b.Mul(squared, b.const(c)), b.const(1.0))), b.const(root)))
        inner = b.Mul(b.Add(b.Mul(squared, b.const(3.0 * c)), b.const(1.0)), b.const(root))
        slope = b.Mul(b.Mul(x, b.Sub(b.const(1.0), b.Mul(t, t))), inner)
        return b.Mul(b.Add(b.Add(t, b.const(1.0)), slope), b.const(0.5))
    cdf = b.Mul(b.Add(b.Erf(b.Mul(x, b.const(1.0 / math.sqrt(2.0)))), b.const(1.0)), b.const(0.5))
    density = b.Mul(b.Exp(b.Mul(b.Mul(x, x), b.const(-0.5))), b.const(1.0 / math.sqrt(2.0 * math.pi)))
    return b.Add(cdf, b.Mul(x, density))


@elementwise("Exp", "G ⊙ Y.")
def _exp(b: GraphBuilder, node: NodeView) -> str:
    return node.outputs[0]


@elementwise("Sqrt", "G ⊙ ½ / Y.")
def _sqrt(b: GraphBuilder, node: NodeView) -> str:
    return b.Div(b.const(0.5), node.outputs[0])


@elementwise("Reciprocal", "G ⊙ (−Y²).")
def _reciprocal(b: GraphBuilder, node: NodeView) -> str:
    y = node.outputs[0]
    return b.Neg(b.Mul(y, y))


@elementwise("Pow", "G ⊙ p · X^(p−1) for a constant exponent p (RMSNorm's X²).")
def _pow(b: GraphBuilder, node: NodeView) -> str:
    x, exponent = node.inputs[0], node.inputs[1]
    if node.graph.dtypes.get(exponent) != 1:  # Pow(float, int): the exponent as float
        exponent = b.Cast(exponent, to=1)
    return b.Mul(b.Pow(x, b.Sub(exponent, b.const(1.0))), exponent)


@elementwise("Softplus", "G ⊙ sigmoid(X).")
def _softplus(b: GraphBuilder, node: NodeView) -> str:
    return b.Sigmoid(node.inputs[0])


def _picked(b: GraphBuilder, node: NodeView) -> str:
    """``1[X = Y]``: where the one data input is the result (ties with a constant count, as clamp's)."""
    data = [i for i in range(len(node.inputs)) if node.is_data(i)]
    if data != [0]:
        raise node.refuse(f"{node.op_type} of several data tensors; only a clamp by constants is supported")
    return b.Cast(b.Equal(node.inputs[0], node.outputs[0]), to=1)


elementwise("Max", "G ⊙ 1[X = Y]: where X is not clamped by the constants (torch.clamp's convention).")(_picked)
elementwise("Min", "G ⊙ 1[X = Y]: where X is not clamped by the constants (torch.clamp's convention).")(_picked)


# -- Softmax and LogSoftmax ----------------------------------------------------------------------

def _softmax_axis(node: NodeView) -> int:
    axis = node.attr("axis", -1)
    refuse_batch_axes(node, node.inputs[0], [axis], "normalises")
    return axis


@gradient("Softmax")
def softmax_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Y ⊙ (G − Σ_axis G ⊙ Y), along any axis but the batch's."""
    axis, y, g = _softmax_axis(node), node.outputs[0], node.gradient[0]
    inner = b.ReduceSum(b.Mul(g, y), b.ints([axis]), keepdims=1)
    return data_only(node, {0: b.Mul(y, b.Sub(g, inner))})


@gradient("LogSoftmax")
def log_softmax_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G − exp(Y) ⊙ Σ_axis G, along any axis but the batch's."""
    axis, y, g = _softmax_axis(node), node.outputs[0], node.gradient[0]
    return data_only(node, {0: b.Sub(g, b.Mul(b.Exp(y), b.ReduceSum(g, b.ints([axis]), keepdims=1)))})


@relevance("Softmax", "LogSoftmax", kind="none")
def no_relevance(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """No relevance to the input: attention weights are constants of the forward pass (spec "Attention")."""
    return [None] * len(node.inputs)
