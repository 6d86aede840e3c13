"""Normalisations: BatchNormalization at inference, ``Y = (X − μ)·γ/√(σ² + ε) + β``, and LRN,
``Y = X / (bias + (α/n)·Σ_window X²)^β`` over a window of ``n`` channels.

Gradient: ``G ⊙ γ/√(σ² + ε)`` per channel (computed from the model's own tensors and folded
when the model loads); LRN's full derivative, the window sums as ones-kernel convs.
Relevance: ``ΦX = Φ`` for both (spec: "normalisations pass through").
"""

from __future__ import annotations

import numpy as np

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


def _channel_window_sum(b, x: str, shape: list, before: int, after: int) -> str:
    """``Σ_{j=c-before}^{c+after} x_j`` over channels: a ones-kernel conv along the channel axis."""
    channels, *spatial = shape[1:]
    columns = b.Reshape(x, b.ints([0, 1, channels, -1]))
    ones = b.const(np.ones((1, 1, before + after + 1, 1), np.float32))
    summed = b.Conv(columns, ones, pads=[before, 0, after, 0])
    return b.Reshape(summed, b.ints([0, channels, *spatial]))


@gradient("LRN")
def lrn_gradient(b, node: NodeView) -> list[str | None]:
    """G·d^-β − (2αβ/n)·X·W*(G·X·d^(-β-1)), d = bias + (α/n)·W(X²), W the channel window."""
    size, alpha = node.attr("size"), node.attr("alpha", 1e-4)
    beta, bias = node.attr("beta", 0.75), node.attr("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    x, shape = node.inputs[0], list(node.shape(0))
    base = b.Add(b.const(bias), b.Mul(b.const(alpha / size), _channel_window_sum(b, b.Mul(x, x), shape, before, after)))
    scale = b.Pow(base, b.const(-beta))
    cross = b.Div(b.Mul(b.Mul(node.gradient[0], x), scale), base)
    spread = _channel_window_sum(b, cross, shape, after, before)  # the window's adjoint: mirrored
    return data_only(node, {0: b.Sub(b.Mul(node.gradient[0], scale),
                                     b.Mul(b.Mul(x, spread), b.const(2 * alpha * beta / size)))})


relevance("LRN", kind="pass")(pass_through)
