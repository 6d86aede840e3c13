"""The spec's numerical helpers as graph fragments (``docs/algorithm.md``).

Every function takes the builder and tensor names and returns a tensor name. ``rank`` is the
rank of the tensor a per-sample reduction runs over: such reductions cover every axis but the
batch axis 0 and keep them, so the result broadcasts back against the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .builder import GraphBuilder

#: The authors' stabiliser of every division.
EPSILON = 1e-9


def _sample_axes(rank: int) -> list[int]:
    return list(range(1, rank))


def sum_per_sample(b: GraphBuilder, x: str, rank: int) -> str:
    return b.ReduceSum(x, b.ints(_sample_axes(rank)), keepdims=1)


def max_per_sample(b: GraphBuilder, x: str, rank: int) -> str:
    return b.ReduceMax(x, axes=_sample_axes(rank), keepdims=1)


def nonzero(b: GraphBuilder, x: str) -> str:
    """``1[x ≠ 0]`` as float."""
    return b.Cast(b.Not(b.Equal(x, b.const(0.0))), to=1)


def safe_divide(b: GraphBuilder, numerator: str, denominator: str) -> str:
    """``sdiv``: ``a / (b + 1e-9)`` where ``b ≠ 0``, else 0; also 0 where ``b + 1e-9`` is 0."""
    shifted = b.Add(denominator, b.const(EPSILON))
    zero = b.const(0.0)
    undefined = b.Or(b.Equal(denominator, zero), b.Equal(shifted, zero))
    safe = b.Where(undefined, b.const(1.0), shifted)
    return b.Where(undefined, zero, b.Div(numerator, safe))


def normalise_by_max(b: GraphBuilder, x: str, rank: int) -> str:
    """``nmax``: divide by the per-sample maximum."""
    return safe_divide(b, x, max_per_sample(b, x, rank))


def delta_shift(b: GraphBuilder, absolute_influence: str, residual: str, rank: int) -> str:
    """``Δshift(C, r) = C + r − (Σr / Σ1[C≠0])·1[C≠0]``, per sample; ``C + r`` if ``C`` is all 0."""
    support = nonzero(b, absolute_influence)
    count = b.Max(sum_per_sample(b, support, rank), b.const(1.0))
    mean = b.Div(sum_per_sample(b, residual, rank), count)
    return b.Sub(b.Add(absolute_influence, residual), b.Mul(mean, support))


def channel_mean(b: GraphBuilder, x: str) -> str:
    """``mean_c``: average over axis 1, kept as size 1 (broadcasts back like ``expand_c``)."""
    return b.ReduceMean(x, axes=[1], keepdims=1)


def factorise(b: GraphBuilder, activations: str, partition: str, shape: tuple[int, ...]) -> str:
    """The two-class sigmoid–Heaviside NMF ``F(Y, φ)`` (eq. 7, 11) → ``[N, 1, H, W]``.

    ``activations`` is ``Y`` ``[N, C, H, W]`` with ``shape = (C, H, W)``, ``partition`` is ``φ``
    ``[N, 1, H, W]`` (any number of spatial axes works the same way).
    ``R = [R_b R_f]`` are the mean columns of ``H`` over the background (φ<0) and foreground
    (φ>0) pixels; ``Wt = relu((RᵀR + I₂)⁻¹ Rᵀ H)`` with the 2×2 inverse in closed form.
    """
    channels, *spatial = shape
    heat = b.Sigmoid(b.Mul(normalise_by_max(b, activations, len(shape) + 1), b.const(10.0)))
    heat = b.Reshape(heat, b.ints([0, channels, -1]))  # [N, C, HW]
    partition = b.Reshape(partition, b.ints([0, 1, -1]))  # [N, 1, HW]
    zero = b.const(0.0)

    def mean_column(pixels: str) -> str:  # [N, C, 1]; 0 when the set is empty
        pixels = b.Cast(pixels, to=1)
        total = b.ReduceSum(b.Mul(heat, pixels), b.ints([2]), keepdims=1)
        count = b.ReduceSum(pixels, b.ints([2]), keepdims=1)
        return b.Div(total, b.Max(count, b.const(1.0)))

    background = mean_column(b.Less(partition, zero))
    foreground = mean_column(b.Greater(partition, zero))

    def dot(u: str, v: str) -> str:  # Σ_c u_c v_c → [N, 1, 1] or [N, 1, HW]
        return b.ReduceSum(b.Mul(u, v), b.ints([1]), keepdims=1)

    one = b.const(1.0)
    gram_bb = b.Add(dot(background, background), one)
    gram_bf = dot(background, foreground)
    gram_ff = b.Add(dot(foreground, foreground), one)
    determinant = b.Sub(b.Mul(gram_bb, gram_ff), b.Mul(gram_bf, gram_bf))  # ≥ 1
    project_b, project_f = dot(background, heat), dot(foreground, heat)
    weight_b = b.Relu(b.Div(b.Sub(b.Mul(gram_ff, project_b), b.Mul(gram_bf, project_f)), determinant))
    weight_f = b.Relu(b.Div(b.Sub(b.Mul(gram_bb, project_f), b.Mul(gram_bf, project_b)), determinant))
    return b.Reshape(b.Sub(weight_f, weight_b), b.ints([0, 1, *spatial]))


def resize(b: GraphBuilder, x: str, source: Sequence[int], target: Sequence[int], mode: str = "linear",
           coordinate_transformation_mode: str = "half_pixel") -> str:
    """``x`` ``[N, C, *source]`` resized to ``[N, C, *target]``. ONNX Runtime (in float32) and
    ONNX's shape inference (in float64) truncate ``scale · size`` to get the output size, so each
    scale is the float32 nearest to ``target / source`` that reaches ``target`` in both (a scale a
    rounding step short, as float32(48/46) is, would lose the last row)."""
    scales = [np.float32(1.0), np.float32(1.0)]
    for out, size in zip(target, source):
        scale = np.float32(out / size)
        while float(scale) * size < out or np.float32(scale * np.float32(size)) < out:
            scale = np.nextafter(scale, np.float32(np.inf))
        scales.append(scale)
    return b.Resize(x, "", b.const(np.array(scales, np.float32)), mode=mode,
                    coordinate_transformation_mode=coordinate_transformation_mode)
