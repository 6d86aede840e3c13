"""MaxPool, AveragePool, GlobalAveragePool (ReduceMean, global pooling as newer exporters write it,
is in ``reduce.py``).

Gradient:
- MaxPool routes ``G`` to the arg-max of each window (the first maximum, as PyTorch and ONNX
  Runtime pick it) and *adds* where overlapping windows pick the same pixel: a scatter-add
  of ``G`` at the pool's own ``Indices``.
- AveragePool spreads ``G / divisor`` over each window: a depthwise transposed conv with a
  ones kernel; the divisor map counts the pixels each window averages (``count_include_pad``
  and ``ceil_mode`` respected), computed from constants and folded when the model loads.
- GlobalAveragePool broadcasts ``G / (H·W)``.

Relevance: the z-rule ``ΦX = X ⊙ VJP_op(sdiv(Φ, Y ⊙ 1[Φ≠0]))`` for all three.
"""

from __future__ import annotations

import math

import numpy as np

from agf_onnx.builder import GraphBuilder
from agf_onnx.graph import NodeView

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


@z_rule_op("MaxPool", "Scatter-add of G at each window's arg-max (adds where windows overlap).",
           "z-rule: ΦX = X ⊙ scatter(sdiv(Φ, Y ⊙ 1[Φ≠0])) at each window's arg-max (Φ follows the maximum).",
           routes=True)
def _maxpool_vjp(b: GraphBuilder, node: NodeView, g: str) -> str:
    if node.attr("storage_order", 0):
        raise node.refuse("storage_order=1 (column-major indices) is not supported")
    indices = b.MaxPool(node.inputs[0], outputs=2, **node.attrs)[1]  # emitted once for both rules
    zeros = b.Reshape(b.Mul(node.inputs[0], b.const(0.0)), b.ints([-1]))
    flat = b.ScatterElements(zeros, b.Reshape(indices, b.ints([-1])), b.Reshape(g, b.ints([-1])),
                             axis=0, reduction="add")
    return b.Reshape(flat, b.ints([-1, *node.shape(0)[1:]]))


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
