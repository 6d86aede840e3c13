"""BatchNormalization at inference: ``Y = (X − μ)·γ/√(σ² + ε) + β``.

Gradient: ``G ⊙ γ/√(σ² + ε)`` per channel (computed from the model's own tensors and folded
when the model loads). Relevance: ``ΦX = Φ`` (spec "Pass-through ops").
"""

from __future__ import annotations

from agf_onnx.graph import NodeView

from ._helpers import data_only, pass_through
from ._registry import gradient, relevance


@gradient("BatchNormalization")
def batchnorm_gradient(b, node: NodeView) -> list[str | None]:
    """G ⊙ γ/√(σ² + ε), per channel."""
    if node.attr("training_mode", 0):
        raise node.refuse("training_mode=1; export the model in eval mode")
    if any(node.is_data(i) for i in range(1, 5)):
        raise node.refuse("scale, bias, mean and variance must be constants")
    scale, variance = node.inputs[1], node.inputs[4]
    factor = b.Div(scale, b.Sqrt(b.Add(variance, b.const(node.attr("epsilon", 1e-5)))))
    rank = len(node.shape(0))
    factor = b.Reshape(factor, b.ints([1, -1] + [1] * (rank - 2)))
    return data_only(node, {0: b.Mul(node.gradient[0], factor)})


relevance("BatchNormalization", kind="pass")(pass_through)
