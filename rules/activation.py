"""Element-wise activations.

Relu: ``VJP(G) = G ⊙ 1[X > 0]`` (PyTorch's convention at 0); relevance by the z-rule
``ΦX = X ⊙ VJP(sdiv(Φ, Y ⊙ 1[Φ≠0]))``, which passes ``Φ`` through where the unit is active
(the spec's proportional rule, as the authors' ReLU layer does).
"""

from __future__ import annotations

from agf_onnx.graph import NodeView

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
