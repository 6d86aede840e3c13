"""The spec's numerical helpers as graph fragments (``docs/algorithm.md``).

Every function takes the builder and tensor names and returns a tensor name. ``rank`` is the
rank of the tensor a per-sample reduction runs over: such reductions cover every axis but the
batch axis 0 and keep them, so the result broadcasts back against the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import TensorProto

from .builder import GraphBuilder

#: The authors' stabiliser of every division.
EPSILON = 1e-9


def _sample_axes(rank: int, batch_axis: int = 0) -> list[int]:
    return [axis for axis in range(rank) if axis != batch_axis]


def sum_per_sample(b: GraphBuilder, x: str, rank: int, batch_axis: int = 0) -> str:
    """``Σ`` over every axis but the batch's (kept as size 1)."""
    return b.ReduceSum(x, b.ints(_sample_axes(rank, batch_axis)), keepdims=1)


def max_per_sample(b: GraphBuilder, x: str, rank: int) -> str:
    return b.ReduceMax(x, axes=_sample_axes(rank), keepdims=1)


def is_zero(b: GraphBuilder, x: str) -> str:
    """``x = 0`` as bool (one node per tensor: the builder emits identical nodes once)."""
    return b.Equal(x, b.const(0.0))


def nonzero(b: GraphBuilder, x: str) -> str:
    """``1[x ≠ 0]`` as float: a float → bool Cast is exactly the test ``x ≠ 0``. Masks are
    multiplied in rather than selected with ``Where``, which ONNX Runtime's CPU kernel runs at a
    third of a ``Mul``'s speed."""
    return b.Cast(b.Cast(x, to=TensorProto.BOOL), to=TensorProto.FLOAT)


def where_nonzero(b: GraphBuilder, value: str, x: str) -> str:
    """``value ⊙ 1[x ≠ 0]``: ``value`` where ``x ≠ 0``, else 0."""
    return b.Mul(value, nonzero(b, x))


def safe_divide(b: GraphBuilder, numerator: str, denominator: str, nonnegative: bool = False,
                once: bool = False) -> str:
    """``sdiv``: ``a / (b + 1e-9)`` where ``b ≠ 0``, else 0; also 0 where ``b + 1e-9`` is 0.

    ``nonnegative``: ``b ≥ 0`` is known, so ``b + 1e-9 > 0``: the numerator is masked with
    ``1[b ≠ 0]`` first (no overflow: ``a ⊙ 0 = 0``) and divided. ``once``: ``b`` is a per-sample
    value or a constant, so its guard costs nothing at the numerator's size: it goes into the
    denominator (∞ where undefined, ``a / ∞ = 0``) and the full-size work is one Div (ONNX Runtime
    folds a constant's guard when it loads the model). ``sdiv(Φ, Z ⊙ 1[Φ≠0]) = sdiv(Φ, Z)``
    exactly (where ``Φ = 0`` both are 0), which is why no rule masks its denominator."""
    if nonnegative and not once:
        return b.Div(where_nonzero(b, numerator, denominator), b.Add(denominator, b.const(EPSILON)))
    return b.Div(numerator, guarded_denominator(b, denominator, nonnegative))


def guarded_denominator(b: GraphBuilder, denominator: str, nonnegative: bool = False) -> str:
    """``b + 1e-9``, ∞ where ``b = 0`` or ``b + 1e-9 = 0`` (the second test left out when ``b ≥ 0``):
    dividing by it is ``sdiv``."""
    shifted = b.Add(denominator, b.const(EPSILON))
    undefined = is_zero(b, denominator)
    if not nonnegative:
        undefined = b.Or(undefined, is_zero(b, shifted))
    return b.Where(undefined, b.const(np.inf), shifted)


def retained(b: GraphBuilder, relevance: str, x: str) -> str:
    """``x ⊙ sdiv(Φ, x)`` for ``x ≥ 0``, as ``(Φ ⊙ x) / (x + 1e-9)``: no zero test (where ``x = 0`` the
    product is 0, and ``x + 1e-9 > 0``)."""
    return b.Div(b.Mul(relevance, x), b.Add(x, b.const(EPSILON)))


def normalise_by_max(b: GraphBuilder, x: str, rank: int, nonnegative: bool = False, scale: float = 1.0) -> str:
    """``nmax``: divide by the per-sample maximum (``nonnegative``: ``x ≥ 0`` is known); ``scale ·
    nmax(x)`` with the scale taken into the per-sample divisor (one full-size pass, not two)."""
    divisor = guarded_denominator(b, max_per_sample(b, x, rank), nonnegative)
    return b.Div(x, divisor if scale == 1.0 else b.Mul(divisor, b.const(1.0 / scale)))


def delta_shift(b: GraphBuilder, absolute_influence: str, residual: str, rank: int) -> str:
    """``Δshift(C, r) = C + r − (Σr / Σ1[C≠0])·1[C≠0]``, per sample; ``C + r`` if ``C`` is all 0."""
    support = nonzero(b, absolute_influence)
    count = b.Max(sum_per_sample(b, support, rank), b.const(1.0))
    mean = b.Div(sum_per_sample(b, residual, rank), count)
    return b.Sub(b.Add(absolute_influence, residual), b.Mul(mean, support))


def channel_mean(b: GraphBuilder, x: str, shape: Sequence[int], flat: bool = False) -> str:
    """``mean_c``: average over axis 1 of ``x`` ``[N, *shape]``, kept as size 1 (broadcasts back like
    ``expand_c``; ``flat``: as ``[N, 1, HW]``). A matrix product ``(1/C)·1ᵀ X`` over ``[N, C, HW]``:
    ONNX Runtime's ReduceMean over the channel axis strides through memory, the product reads it once."""
    channels, *spatial = shape
    mean = b.MatMul(b.const(np.full((1, channels), 1.0 / channels)), b.Reshape(x, b.ints([0, channels, -1])))
    return mean if flat else b.Reshape(mean, b.ints([0, 1, *spatial]))


def factorise(b: GraphBuilder, activations: str, partition: str, shape: tuple[int, ...], stacks: int = 1) -> str:
    """The two-class sigmoid–Heaviside NMF ``F(Y, φ)`` (eq. 7, 11) → ``[N, 1, H, W]``.

    ``activations`` is ``Y`` ``[N, C, H, W]`` with ``shape = (C, H, W)``, ``partition`` is ``φ``
    ``[N, 1, H, W]`` or flat ``[N, 1, HW]`` (any number of spatial axes works the same way).
    ``stacks`` > 1: the batch holds that many stacked batches, returned apart as ``[stacks, N, 1, H, W]``.
    ``R = [R_b R_f]`` are the mean columns of ``H`` over the background (φ<0) and foreground (φ>0) pixels;
    ``Wt = relu((RᵀR + I₂)⁻¹ Rᵀ H)`` with the 2×2 inverse in closed form,
    ``[[a, c], [c, d]]⁻¹ = [[d, −c], [−c, a]] / (ad − c²)``. Sums over pixels and channels are MatMuls.
    """
    channels, *spatial = shape
    heat = b.Sigmoid(normalise_by_max(b, activations, len(shape) + 1, scale=10.0))
    heat = b.Reshape(heat, b.ints([0, channels, -1]))  # H [N, C, HW]
    partition = b.Reshape(partition, b.ints([0, -1, 1]))  # [N, HW, 1]
    sides = b.Relu(b.Mul(b.Sign(partition), b.const([-1.0, 1.0])))  # [N, HW, 2]: 1[φ<0], 1[φ>0]
    counts = b.Max(b.ReduceSum(sides, b.ints([1]), keepdims=1), b.const(1.0))  # [N, 1, 2]; empty sets give 0
    columns = b.Div(b.MatMul(heat, sides), counts)  # R [N, C, 2]
    rows = b.Transpose(columns, perm=[0, 2, 1])  # Rᵀ [N, 2, C]
    identity, swap = b.const(np.eye(2)), b.const(np.eye(2)[::-1])
    gram = b.Add(b.MatMul(rows, columns), identity)  # RᵀR + I₂ [N, 2, 2]
    adjugate = b.Mul(b.MatMul(b.MatMul(swap, gram), swap), b.const([[1.0, -1.0], [-1.0, 1.0]]))  # exact
    # each row of gram ⊙ adjugate sums to g_bb·g_ff − g_bf² (≥ 1)
    determinant = b.ReduceSum(b.Mul(gram, adjugate), b.ints([2]), keepdims=1)  # [N, 2, 1]
    weights = b.Relu(b.Div(b.MatMul(adjugate, b.MatMul(rows, heat)), determinant))  # Wt [N, 2, HW]
    shape_out = [0, 1, *spatial] if stacks == 1 else [stacks, -1, 1, *spatial]
    return b.Reshape(b.MatMul(b.const([[-1.0, 1.0]]), weights), b.ints(shape_out))  # Wt_f − Wt_b


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


def as_scores(b: GraphBuilder, logits: str, shape: tuple) -> str:
    """Logits as ``[N, K]`` (convolutional heads leave ``[N, K, 1, 1]``)."""
    return logits if len(shape) == 2 else b.Reshape(logits, b.ints([0, -1]))
