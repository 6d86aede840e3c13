"""Shapes of rule that many ops share, so that most rules are one to five lines.

- ``proportional``: the z-rule ``ΦX = X ⊙ VJP_op(sdiv(Φ, Y ⊙ 1[Φ≠0]))``.
- ``pass_through``: ``ΦX = Φ`` for the data input.
- ``Bilinear``: ops linear in a data input ``X`` and a weight ``W`` (Conv, Gemm, MatMul), with
  the absolute-influence rule (eq. 9), the z^B input-layer rule, LRP-αβ and RAP built on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import numpy_helper

from agf_onnx.compiler.maths import EPSILON, nonzero, retained, safe_divide, sum_per_sample

from ._registry import Rule, gradient, relevance

if TYPE_CHECKING:
    from agf_onnx.compiler.builder import GraphBuilder
    from agf_onnx.compiler.graph import NodeView

_ONE = numpy_helper.from_array(np.ones(1, np.float32))
Vjp = Callable[["GraphBuilder", "NodeView", str], str]


def data_only(node: NodeView, values: dict[int, str]) -> list[str | None]:
    """One entry per node input: ``values[i]`` for data input ``i``, ``None`` elsewhere."""
    return [values.get(i) if node.is_data(i) else None for i in range(len(node.inputs))]


def output_ratio(b: GraphBuilder, node: NodeView) -> str:
    """The z-rule's ``S = sdiv(Φ, Y ⊙ 1[Φ≠0])`` at the node's output ``Y``, emitted as the equal
    ``sdiv(Φ, Y)`` (the mask changes nothing where ``Φ = 0``). When a ReLU is ``Y``'s one reader
    (a residual Add before its ReLU), ``Φ`` is that ReLU's ``Y⁺ ⊙ sdiv(Φ', Y⁺)``, 0 wherever
    ``Y ≤ 0``: then ``sdiv(Φ, Y) = Φ / (Y⁺ + 1e-9)``, no zero test."""
    output, graph = node.outputs[0], node.graph
    readers = graph.consumers.get(output, [])
    if len(readers) == 1 and readers[0].op_type == "Relu" and output not in graph.outputs:
        return b.Div(node.relevance[0], b.Add(readers[0].output[0], b.const(EPSILON)))
    return safe_divide(b, node.relevance[0], output, nonnegative=graph.nonnegative(output))


def proportional(b: GraphBuilder, node: NodeView, vjp: Vjp) -> list[str | None]:
    """z-rule for an op with one data input (input 0) and output ``Y``."""
    return data_only(node, {0: b.Mul(node.inputs[0], vjp(b, node, output_ratio(b, node)))})


def routed_share(b: GraphBuilder, node: NodeView) -> str:
    """``Y ⊙ sdiv(Φ, Y)`` at the node's output ``Y ≥ 0`` (``maths.retained``)."""
    return retained(b, node.relevance[0], node.outputs[0])


def routing(b: GraphBuilder, node: NodeView, vjp: Vjp) -> list[str | None]:
    """z-rule for an op that copies each output element from one input element (ReLU, max pooling:
    ``X = Y`` wherever ``VJP`` puts a value), so that ``X ⊙ VJP(S) = VJP(Y ⊙ S)``: with ``Y ≥ 0``
    that is ``VJP(routed_share)``, else the plain z-rule."""
    if not node.graph.nonnegative(node.outputs[0]):
        return proportional(b, node, vjp)
    return data_only(node, {0: vjp(b, node, routed_share(b, node))})


def named(rule: Rule, name: str, doc: str, module: str) -> Rule:
    """``rule`` with its own name and one-line description (what the coverage table prints)."""
    rule.__doc__, rule.__name__, rule.__qualname__, rule.__module__ = doc, name, name, module
    return rule


def z_rule_op(op_type: str, gradient_doc: str, relevance_doc: str, routes: bool = False) -> Callable[[Vjp], Vjp]:
    """Register ``vjp`` (``VJP_op`` of any upstream) as ``op_type``'s gradient and its z-rule
    ``ΦX = X ⊙ VJP_op(sdiv(Φ, Y ⊙ 1[Φ≠0]))``, each with its description (``routes``: the op copies
    each output element from one input element, see ``routing``)."""

    def register(vjp: Vjp) -> Vjp:
        def gradient_rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
            return data_only(node, {0: vjp(b, node, node.gradient[0])})

        def relevance_rule(b: GraphBuilder, node: NodeView) -> list[str | None]:
            return (routing if routes else proportional)(b, node, vjp)

        name = op_type.lower()
        gradient(op_type)(named(gradient_rule, f"{name}_gradient", gradient_doc, vjp.__module__))
        relevance(op_type, kind="z")(named(relevance_rule, f"{name}_relevance", relevance_doc, vjp.__module__))
        return vjp

    return register


def explicit_pads(node: NodeView, size, out, kernel, strides, dilations) -> list[int]:
    """Begin/end pads of a Conv or pool with ``auto_pad`` resolved: ``SAME_UPPER``/``SAME_LOWER``
    split the padding that lets ``out`` windows fit, the odd pixel at the end/begin; ``VALID`` none."""
    spatial = len(size)
    pads = list(node.attr("pads", [0] * 2 * spatial))
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(spatial):
            total = max(0, (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i])
            small, large = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * 2 * spatial
    return pads


def pass_through(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Passes relevance through unchanged: ΦX = Φ."""
    return data_only(node, {0: node.relevance[0]})


def batch(node: NodeView, name: str) -> tuple[int, int] | None:
    """``(axis, factor)`` of the batch in tensor ``name``: the axis that carries it and how many
    other elements are merged into it batch-major (1: a plain batch); ``None`` without a batch."""
    return node.graph.batch(name)


def batch_axis(node: NodeView, name: str) -> int | None:
    """The axis of tensor ``name`` that carries the batch, ``None`` without one."""
    found = batch(node, name)
    return None if found is None else found[0]


def refuse_batch_axes(node: NodeView, name: str, axes, doing: str) -> None:
    """Refuse an op that ``doing`` along ``axes`` of ``name`` when one of them carries the batch:
    that would mix the samples of a batch."""
    axis = batch_axis(node, name)
    rank = len(node.graph.shape(name))
    if axis is not None and axis in {int(a) % rank for a in axes}:
        raise node.refuse(f"{doing} along axis {axis} of '{name}', which carries the batch; samples must stay "
                          "independent")


def static_shape(node: NodeView, name: str) -> list[int]:
    """The shape of ``name`` as a Reshape target: static sizes and ``-1`` at the one dynamic
    (batch-carrying) axis; refused when another axis is unknown."""
    shape = list(node.graph.shape(name))
    if sum(d is None for d in shape) > 1:
        raise node.refuse(f"tensor '{name}' has shape {shape}; every axis but the batch must be static")
    return [-1 if d is None else int(d) for d in shape]


def static_sizes(node: NodeView, name: str, axes) -> list[int]:
    """The sizes of ``axes`` of tensor ``name``, refused by name where one is unknown."""
    shape = node.graph.shape(name)
    sizes = [shape[a] for a in axes]
    if any(d is None for d in sizes):
        raise node.refuse(f"tensor '{name}' has shape {list(shape)}; the size of axis "
                          f"{[a for a, d in zip(axes, sizes) if d is None][0]} must be known here")
    return [int(d) for d in sizes]


def broadcast_shape(shape) -> list[int]:
    """An ``Expand`` target for ``shape``: 1 at the dynamic axis, which the expanded tensor has already."""
    return [1 if d is None else int(d) for d in shape]


def unbroadcast(b: GraphBuilder, gradient: str, output_shape: tuple, input_shape: tuple) -> str:
    """Sum ``gradient`` (shaped like the output) over the axes on which the input was broadcast."""
    if tuple(output_shape) == tuple(input_shape):
        return gradient
    rank = len(output_shape)
    padded = (1,) * (rank - len(input_shape)) + tuple(input_shape)
    axes = [i for i, (o, n) in enumerate(zip(output_shape, padded)) if n == 1 and o != 1]
    if axes:
        gradient = b.ReduceSum(gradient, b.ints(axes), keepdims=1)
    if len(input_shape) != rank:  # -1, not 0: the dynamic axis need not sit where it does in the output
        gradient = b.Reshape(gradient, b.ints([-1 if d is None else d for d in input_shape]))
    return gradient


@dataclass(frozen=True)
class Bilinear:
    """An op ``Y = op(X, W) + bias`` with data ``X`` (input 0) and a constant weight.

    ``weight`` returns the weight tensor the two others take (for Gemm: alpha and transB
    folded in), ``forward`` computes ``op(x, w)`` without bias, ``vjp`` its adjoint in ``x``.
    """

    weight: Callable[["GraphBuilder", "NodeView"], str]
    forward: Callable[["GraphBuilder", "NodeView", str, str], str]
    vjp: Callable[["GraphBuilder", "NodeView", str, str], str]
    #: ``op(x, w) + shift`` in one node where the op takes a bias (Conv): a full-size Add less
    shifted: Callable[["GraphBuilder", "NodeView", str, str, float], str] | None = None

    def shifted_forward(self, b: GraphBuilder, node: NodeView, x: str, w: str, shift: float) -> str:
        """``op(x, w) + shift``."""
        if self.shifted is not None:
            return self.shifted(b, node, x, w, shift)
        return b.Add(self.forward(b, node, x, w), b.const(shift))

    def gradient(self, b: GraphBuilder, node: NodeView) -> list[str | None]:
        return data_only(node, {0: self.vjp(b, node, node.gradient[0], self.weight(b, node))})

    def absolute_weight(self, b: GraphBuilder, node: NodeView) -> str:
        """``|W|`` (ONNX Runtime folds it into an initializer when it loads the model)."""
        return b.Abs(self.weight(b, node))

    def absolute_influence(self, b: GraphBuilder, node: NodeView) -> str:
        """``C = |X| ⊙ VJP_{|W|}(sdiv(Φ, op(|X|, |W|) ⊙ 1[Φ≠0]))`` (eq. 9).

        Emitted as ``|X| ⊙ VJP_{|W|}(Φ / (Z + 1e-9))`` with ``Z = op(|X|, |W|)``: where ``Z = 0`` every
        product ``|X_i|·|W_{oi}|`` of that output is 0, so its ratio meets either ``|W_{oi}| = 0`` in the
        VJP or ``|X_i| = 0`` after it: ``C`` is the same without sdiv's zero test (while ``|Φ| / 1e-9``
        stays finite: ``|Φ| < 3·10²⁹``). ``|X| = X`` where ``X ≥ 0`` (after a ReLU)."""
        x = node.inputs[0]
        abs_x = x if node.graph.nonnegative(x) else b.Abs(x)
        abs_w = self.absolute_weight(b, node)
        ratio = b.Div(node.relevance[0], self.shifted_forward(b, node, abs_x, abs_w, EPSILON))
        return b.Mul(abs_x, self.vjp(b, node, ratio, abs_w))

    def _signed_parts(self, b: GraphBuilder, node: NodeView) -> tuple[str, str, str, str]:
        """``x⁺, x⁻, W⁺, W⁻``."""
        x, w, zero = node.inputs[0], self.weight(b, node), b.const(0.0)
        return b.Max(x, zero), b.Min(x, zero), b.Max(w, zero), b.Min(w, zero)

    def alpha_beta(self, b: GraphBuilder, node: NodeView, alpha: float, beta: float) -> list[str | None]:
        """LRP-αβ: ``α·(x⁺ ⊙ VJP_{W⁺}(S⁺) + x⁻ ⊙ VJP_{W⁻}(S⁺)) − β·(x⁺ ⊙ VJP_{W⁻}(S⁻) + x⁻ ⊙ VJP_{W⁺}(S⁻))``
        with ``S± = sdiv(R, z±)``, ``z⁺ = op(x⁺, W⁺) + op(x⁻, W⁻)``, ``z⁻`` the opposite; no bias."""
        relevance = node.relevance[0]
        x_pos, x_neg, w_pos, w_neg = self._signed_parts(b, node)

        def share(for_pos: str, for_neg: str) -> str:
            z = b.Add(self.forward(b, node, x_pos, for_pos), self.forward(b, node, x_neg, for_neg))
            ratio = safe_divide(b, relevance, z)
            return b.Add(b.Mul(x_pos, self.vjp(b, node, ratio, for_pos)), b.Mul(x_neg, self.vjp(b, node, ratio, for_neg)))

        result = share(w_pos, w_neg)
        if alpha != 1.0:
            result = b.Mul(result, b.const(alpha))
        if beta:
            result = b.Sub(result, b.Mul(share(w_neg, w_pos), b.const(beta)))
        return data_only(node, {0: result})

    def relative(self, b: GraphBuilder, node: NodeView, negative_on_second: bool) -> list[str | None]:
        """RAP's rule for a hidden layer (Nam et al. 2019, their ``RAP_relprop``): for each sign of the
        input, split the positive and the negative relevance over the two (made non-negative)
        contributions ``z₁ = op(x±, W±)``, ``z₂ = −op(x±, W∓)`` in proportion, then shift the result
        so that it sums to ``ΣR`` (``shift_rel``). ``negative_on_second``: the negative relevance
        goes through ``z₂`` alone (their conv layers) rather than through ``z₁`` (their linear ones)."""
        relevance = node.relevance[0]
        x_pos, x_neg, w_pos, w_neg = self._signed_parts(b, node)
        zero, mask = b.const(0.0), nonzero(b, relevance)
        relevance_pos, relevance_neg = b.Max(relevance, zero), b.Min(relevance, zero)
        rank_in, axis_in = len(node.shape(0)), batch_axis(node, node.inputs[0]) or 0
        total_relevance = sum_per_sample(b, relevance, len(node.graph.shape(node.outputs[0])),
                                         batch_axis(node, node.outputs[0]) or 0)

        def signed(x: str, w: str, sign: float) -> tuple[str, Callable[[str], str]]:
            """``z = sign·op(x, w)·1[R≠0]`` and the VJP of ``⟨z, S⟩`` in ``x``."""
            z = b.Mul(self.forward(b, node, x, w), mask)

            def vjp(ratio: str) -> str:
                back = self.vjp(b, node, ratio, w)
                return back if sign > 0 else b.Neg(back)

            return (z if sign > 0 else b.Neg(z)), vjp

        def proportional_split(x: str, first: tuple, second: tuple) -> str:
            (z1, vjp1), (z2, vjp2) = first, second
            total = b.Add(z1, z2)
            active, second_share = safe_divide(b, total, total), safe_divide(b, z2, total)
            ratio1 = safe_divide(b, b.Mul(relevance_pos, active), z1)
            ratio2 = b.Add(safe_divide(b, b.Mul(relevance_pos, second_share), z2),
                           safe_divide(b, b.Mul(relevance_neg, second_share), z2))
            if negative_on_second:
                ratio2 = b.Add(ratio2, safe_divide(b, b.Mul(relevance_neg, active), z2))
            else:
                ratio1 = b.Add(ratio1, safe_divide(b, b.Mul(relevance_neg, active), z1))
            result = b.Mul(x, b.Add(vjp1(ratio1), vjp2(ratio2)))
            excess = b.Sub(sum_per_sample(b, result, rank_in, axis_in), total_relevance)  # shift_rel: Σ result = ΣR
            support = nonzero(b, result)
            return b.Sub(result, b.Mul(safe_divide(b, excess, sum_per_sample(b, support, rank_in, axis_in)), support))

        positive = proportional_split(x_pos, signed(x_pos, w_pos, 1.0), signed(x_pos, w_neg, -1.0))
        negative = proportional_split(x_neg, signed(x_neg, w_pos, -1.0), signed(x_neg, w_neg, 1.0))
        return data_only(node, {0: b.Add(positive, negative)})

    def relative_start(self, b: GraphBuilder, node: NodeView, bias: str | None) -> list[str | None]:
        """RAP's first step at the layer that computes the logits (their ``first_prop`` and
        ``redistribute``), from the target's one-hot ``d`` as relevance: the four sign combinations
        ``op(x±, W±) ⊙ d`` and the bias, split between the positive (``++``, ``−−``) and negative
        (``+−``, ``−+``) totals, propagated proportionally; then positive and negative parts are
        rescaled so that their absolute sum stays and their signed sum becomes ``Σ`` of the result."""
        one_hot = node.relevance[0]
        x_pos, x_neg, w_pos, w_neg = self._signed_parts(b, node)
        z_pp, z_pn = self.forward(b, node, x_pos, w_pos), self.forward(b, node, x_pos, w_neg)
        z_np, z_nn = self.forward(b, node, x_neg, w_pos), self.forward(b, node, x_neg, w_neg)
        rank_out, rank_in = len(node.graph.shape(node.outputs[0])), len(node.shape(0))
        axis_out, axis_in = batch_axis(node, node.outputs[0]) or 0, batch_axis(node, node.inputs[0]) or 0
        positive_total = sum_per_sample(b, b.Mul(b.Add(z_pp, z_nn), one_hot), rank_out, axis_out)
        negative_total = sum_per_sample(b, b.Mul(b.Add(z_pn, z_np), one_hot), rank_out, axis_out)
        everything = b.Add(positive_total, negative_total)

        def share(z: str, seed: str, x: str, w: str) -> str:
            return b.Mul(x, self.vjp(b, node, safe_divide(b, seed, z), w))

        result = b.Sum(share(z_pp, b.Mul(z_pp, one_hot), x_pos, w_pos), share(z_nn, b.Mul(z_nn, one_hot), x_neg, w_neg),
                       share(z_pn, b.Mul(z_pn, one_hot), x_pos, w_neg), share(z_np, b.Mul(z_np, one_hot), x_neg, w_pos))
        if bias is not None:
            bias_seed = b.Mul(bias, one_hot)
            result = b.Sum(result, share(z_pp, b.Mul(bias_seed, safe_divide(b, positive_total, everything)), x_pos, w_pos),
                           share(z_pn, b.Mul(bias_seed, safe_divide(b, negative_total, everything)), x_pos, w_neg))
        zero = b.const(0.0)
        pos, neg = b.Max(result, zero), b.Min(result, zero)
        magnitude = sum_per_sample(b, b.Sub(pos, neg), rank_in, axis_in)
        signed_total = sum_per_sample(b, result, rank_in, axis_in)
        redistributed = b.Sub(b.Mul(safe_divide(b, pos, magnitude), signed_total),
                              b.Mul(safe_divide(b, neg, magnitude), signed_total))
        return data_only(node, {0: redistributed})

    def input_layer(self, b: GraphBuilder, node: NodeView) -> list[str | None]:
        """z^B rule with the per-sample image minimum ``l`` and maximum ``h`` as bounds."""
        x, w = node.inputs[0], self.weight(b, node)
        axes = list(range(1, len(node.shape(0))))
        low, high = b.ReduceMin(x, axes=axes, keepdims=1), b.ReduceMax(x, axes=axes, keepdims=1)
        positive, negative = b.Max(w, b.const(0.0)), b.Min(w, b.const(0.0))
        ones = b.ConstantOfShape(b.ints([1, *node.shape(0)[1:]]), value=_ONE)
        # conv(l·1, W⁺) = l·conv(1, W⁺): conv(1, ·) is data-free, folded when the model loads
        activation = b.Sub(b.Sub(self._unbiased_output(b, node), b.Mul(low, self.forward(b, node, ones, positive))),
                           b.Mul(high, self.forward(b, node, ones, negative)))
        ratio = safe_divide(b, node.relevance[0], activation)
        # X ⊙ VJP_W(S) − l ⊙ VJP_W⁺(S) − h ⊙ VJP_W⁻(S) with VJP_W = VJP_W⁺ + VJP_W⁻: two VJPs, not three
        relevance = b.Add(b.Mul(b.Sub(x, low), self.vjp(b, node, ratio, positive)),
                          b.Mul(b.Sub(x, high), self.vjp(b, node, ratio, negative)))
        return data_only(node, {0: relevance})

    def _unbiased_output(self, b: GraphBuilder, node: NodeView) -> str:
        """``op(X, W)`` without bias: a Conv's own output when it has none."""
        if node.op_type == "Conv" and (len(node.inputs) < 3 or not node.inputs[2]):
            return node.outputs[0]
        return self.forward(b, node, node.inputs[0], self.weight(b, node))

