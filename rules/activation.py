"""Element-wise activations.

Relu: ``VJP(G) = G ⊙ 1[X > 0]`` (PyTorch's convention at 0); relevance by the z-rule
``ΦX = X ⊙ VJP(sdiv(Φ, Y ⊙ 1[Φ≠0]))``, which passes ``Φ`` through where the unit is active
(the spec's proportional rule, as the authors' ReLU layer does).

Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, PRelu, Clip (ReLU6): ``VJP(G) = G ⊙ dY/dX``;
relevance ``ΦX = Φ ⊙ 1[Y ≠ 0]`` (``active``): the spec's rule for activations the authors
never met — relevance passes where the unit's output is non-zero.
"""

from __future__ import annotations

from agf_onnx.graph import NodeView
from agf_onnx.maths import nonzero

from ._helpers import data_only, proportional
from ._registry import gradient, relevance


def _relu_vjp(b, node: NodeView, g: str) -> str:
    return b.Mul(g, b.Cast(b.Greater(node.inputs[0], b.const(0.0)), to=1))


@gradient("Relu")
def relu_gradient(b, node: NodeView) -> list[str | None]:
    """G ⊙ 1[X > 0]."""
    return data_only(node, {0: _relu_vjp(b, node, node.gradient[0])})


@relevance("Relu", kind="z")
def relu_relevance(b, node: NodeView) -> list[str | None]:
    """z-rule: ΦX = X ⊙ 1[X>0] ⊙ sdiv(Φ, Y ⊙ 1[Φ≠0])."""
    return proportional(b, node, _relu_vjp)


# -- activations the authors never met: pass relevance where the unit is active ------------------
# The spec's spirit for element-wise activations: ΦX = Φ ⊙ 1[Y ≠ 0]. For ReLU that is what the
# z-rule gives (X/Y = 1 where active); smooth activations (Sigmoid, Tanh) are never exactly 0
# and pass everything; HardSwish, HardSigmoid, Clip and LeakyReLU block where they output 0.

def _greater(b, x: str, value: float) -> str:
    return b.Cast(b.Greater(x, b.const(value)), to=1)


def _derivative(b, node: NodeView) -> str:
    """dY/dX of an element-wise activation, from its input X and output Y."""
    x, y = node.inputs[0], node.outputs[0]
    op = node.op_type
    if op == "Sigmoid":
        return b.Mul(y, b.Sub(b.const(1.0), y))
    if op == "Tanh":
        return b.Sub(b.const(1.0), b.Mul(y, y))
    if op == "HardSigmoid":
        alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
        inner = b.Add(b.Mul(x, b.const(alpha)), b.const(beta))
        return b.Mul(b.Mul(_greater(b, inner, 0.0), b.Cast(b.Less(inner, b.const(1.0)), to=1)), b.const(alpha))
    if op == "HardSwish":  # 0 below -3, x/3 + 1/2 in between, 1 above 3 (PyTorch's convention)
        middle = b.Add(b.Div(x, b.const(3.0)), b.const(0.5))
        above = _greater(b, x, 3.0)
        inside = b.Mul(b.Cast(b.Not(b.Less(x, b.const(-3.0))), to=1), b.Sub(b.const(1.0), above))
        return b.Add(b.Mul(inside, middle), above)
    if op in ("LeakyRelu", "PRelu"):
        slope = b.const(node.attr("alpha", 0.01)) if op == "LeakyRelu" else node.inputs[1]
        positive = _greater(b, x, 0.0)
        return b.Add(positive, b.Mul(b.Sub(b.const(1.0), positive), slope))
    if op == "Clip":  # 1 strictly inside [min, max], as PyTorch's hardtanh/ReLU6
        inside = b.const(1.0)
        if len(node.inputs) > 1 and node.inputs[1]:
            inside = b.Mul(inside, b.Cast(b.Greater(x, node.inputs[1]), to=1))
        if len(node.inputs) > 2 and node.inputs[2]:
            inside = b.Mul(inside, b.Cast(b.Less(x, node.inputs[2]), to=1))
        return inside
    raise node.refuse("no derivative rule")


_SMOOTH = ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Clip")


@gradient(*_SMOOTH)
def activation_gradient(b, node: NodeView) -> list[str | None]:
    """G ⊙ dY/dX (element-wise)."""
    if any(node.is_data(i) for i in range(1, len(node.inputs))):
        raise node.refuse("slope, min and max must be constants")
    if node.op_type == "PRelu" and len(node.shape(1)) > len(node.shape(0)):
        raise node.refuse("the slope has more axes than the input")
    return data_only(node, {0: b.Mul(node.gradient[0], _derivative(b, node))})


@relevance(*_SMOOTH, kind="active")
def activation_relevance(b, node: NodeView) -> list[str | None]:
    """Passes relevance where the unit is active: ΦX = Φ ⊙ 1[Y ≠ 0]."""
    return data_only(node, {0: b.Mul(node.relevance[0], nonzero(b, node.outputs[0]))})
