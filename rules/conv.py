"""Conv: ``Y = conv(X, W) + b``.

Gradient: ``VJP_conv(G) = conv_transpose(G, W)`` with the same strides, pads, dilations and
groups, and an output padding that restores X's size where the last rows fit no window; for a
stride-1 conv the same map as a conv of ``G`` with the flipped, transposed kernel and pads
``(k − 1)·d − p``, and for a strided depthwise conv that conv over ``G`` spread with zeros to
stride 1 (both faster in ONNX Runtime).

Relevance (spec "Linear layers"):
- ``agf``: the full AGF rule (eq. 10–14): absolute influence ``C`` (eq. 9), the gradient–input
  map ``M`` (eq. 12), the factorisations of the input and of the masked gradient over the
  partition ``φ = mean_c(C)`` (eq. 11), the input-agnostic ``A`` (eq. 10), Δ-shifted (eq. 14).
- ``flat``: ``ΦX = C``, what the authors use for 1×1 convs and convs feeding a residual Add.
- ``zB``: the z^B rule for the conv that reads the image.
- ``alpha1beta0``, ``alpha2beta1``: LRP-αβ (Bach et al. 2015) for the LRP baselines.
"""

from __future__ import annotations

import math

import numpy as np

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView
from agf_onnx.compiler.maths import (
    channel_mean,
    delta_shift,
    factorise,
    nonzero,
    normalise_by_max,
    safe_divide,
    where_nonzero,
)

from ._helpers import _ONE, Bilinear, data_only, explicit_pads
from ._registry import gradient, relevance


def geometry(node: NodeView) -> dict:
    """Explicit kernel, strides, dilations and begin/end pads (auto_pad resolved) of a Conv."""
    in_shape, w_shape = node.shape(0), node.shape(1)
    spatial = len(w_shape) - 2
    kernel = list(node.attr("kernel_shape", w_shape[2:]))
    strides = list(node.attr("strides", [1] * spatial))
    dilations = list(node.attr("dilations", [1] * spatial))
    out = [-(-size // stride) for size, stride in zip(in_shape[2:], strides)]  # what SAME padding makes
    pads = explicit_pads(node, in_shape[2:], out, kernel, strides, dilations)
    return {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": pads,
            "group": node.attr("group", 1)}


#: Pixels from which the explanation runs a pointwise conv as a MatMul over channels: ONNX Runtime's
#: Conv converts to and from its blocked layout around each conv, which costs more than it saves on
#: large maps (ResNet-50's 56² and 28² stages; on 14² and 7² maps its Conv is the faster).
POINTWISE_AS_MATMUL = 28 * 28


def _pointwise(node: NodeView) -> bool:
    shape = geometry(node)
    return (shape["group"] == 1 and set(shape["kernel_shape"]) == {1} and set(shape["strides"]) == {1}
            and not any(shape["pads"]) and math.prod(node.shape(0)[2:]) >= POINTWISE_AS_MATMUL)


def _channel_product(b: GraphBuilder, node: NodeView, matrix: str, x: str, channels_in: int, channels_out: int) -> str:
    """``matrix @ x`` over the channels of ``x`` ``[N, channels_in, *spatial]`` → ``[N, channels_out, *spatial]``."""
    spatial = node.shape(0)[2:]
    flat = b.Reshape(x, b.ints([-1, channels_in, math.prod(spatial)]))
    return b.Reshape(b.MatMul(matrix, flat), b.ints([-1, channels_out, *spatial]))


def _forward(b: GraphBuilder, node: NodeView, x: str, w: str) -> str:
    if _pointwise(node):
        out_channels, in_channels = node.shape(1)[:2]
        matrix = b.Reshape(w, b.ints([out_channels, in_channels]))
        return _channel_product(b, node, matrix, x, in_channels, out_channels)
    return b.Conv(x, w, **geometry(node))


def _shifted_forward(b: GraphBuilder, node: NodeView, x: str, w: str, shift: float) -> str:
    """``conv(x, w) + shift`` with the shift as the Conv's bias (the MatMul form adds it)."""
    if _pointwise(node):
        return b.Add(_forward(b, node, x, w), b.const(shift))
    return b.Conv(x, w, b.const(np.full(node.shape(1)[0], shift, np.float32)), **geometry(node))


def _vjp(b: GraphBuilder, node: NodeView, g: str, w: str) -> str:
    if _pointwise(node):
        out_channels, in_channels = node.shape(1)[:2]
        matrix = b.Transpose(b.Reshape(w, b.ints([out_channels, in_channels])), perm=[1, 0])
        return _channel_product(b, node, matrix, g, out_channels, in_channels)
    shape = geometry(node)
    in_size, out_size = node.shape(0)[2:], node.shape(node.outputs[0])[2:]
    spatial, strides = len(in_size), shape["strides"]
    reach = [(k - 1) * d for k, d in zip(shape["kernel_shape"], shape["dilations"])]
    # a stride-1 conv's VJP is a conv with the flipped, transposed kernel: ONNX Runtime's Conv kernels are
    # faster than its ConvTranspose (ResNet-50's AGF: 7 % less time; depthwise convs: 40× less). A strided
    # depthwise conv's VJP is that conv over G spread with zeros to stride 1 (a 1×1 ConvTranspose): 1.4–2.5×
    # faster than its ConvTranspose; dense strided convs keep ConvTranspose (the spread conv is 3× slower)
    spread = [(out - 1) * stride + 1 for out, stride in zip(out_size, strides)]
    begin = [r - p for r, p in zip(reach, shape["pads"][:spatial])]
    end = [size - out - first + r for size, out, first, r in zip(in_size, spread, begin, reach)]
    if min(begin + end) >= 0 and (set(strides) == {1} or _depthwise(node)):
        if set(strides) != {1}:
            channels = node.shape(1)[0]
            g = b.ConvTranspose(g, b.const(np.ones((channels, 1, *[1] * spatial), np.float32)), strides=strides,
                                group=channels)
        return b.Conv(g, _adjoint_kernel(b, node, w), kernel_shape=shape["kernel_shape"],
                      dilations=shape["dilations"], pads=begin + end, group=shape["group"])
    output_padding = []
    for i in range(spatial):
        covered = ((out_size[i] - 1) * strides[i] + reach[i] + 1 - shape["pads"][i] - shape["pads"][i + spatial])
        output_padding.append(in_size[i] - covered)
    return b.ConvTranspose(g, w, output_padding=output_padding if any(output_padding) else None, **shape)


def _depthwise(node: NodeView) -> bool:
    """One input and one output channel per group."""
    out_channels, group_channels = node.shape(1)[:2]
    return group_channels == 1 and node.attr("group", 1) == out_channels


def _adjoint_kernel(b: GraphBuilder, node: NodeView, w: str) -> str:
    """The kernel of the VJP of a stride-1 conv as a conv: per group, in- and out-channels swapped
    (``[C_out, C_in/g, *k]`` → ``[C_in, C_out/g, *k]``) and every spatial axis reversed. Built in the
    graph from ``w``, which ONNX Runtime folds when it loads the model (the file stays as small)."""
    if w == CONV.absolute_weight(b, node):  # |W|'s is |W's|: the swap and flip are shared
        return b.Abs(_adjoint_kernel(b, node, node.inputs[1]))
    out_channels, group_channels, *kernel = node.shape(1)
    group = node.attr("group", 1)
    per_group = out_channels // group
    rest = list(range(2, 2 + len(kernel)))
    if group == 1:
        swapped = b.Transpose(w, perm=[1, 0, *rest])
    elif per_group == 1 and group_channels == 1:  # depthwise: nothing to swap
        swapped = w
    else:
        grouped = b.Reshape(w, b.ints([group, per_group, group_channels, *kernel]))
        swapped = b.Reshape(b.Transpose(grouped, perm=[0, 2, 1, *(a + 1 for a in rest)]),
                            b.ints([group * group_channels, per_group, *kernel]))
    axes = [a for a, k in zip(rest, kernel) if k > 1]
    if not axes:
        return swapped
    return b.Slice(swapped, b.ints([-1] * len(axes)), b.ints([-(kernel[a - 2] + 1) for a in axes]), b.ints(axes),
                   b.ints([-1] * len(axes)))


CONV = Bilinear(weight=lambda b, node: node.inputs[1], forward=_forward, vjp=_vjp, shifted=_shifted_forward)


def _check(node: NodeView) -> None:
    if node.is_data(1) or (len(node.inputs) > 2 and node.is_data(2)):
        raise node.refuse("the weight or bias depends on the input; only constant weights are supported")


@gradient("Conv")
def conv_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """conv_transpose(G, W)."""
    _check(node)
    return CONV.gradient(b, node)


@relevance("Conv", kind="flat")
def conv_flat(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Absolute influence only: ΦX = C (authors' rule for 1×1 and residual-branch convs)."""
    return data_only(node, {0: CONV.absolute_influence(b, node)})


@relevance("Conv", kind="zB")
def conv_input_layer(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """z^B rule bounded by the image's per-sample minimum and maximum."""
    return CONV.input_layer(b, node)


def full_rule(b: GraphBuilder, x: str, gradient_in: str, masked_gradient: str, influence: str, agnostic: str,
              shape: tuple) -> str:
    """Eq. 10–14 on channel-first tensors ``[N, C, *spatial]`` (``shape = (C, *spatial)``):
    ``Δshift(C, (sdiv(Fx + M, 1 + e^-C) + Fdx + A) ⊙ 1[C≠0])`` from ``X``, ``g = VJP(G)``, ``gm = VJP(G ⊙ m)``, the absolute influence ``C`` and the
    input-agnostic ``A``. Shared by the conv and the token form of a linear layer (``gemm.py``)."""
    rank = len(shape) + 1
    gradient_map = normalise_by_max(b, b.Relu(channel_mean(b, b.Mul(x, gradient_in), shape)), rank, nonnegative=True)
    partition = channel_mean(b, influence, shape, flat=True)
    # Fx and Fdx in one factorisation of X and gm stacked along the batch (half the nodes)
    stacked = b.Concat(x, masked_gradient, axis=0)
    factors = b.Relu(factorise(b, stacked, b.Concat(partition, partition, axis=0), shape, stacks=2))
    # the halves by Gather, not an even Split of the batch: onnxruntime-web's JSEP (WebGPU) build gives such a
    # Split a zero-sized output (1.31.1: "[Relu] …/rel/Relu failed", "Program Sub has zero-sized tensor(s)")
    input_factor, gradient_factor = (b.Gather(factors, b.const(i, np.int64), axis=0) for i in (0, 1))
    # sdiv by 1 + e^-C ≥ 1 is never undefined and its +1e-9 is below float32's resolution there: a sigmoid
    sigmoid_weighted = b.Mul(b.Add(input_factor, gradient_map), b.Sigmoid(influence))
    residual = b.Mul(b.Add(b.Add(sigmoid_weighted, gradient_factor), agnostic), nonzero(b, influence))
    return delta_shift(b, influence, residual, rank)


@relevance("Conv", kind="agf")
def conv_agf(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Full AGF rule: Δshift(C, (sdiv(Fx + M, 1 + e^-C) + Fdx + A) ⊙ 1[C≠0]) (eq. 10–14)."""
    x, weight = node.inputs[0], node.inputs[1]
    relevance_out, gradient_out = node.relevance[0], node.gradient[0]
    shape = tuple(node.shape(0)[1:])
    masked_gradient = CONV.vjp(b, node, where_nonzero(b, gradient_out, relevance_out), weight)
    abs_weight = CONV.absolute_weight(b, node)
    # conv(1, |W|) is data-free: ONNX Runtime folds it (and sdiv's guard of it) once when it loads the model
    ones = b.ConstantOfShape(b.ints([1, *shape]), value=_ONE)
    ratio = safe_divide(b, relevance_out, _forward(b, node, ones, abs_weight), nonnegative=True, once=True)
    relevance_in = full_rule(b, x, node.input_gradients[0], masked_gradient, CONV.absolute_influence(b, node),
                             CONV.vjp(b, node, ratio, abs_weight), shape)
    return data_only(node, {0: relevance_in})


@relevance("Conv", kind="alpha1beta0")
def conv_alpha1beta0(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """LRP-α1β0 (z⁺ on positive inputs): positive contributions only, no bias."""
    return CONV.alpha_beta(b, node, 1.0, 0.0)


@relevance("Conv", kind="alpha2beta1")
def conv_alpha2beta1(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """LRP-α2β1: twice the positive contributions minus the negative ones, no bias."""
    return CONV.alpha_beta(b, node, 2.0, 1.0)


@relevance("Conv", kind="rap")
def conv_rap(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """RAP: relevance split by sign over the positive and negative contributions, shifted to conserve ΣR."""
    return CONV.relative(b, node, negative_on_second=True)
