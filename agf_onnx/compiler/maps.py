"""A method's map before and after its per-sample scaling (spec "Output").

Every emitter returns a ``RawMap``: the map before its scaling, which the modifiers average and
contrast, and how to finish it into the heatmap — ``Σ_c A / max A`` per pixel or per token, or a
coarse map's bilinear upsampling divided by its maximum. A finished map is finite by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from onnx import helper

from .builder import GraphBuilder
from .maths import max_per_sample, resize, sum_per_sample
from .plan import Plan
from .tokens import as_grid


class RawMap(NamedTuple):
    """A method's map before its per-sample scaling: ``tensor`` ``[N, *shape]``, and ``finish``,
    which turns such a tensor into the heatmap ``[N, 1, H, W]``. The modifiers (``modifiers.py``)
    average and contrast raw maps; only the finished map is scaled."""

    tensor: str
    shape: tuple[int, ...]
    finish: Callable[[GraphBuilder, str], str]


def input_map(b: GraphBuilder, plan: Plan, relevance: str, per_channel: bool = True) -> RawMap:
    """A per-channel map at the image, in the image's layout (or ``[N, 1, H, W]`` with
    ``per_channel=False``), finished by ``Σ_c A / max A``; a text model's ``[N, T, C]`` map at E,
    0 at padding tokens, finished by the same scaling into ``[N, T]``."""
    if plan.tokens is not None:
        return _token_map(b, plan, relevance, tuple(plan.graph.shape(plan.image)[1:]))
    if not per_channel:
        return RawMap(relevance, (1, *plan.image_size), lambda b, raw: _heatmap(b, raw, False))
    channels_last = plan.channels_last
    return RawMap(relevance, tuple(plan.graph.shape(plan.image)[1:]), lambda b, raw: _heatmap(b, raw, channels_last))


def coarse_map(b: GraphBuilder, plan: Plan, coarse: str, size: Sequence[int]) -> RawMap:
    """A coarse ``[N, 1, h, w]`` map, finished by bilinear upsampling and division by its maximum; a
    text model's ``[N, 1, T, 1]`` (its tokens as a T × 1 grid) is already per token."""
    if plan.tokens is not None:
        return _token_map(b, plan, b.Reshape(coarse, b.ints([0, -1])), plan.map_size)
    size = tuple(size)
    return RawMap(coarse, (1, *size), lambda b, raw: _upsampled_heatmap(b, plan, raw, size))


def _token_map(b: GraphBuilder, plan: Plan, raw: str, shape: tuple[int, ...]) -> RawMap:
    """A text model's map ``[N, T, ...]``, exactly 0 at padding tokens (attention mask 0: set here,
    so that the modifiers' averages and contrasts keep it), finished into ``heatmap`` ``[N, T]``."""
    if plan.tokens.mask is not None:
        keep = b.Not(b.Equal(plan.tokens.mask, b.const(0, _numpy_type(plan.graph.dtypes[plan.tokens.mask]))))
        if len(shape) > 1:
            keep = b.Unsqueeze(keep, b.ints(list(range(2, 1 + len(shape)))))
        raw = b.Where(keep, raw, b.const(0.0))
    return RawMap(raw, shape, lambda b, raw: _token_heatmap(b, raw, 1 + len(shape)))


def _numpy_type(element_type: int) -> type:
    return helper.tensor_dtype_to_np_dtype(element_type).type


def layer_map(b: GraphBuilder, plan: Plan, function: Callable[[GraphBuilder, str, str], str], gradient: str) -> RawMap:
    """A layer method's map ``function(b, activation, gradient)`` at the planned layer (a token layer's
    patch tokens laid out on their grid)."""
    activation = plan.layer
    if plan.layer_grid is not None:
        channels = plan.graph.shape(activation)[2]
        activation = as_grid(b, activation, plan.layer_grid, channels)
        gradient = as_grid(b, gradient, plan.layer_grid, channels)
        size = (plan.layer_grid.height, plan.layer_grid.width)
    else:
        size = plan.graph.shape(activation)[2:]
    return coarse_map(b, plan, function(b, activation, gradient), size)


def _upsampled_heatmap(b: GraphBuilder, plan: Plan, coarse: str, coarse_size: Sequence[int]) -> str:
    """A coarse ``[N, 1, h, w]`` map upsampled bilinearly (half-pixel centres, as PyTorch's
    ``interpolate(align_corners=False)``) to the image and divided by its per-sample maximum."""
    upsampled = resize(b, coarse, coarse_size, plan.image_size)
    peak = max_per_sample(b, b.Abs(upsampled), 4)
    return _finite(b, b.Div(upsampled, b.Where(b.Greater(peak, b.const(0.0)), peak, b.const(1.0))))


def _finite(b: GraphBuilder, heatmap: str) -> str:
    """0 where float32 overflowed (a contrast's ratio can): the contract is a finite map."""
    return b.Where(b.Not(b.Or(b.IsNaN(heatmap), b.IsInf(heatmap))), heatmap, b.const(0.0))


def contrastive(b: GraphBuilder, target: str, others: str, rank: int) -> str:
    """``R_t − R_o · ΣR_t / ΣR_o`` per sample (CLRP, Gu et al. 2018) of two maps of ``rank``. A plain
    division, as in the authors' code (``sdiv``'s +1e-9 would bias the ratio where ΣR_o is small, as
    SGLRP's is, and the difference of two nearly equal maps amplifies that); 0 where ΣR_o = 0."""
    total = sum_per_sample(b, others, rank)
    nonzero = b.Not(b.Equal(total, b.const(0.0)))
    scale = b.Where(nonzero, b.Div(sum_per_sample(b, target, rank), b.Where(nonzero, total, b.const(1.0))),
                    b.const(0.0))
    return b.Sub(target, b.Mul(others, scale))


def _heatmap(b: GraphBuilder, relevance: str, channels_last: bool) -> str:
    """``Σ_c Φ₀ / max Φ₀`` per sample; ``/ max |Φ₀|`` where ``max Φ₀ ≤ 0``; ``[N, 1, H, W]``."""
    channel_sum = b.ReduceSum(relevance, b.ints([3 if channels_last else 1]), keepdims=1)
    if channels_last:
        channel_sum = b.Transpose(channel_sum, perm=[0, 3, 1, 2])
    return _scaled_by_peak(b, relevance, channel_sum, 4)


def _token_heatmap(b: GraphBuilder, relevance: str, rank: int) -> str:
    """A text model's ``Σ_c Φ₀ / max Φ₀`` (``[N, T, C]`` → ``[N, T]``; a ``[N, T]`` map is only scaled)."""
    if rank == 2:
        return _scaled_by_peak(b, relevance, relevance, rank)
    return b.Squeeze(_scaled_by_peak(b, relevance, b.ReduceSum(relevance, b.ints([2]), keepdims=1), rank), b.ints([2]))


def _scaled_by_peak(b: GraphBuilder, relevance: str, channel_sum: str, rank: int) -> str:
    """``channel_sum / max Φ₀`` per sample, ``/ max |Φ₀|`` where ``max Φ₀ ≤ 0`` (``relevance``: Φ₀ of ``rank``)."""
    peak = max_per_sample(b, relevance, rank)
    zero = b.const(0.0)
    scale = b.Where(b.Greater(peak, zero), peak, max_per_sample(b, b.Abs(relevance), rank))
    scale = b.Where(b.Greater(scale, zero), scale, b.const(1.0))
    # float32 overflow is the one way left to a non-finite value; the contract is a finite map
    return _finite(b, b.Div(channel_sum, scale))

