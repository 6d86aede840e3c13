"""Normalisations: BatchNormalization at inference, ``Y = (X − μ)·γ/√(σ² + ε) + β``; LRN,
``Y = X / (bias + (α/n)·Σ_window X²)^β`` over a window of ``n`` channels; LayerNormalization
and InstanceNormalization (GroupNorm's opset-17 export), ``Y = X̂·γ + β`` with
``X̂ = (X − mean(X))·r``, ``r = 1/√(var(X) + ε)`` over the normalised axes.

Gradient: ``G ⊙ γ/√(σ² + ε)`` per channel (computed from the model's own tensors and folded
when the model loads); LRN's full derivative, the window sums as ones-kernel convs; Layer- and
InstanceNormalization: with ``Ĝ = G ⊙ γ``, ``VJP(G) = r ⊙ (Ĝ − mean(Ĝ) − X̂ ⊙ mean(Ĝ ⊙ X̂))``,
means over the normalised axes.
Relevance: ``ΦX = Φ`` for all (spec: "normalisations pass through"; the normaliser is a constant
of the forward pass, as in CP-LRP/AttnLRP).
"""

from __future__ import annotations

import numpy as np

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView

from ._helpers import data_only, pass_through, refuse_batch_axes
from ._registry import gradient, relevance


def batchnorm_scale(b: GraphBuilder, node: NodeView) -> str:
    """``γ/√(σ² + ε)`` per channel, ``[C]``: BatchNormalization at inference is ``X·scale + shift``."""
    return b.Div(node.inputs[1], b.Sqrt(b.Add(node.inputs[4], b.const(node.attr("epsilon", 1e-5)))))


def batchnorm_shift(b: GraphBuilder, node: NodeView) -> str:
    """``β − μ·γ/√(σ² + ε)`` per channel, ``[C]``: the bias BatchNormalization adds (FullGrad's bias term)."""
    return b.Sub(node.inputs[2], b.Mul(node.inputs[3], batchnorm_scale(b, node)))


@gradient("BatchNormalization")
def batchnorm_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G ⊙ γ/√(σ² + ε), per channel."""
    if node.attr("training_mode", 0):
        raise node.refuse("training_mode=1; export the model in eval mode")
    if any(node.is_data(i) for i in range(1, 5)):
        raise node.refuse("scale, bias, mean and variance must be constants")
    rank = len(node.shape(0))
    factor = b.Reshape(batchnorm_scale(b, node), b.ints([1, -1] + [1] * (rank - 2)))
    return data_only(node, {0: b.Mul(node.gradient[0], factor)})


relevance("BatchNormalization", kind="pass")(pass_through)


def _channel_window_sum(b: GraphBuilder, x: str, shape: list, before: int, after: int) -> str:
    """``Σ_{j=c-before}^{c+after} x_j`` over channels: a ones-kernel conv along the channel axis."""
    channels, *spatial = shape[1:]
    columns = b.Reshape(x, b.ints([0, 1, channels, -1]))
    ones = b.const(np.ones((1, 1, before + after + 1, 1), np.float32))
    summed = b.Conv(columns, ones, pads=[before, 0, after, 0])
    return b.Reshape(summed, b.ints([0, channels, *spatial]))


@gradient("LRN")
def lrn_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
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


def _normalised_gradient(b: GraphBuilder, node: NodeView, axes: list[int], scale: str) -> str:
    """``r ⊙ (Ĝ − mean(Ĝ) − X̂ ⊙ mean(Ĝ ⊙ X̂))``, ``Ĝ = G ⊙ γ``, means over ``axes`` (kept)."""
    x, epsilon = node.inputs[0], node.attr("epsilon", 1e-5)

    def mean(value: str) -> str:
        return b.ReduceMean(value, axes=axes, keepdims=1)

    centred = b.Sub(x, mean(x))
    inverse_deviation = b.Reciprocal(b.Sqrt(b.Add(mean(b.Mul(centred, centred)), b.const(epsilon))))
    normalised = b.Mul(centred, inverse_deviation)
    scaled = b.Mul(node.gradient[0], scale)
    return b.Mul(inverse_deviation, b.Sub(b.Sub(scaled, mean(scaled)), b.Mul(normalised, mean(b.Mul(scaled, normalised)))))


def _constant_affine(node: NodeView) -> None:
    if any(node.is_data(i) for i in range(1, len(node.inputs))):
        raise node.refuse("scale and bias must be constants (they depend on the input here)")


@gradient("LayerNormalization")
def layer_norm_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """r ⊙ (Ĝ − mean Ĝ − X̂ ⊙ mean(Ĝ ⊙ X̂)), Ĝ = G ⊙ γ, over the axes from ``axis`` on."""
    _constant_affine(node)
    rank = len(node.shape(0))
    axes = list(range(node.attr("axis", -1) % rank, rank))
    refuse_batch_axes(node, node.inputs[0], axes, "normalises")
    return data_only(node, {0: _normalised_gradient(b, node, axes, node.inputs[1])})


relevance("LayerNormalization", kind="pass")(pass_through)


@gradient("InstanceNormalization")
def instance_norm_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """r ⊙ (Ĝ − mean Ĝ − X̂ ⊙ mean(Ĝ ⊙ X̂)), Ĝ = G ⊙ γ, over the spatial axes of each channel."""
    _constant_affine(node)
    rank = len(node.shape(0))
    refuse_batch_axes(node, node.inputs[0], range(1, rank), "normalises [N, C, ...] per channel")
    scale = b.Reshape(node.inputs[1], b.ints([1, -1] + [1] * (rank - 2)))
    return data_only(node, {0: _normalised_gradient(b, node, list(range(2, rank)), scale)})


relevance("InstanceNormalization", kind="pass")(pass_through)
