"""Gemm and MatMul with a constant weight: ``Y = X' · W' + bias`` (a following ``Add`` of a
constant bias is an ``Add`` rule of its own, which passes relevance through).

Gradient: ``G · W'ᵀ`` (transposed back when ``transA``), written as Gemm with ``transB`` so that
no transposed copy of the weight is made.

Relevance (spec "Linear layers", "Token tensors"):
- ``agf`` on a 2-D input ``[N, C]``: the absolute influence ``C`` (eq. 9); where ``X`` was
  flattened from a 4-D map (VGG's first classifier layer) the authors add the gradient–input map:
  ``ΦX = Δshift(C, nmax(relu(expand_c(mean_c(x4 ⊙ g4))) ⊙ 1[C≠0]))``.
- ``agf`` on a token tensor (rank ≥ 3, ``[N, T, C]`` or ConvNeXt's ``[N, H, W, C]``, or a batch
  merged with tokens, ``[N·P, T, C]``): the layer is a 1×1 conv over the tokens, and gets the conv's
  full rule (eq. 10–14, ``conv.full_rule``) on the channel-first sample view ``[N, C, P·T]``.
- ``flat``: ``ΦX = C`` (what the authors give every 1×1 conv).
- ``zB``: the z^B rule when the layer reads the image directly.
- ``alpha1beta0``, ``alpha2beta1``: LRP-αβ for the LRP baselines.
- ``rap``, ``rap_first``: Relative Attributing Propagation (Nam et al. 2019) for hidden layers and
  for the layer that computes the logits, as in the authors' ``RAP_relprop``.

A MatMul whose second operand depends on the input too (attention's ``Q Kᵀ`` and ``A V``, batched
and broadcast) is a product of two data tensors: its gradient and, whatever the kind, its
relevance are the rules of ``product.py`` (all to the values of an attention product, else ½/½).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import NodeView
from agf_onnx.compiler.maths import channel_mean, delta_shift, nonzero, normalise_by_max, safe_divide, where_nonzero

from ._helpers import Bilinear, batch, data_only, named, refuse_batch_axes, static_shape
from ._registry import gradient, relevance
from .conv import full_rule
from .product import matmul_product_gradient, matmul_product_relevance

#: Ops that only move data; the flattened-map test looks through them.
_TRANSPARENT = {"Identity", "Dropout"}


def _weight(b: GraphBuilder, node: NodeView) -> str:
    """``B`` as stored (``transB`` stays an attribute: a transposed copy of a large classifier
    weight would cost memory and load time), with ``alpha`` folded in when it is not 1."""
    alpha = node.attr("alpha", 1.0)
    return b.Mul(node.inputs[1], b.const(alpha)) if alpha != 1.0 else node.inputs[1]


def _gemm_forward(b: GraphBuilder, node: NodeView, x: str, w: str) -> str:
    return b.Gemm(x, w, transA=node.attr("transA", 0), transB=node.attr("transB", 0))


def _gemm_vjp(b: GraphBuilder, node: NodeView, g: str, w: str) -> str:
    # X' · B' = Y  ⇒  ∂/∂X' = G · B'ᵀ, with B' = Bᵀ when transB
    gradient_in = b.Gemm(g, w, transB=0 if node.attr("transB", 0) else 1)
    return b.Transpose(gradient_in, perm=[1, 0]) if node.attr("transA", 0) else gradient_in


def _matmul_vjp(b: GraphBuilder, node: NodeView, g: str, w: str) -> str:
    if len(node.shape(0)) == 2:
        return b.Gemm(g, w, transB=1)
    return b.MatMul(g, b.Transpose(w, perm=[1, 0]))


GEMM = Bilinear(weight=_weight, forward=_gemm_forward, vjp=_gemm_vjp)
MATMUL = Bilinear(weight=lambda b, node: node.inputs[1], forward=lambda b, node, x, w: b.MatMul(x, w),
                  vjp=_matmul_vjp)


def _constant_weight(node: NodeView) -> None:
    if node.is_data(1) or (len(node.inputs) > 2 and node.is_data(2)):
        raise node.refuse("only a data input A times a constant weight B is supported "
                          "(both operands depend on the input)")
    rank = len(node.shape(0))
    refuse_batch_axes(node, node.inputs[0], [rank - 1], "contracts with the weight")


def _gemm_check(node: NodeView) -> None:
    _constant_weight(node)
    if node.attr("transA", 0) and batch(node, node.inputs[0]) is not None:
        raise node.refuse("transA=1 on a batched input mixes samples; not an image classifier layer")


def _matmul_check(node: NodeView) -> None:
    _constant_weight(node)
    if len(node.shape(1)) != 2:
        raise node.refuse(f"the weight must be 2-D, it has shape {list(node.shape(1))}")


def is_product(node: NodeView) -> bool:
    """A MatMul whose right operand depends on the input, or whose left one does not."""
    return node.is_data(1) or not node.is_data(0)


@gradient("Gemm")
def gemm_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G · B'ᵀ (transA, transB and alpha applied, no transposed copy of the weight)."""
    _gemm_check(node)
    return GEMM.gradient(b, node)


@gradient("MatMul")
def matmul_gradient(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """G · Wᵀ for a constant 2-D weight; G·Bᵀ and Aᵀ·G for two data tensors (batched, un-broadcast)."""
    if is_product(node):
        return matmul_product_gradient(b, node)
    _matmul_check(node)
    return MATMUL.gradient(b, node)


def flattened_map(node: NodeView) -> str | None:
    """The 4-D tensor that this layer's input was flattened from, if any."""
    producer = node.graph.producer.get(node.inputs[0])
    while producer is not None and producer.op_type in _TRANSPARENT:
        producer = node.graph.producer.get(producer.input[0])
    if producer is None or producer.op_type not in ("Flatten", "Reshape"):
        return None
    source = producer.input[0]
    return source if len(node.graph.shape(source)) == 4 and len(node.shape(0)) == 2 else None


def token_view(node: NodeView) -> tuple[int, int, int, int] | None:
    """``(channels, tokens, batch axis, outer)`` of the sample view ``[N, C, tokens]`` when the layer
    reads a token tensor (rank ≥ 3, or a batch merged with tokens); ``None`` for a plain ``[N, C]``
    input. The batch may sit at any axis but the channels (``[T, N, C]`` in ``nn.MultiheadAttention``'s
    exports), be merged batch-major with tokens at axis 0 (``[N·T, C]``), or follow ``outer`` tokens
    inside its axis (``[T·N, C]``, MultiheadAttention's ``out_proj``): that axis is split into
    ``[outer, rest]`` first, and the batch sits at the next axis."""
    shape = node.shape(0)
    found = batch(node, node.inputs[0])
    factor = found[1] if found is not None else 1
    if len(shape) < 3 and factor == 1:
        return None
    outer = node.graph.merged_outer(node.inputs[0]) if found is not None else 1
    axis = None if found is None else found[0] + (outer != 1)
    inner = factor // outer if outer else factor
    if found is None or outer is None or found[0] == len(shape) - 1 or (axis != 0 and inner != 1):
        order = "" if outer == 1 else f" after {outer} other elements" if outer else " in an order no reshape tells"
        raise node.refuse(f"the token tensor '{node.inputs[0]}' {list(shape)} carries the batch at axis "
                          f"{None if found is None else found[0]}" + (f" merged with {factor} elements" if factor != 1
                                                                         else "") + order +
                          "; the token form of the AGF rule needs it before the channels, merged only at axis 0 "
                          "or after whole tokens")
    return shape[-1], factor * math.prod(d for i, d in enumerate(shape[:-1]) if i != found[0]), axis, outer


def _token_agf(b: GraphBuilder, node: NodeView, layer: Bilinear, channels: int, tokens: int, axis: int,
               outer: int) -> str:
    """The conv rule (eq. 10–14) of a linear layer applied per token, a 1×1 conv over ``tokens``."""
    relevance_out, weight = node.relevance[0], layer.weight(b, node)
    masked_gradient = layer.vjp(b, node, where_nonzero(b, node.gradient[0], relevance_out), weight)
    abs_weight = layer.absolute_weight(b, node)
    # op(1, |W|) is data-free and the same for every token: ONNX Runtime folds it when it loads the model
    ones_through = layer.forward(b, node, b.const(np.ones((1, channels), np.float32)), abs_weight)
    agnostic = layer.vjp(b, node, safe_divide(b, relevance_out, ones_through, nonnegative=True, once=True), abs_weight)
    influence = layer.absolute_influence(b, node)

    original = static_shape(node, node.inputs[0])
    shape = list(original)
    if outer != 1:  # [T·N, C] → [T, N, C]
        merged = axis - 1
        shape[merged:merged + 1] = [outer, -1]
    batch_first = [axis] + [i for i in range(len(shape)) if i != axis]  # the batch to the front, if elsewhere

    def channel_first(tensor: str) -> str:  # [N(·P), T…, C] → [N, C, P·T]
        if outer != 1:
            tensor = b.Reshape(tensor, b.ints(shape))
        moved = b.Transpose(tensor, perm=batch_first) if axis else tensor
        return b.Transpose(b.Reshape(moved, b.ints([-1, tokens, channels])), perm=[0, 2, 1])

    views = [channel_first(t) for t in (node.inputs[0], node.input_gradients[0], masked_gradient, influence, agnostic)]
    relevance_in = b.Transpose(full_rule(b, *views, shape=(channels, tokens)), perm=[0, 2, 1])
    if not axis:
        return b.Reshape(relevance_in, b.ints(original))
    moved = b.Reshape(relevance_in, b.ints([shape[i] for i in batch_first]))
    restored = b.Transpose(moved, perm=[int(i) for i in np.argsort(batch_first)])
    return b.Reshape(restored, b.ints(original)) if outer != 1 else restored


def _agf(layer: Bilinear, b: GraphBuilder, node: NodeView) -> list[str | None]:
    view = token_view(node)
    if view is not None:
        return data_only(node, {0: _token_agf(b, node, layer, *view)})
    influence = layer.absolute_influence(b, node)
    source = flattened_map(node)
    if source is None:
        return data_only(node, {0: influence})
    view = b.ints([0, *node.graph.shape(source)[1:]])
    flat = b.ints([0, -1])
    gradient_map = b.Relu(channel_mean(b, b.Mul(source, b.Reshape(node.input_gradients[0], view)),
                                       node.graph.shape(source)[1:]))
    gradient_map = b.Reshape(b.Expand(gradient_map, b.ints([1, *node.graph.shape(source)[1:]])), flat)
    gradient_map = normalise_by_max(b, b.Mul(b.Relu(gradient_map), nonzero(b, influence)), 2)
    return data_only(node, {0: delta_shift(b, influence, gradient_map, 2)})


def _gemm_bias(b: GraphBuilder, node: NodeView) -> str | None:
    """Gemm's ``C`` times ``beta``."""
    if len(node.inputs) < 3 or not node.inputs[2]:
        return None
    beta = node.attr("beta", 1.0)
    return b.Mul(node.inputs[2], b.const(beta)) if beta != 1.0 else node.inputs[2]


def _matmul_bias(b: GraphBuilder, node: NodeView) -> str | None:
    """A constant ``Add`` right after the MatMul."""
    readers = node.graph.consumers.get(node.outputs[0], [])
    if len(readers) == 1 and readers[0].op_type == "Add":
        others = [i for i in readers[0].input if i != node.outputs[0]]
        if len(others) == 1 and node.graph.is_constant(others[0]):
            return others[0]
    return None


LayerRule = Callable[[Bilinear, GraphBuilder, NodeView], list]

#: The relevance kinds of a linear layer: the rule (given the op's ``Bilinear``) and its description.
_KINDS: dict[str, tuple[LayerRule, str]] = {
    "agf": (_agf, "Absolute influence C (eq. 9); Δshift(C, nmax(gradient–input map)) after a flattened 4-D map"),
    "flat": (lambda layer, b, node: data_only(node, {0: layer.absolute_influence(b, node)}),
             "Absolute influence only: ΦX = C (the authors' rule for 1×1 convs, which a per-token linear layer is)"),
    "zB": (lambda layer, b, node: layer.input_layer(b, node),
           "z^B rule bounded by the image's per-sample minimum and maximum"),
    "alpha1beta0": (lambda layer, b, node: layer.alpha_beta(b, node, 1.0, 0.0),
                    "LRP-α1β0: positive contributions only, no bias"),
    "alpha2beta1": (lambda layer, b, node: layer.alpha_beta(b, node, 2.0, 1.0),
                    "LRP-α2β1: twice the positive contributions minus the negative ones, no bias"),
    "rap": (lambda layer, b, node: layer.relative(b, node, negative_on_second=False),
            "RAP: relevance split by sign over the positive and negative contributions, shifted to conserve ΣR"),
}
_RAP_FIRST = "RAP's first step at the logits layer (first_prop + redistribute), from the target's one-hot"


def _register(op_type: str, layer: Bilinear, bias: Callable[[GraphBuilder, NodeView], str | None],
              tokens: str, products: bool) -> None:
    """Register the relevance kinds of one linear op; ``tokens``/``products`` complete the descriptions."""
    kinds = {**_KINDS, "rap_first": (lambda layer, b, node: layer.relative_start(b, node, bias(b, node)),
                                      _RAP_FIRST)}
    for kind, (rule, description) in kinds.items():
        def bound(b: GraphBuilder, node: NodeView, rule: LayerRule = rule) -> list[str | None]:
            if products and is_product(node):
                return matmul_product_relevance(b, node)
            return rule(layer, b, node)

        doc = description + (tokens if kind == "agf" else "") + ("; two data tensors: the product rule" if products
                                                                  else "") + "."
        relevance(op_type, kind=kind)(named(bound, f"{op_type.lower()}_{kind}", doc, __name__))


_register("Gemm", GEMM, _gemm_bias, "", products=False)
_register("MatMul", MATMUL, _matmul_bias, "; on token tensors the conv's full rule (eq. 10–14)", products=True)
