"""MaxPool, AveragePool, GlobalAveragePool (ReduceMean, global pooling as newer exporters write it,
is in ``reduce.py``).

Gradient:
- MaxPool routes ``G`` to the arg-max of each window (the first maximum, as PyTorch and ONNX
  Runtime pick it) and *adds* where overlapping windows pick the same pixel: a one-hot mask of
  the windows' first maxima and a one-hot ConvTranspose (no ``Indices`` output: WebGPU lacks it).
- AveragePool spreads ``G / divisor`` over each window: a depthwise transposed conv with a
  ones kernel; the divisor map counts the pixels each window averages (``count_include_pad``
  and ``ceil_mode`` respected), computed from constants and folded when the model loads.
- GlobalAveragePool broadcasts ``G / (H·W)``.

Relevance: the z-rule ``ΦX = X ⊙ VJP_op(sdiv(Φ, Y ⊙ 1[Φ≠0]))`` for all three.
"""

from __future__ import annotations

import math

import numpy as np

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView

from ._helpers import explicit_pads, z_rule_op


def _window(node: NodeView) -> dict:
    """Kernel, strides, explicit begin/end pads, plus the extra end padding ``ceil_mode`` adds."""
    size = node.shape(0)[2:]
    spatial = len(size)
    kernel = list(node.attr("kernel_shape"))
    strides = list(node.attr("strides", [1] * spatial))
    dilations = list(node.attr("dilations", [1] * spatial))
    out = node.shape(node.outputs[0])[2:]
    pads = explicit_pads(node, size, out, kernel, strides, dilations)
    extra = [max(0, (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                 - size[i] - pads[i] - pads[i + spatial]) for i in range(spatial)]
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads, "extra": extra,
            "size": list(size), "out": list(out)}


@z_rule_op("MaxPool", "G routed to each window's first maximum (a mask), summed where windows overlap.",
           "z-rule: ΦX = X ⊙ route(sdiv(Φ, Y ⊙ 1[Φ≠0])) to each window's first maximum (Φ follows the maximum).",
           routes=True)
def _maxpool_vjp(b: GraphBuilder, node: NodeView, g: str) -> str:
    """``∂Y/∂X``: each window sends its ``G`` to the first pixel (row-major in the window) that equals its
    maximum, as PyTorch's and ONNX Runtime's MaxPool pick it, and pixels add what overlapping windows send.

    Built without MaxPool's ``Indices`` output (onnxruntime-web's WebGPU backends lack it): one ``Gather``
    of the input padded with −∞ (flattened per channel) collects every window's K pixels ``[N·C, K, *out]``
    (data movement only, so ties stay ties); ``ArgMax`` over K (the first maximum on ties) makes a one-hot
    mask, and a ConvTranspose (K channels in, one out) with one-hot kernels puts each window's routed ``G``
    back where its pixel lies, adding where windows overlap."""
    window = _window(node)
    spatial, channels = len(window["size"]), node.shape(0)[1]
    kernel, strides, dilations, out = window["kernel"], window["strides"], window["dilations"], window["out"]
    begin = window["pads"][:spatial]
    end = [p + e for p, e in zip(window["pads"][spatial:], window["extra"])]  # ceil_mode's last windows too
    padded = [n + p + q for n, p, q in zip(window["size"], begin, end)]
    x = node.inputs[0]
    if any(begin) or any(end):
        x = b.Pad(x, b.ints([0, 0, *begin, 0, 0, *end]), b.const(-np.inf))  # a pad never wins a window
    # pixel k (row-major in the window: the tie order) of window o sits at o·stride + k·dilation
    offsets = np.stack(np.meshgrid(*(np.arange(k) * d for k, d in zip(kernel, dilations)), indexing="ij"), -1)
    origins = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(out, strides)), indexing="ij"), -1)
    where = offsets.reshape(-1, *[1] * spatial, spatial) + origins[None]  # [K, *out, spatial]
    count = len(where)
    flat = np.ravel_multi_index(tuple(np.moveaxis(where, -1, 0)), padded).astype(np.int64)
    # channels folded into the batch, [N·C, K, *out]: the ConvTranspose below needs no groups (the WebGPU EP
    # of onnxruntime-web 1.31 computes a grouped ConvTranspose with K > 1 inputs per group wrongly)
    pixels = b.Gather(b.Reshape(x, b.ints([-1, math.prod(padded)])), b.const(flat, np.int64), axis=1)
    first = b.ArgMax(pixels, axis=1, keepdims=1)  # the first maximum where several pixels tie
    chosen = b.Equal(first, b.const(np.arange(count).reshape(1, count, *[1] * spatial), np.int64))
    routed = b.Where(chosen, b.Reshape(g, b.ints([-1, 1, *out])), b.const(0.0))
    output_padding = [window["size"][i] - ((out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                                           - begin[i] - end[i]) for i in range(spatial)]
    spread = b.ConvTranspose(routed,
                             b.const(np.eye(count, dtype=np.float32).reshape(count, 1, *kernel)), kernel_shape=kernel,
                             strides=strides, dilations=dilations, pads=begin + end,
                             output_padding=output_padding if any(output_padding) else None)
    return b.Reshape(spread, b.ints([-1, channels, *window["size"]]))


def _average_divisor(node: NodeView, window: dict) -> np.ndarray:
    """How many pixels each output averages, ``[1, 1, *out]``."""
    spatial = len(window["size"])
    counts = []
    for i in range(spatial):
        begin, end = window["pads"][i], window["pads"][i + spatial]
        lo, hi = (0, window["size"][i]) if not node.attr("count_include_pad", 0) else (-begin, window["size"][i] + end)
        starts = np.arange(window["out"][i]) * window["strides"][i] - begin
        stops = starts + window["kernel"][i]
        counts.append(np.minimum(stops, hi) - np.maximum(starts, lo))
    grid = counts[0]
    for axis_counts in counts[1:]:
        grid = np.multiply.outer(grid, axis_counts)
    return grid.astype(np.float32).reshape(1, 1, *window["out"])


@z_rule_op("AveragePool", "G / divisor spread over each window (depthwise transposed conv).",
           "z-rule: ΦX = X ⊙ spread(sdiv(Φ, Y ⊙ 1[Φ≠0]) / divisor), Φ shared in proportion to each pixel.")
def _averagepool_vjp(b: GraphBuilder, node: NodeView, g: str) -> str:
    window = _window(node)
    spatial, channels = len(window["size"]), node.shape(0)[1]
    if any(d != 1 for d in window["dilations"]):
        raise node.refuse("dilated AveragePool is not supported")
    ones = b.const(np.ones((channels, 1, *window["kernel"]), np.float32))
    pads = window["pads"][:spatial] + [e + x for e, x in zip(window["pads"][spatial:], window["extra"])]
    output_padding = [window["size"][i] - ((window["out"][i] - 1) * window["strides"][i] + window["kernel"][i]
                                           - pads[i] - pads[i + spatial]) for i in range(spatial)]
    spread = b.Div(g, b.const(_average_divisor(node, window)))
    return b.ConvTranspose(spread, ones, kernel_shape=window["kernel"], strides=window["strides"], pads=pads,
                           group=channels, output_padding=output_padding if any(output_padding) else None)


@z_rule_op("GlobalAveragePool", "G / (H·W), broadcast back.",
           "z-rule: ΦX = X ⊙ sdiv(Φ, Y ⊙ 1[Φ≠0]) / (H·W), Φ shared in proportion to each pixel.")
def _global_average_vjp(b: GraphBuilder, node: NodeView, g: str) -> str:
    spatial = node.shape(0)[2:]
    return b.Expand(b.Div(g, b.const(float(math.prod(spatial)))), b.ints([1, 1, *spatial]))
