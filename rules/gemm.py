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

import functools
import math

import numpy as np

from agf_onnx.builder import GraphBuilder
from agf_onnx.graph import NodeView
from agf_onnx.maths import channel_mean, delta_shift, nonzero, normalise_by_max, safe_divide

from ._helpers import Bilinear, batch, data_only, static_shape
from ._registry import Rule, gradient, relevance
from .conv import full_rule
from .product import matmul_product_gradient, matmul_product_relevance

#: Ops that only move data; the flattened-map test looks through them.
_TRANSPARENT = {"Identity", "Dropout"}


def _weight(b, node: NodeView) -> str:
    """``B`` as stored (``transB`` stays an attribute: a transposed copy of a large classifier
    weight would cost memory and load time), with ``alpha`` folded in when it is not 1."""
    alpha = node.attr("alpha", 1.0)
    return b.Mul(node.inputs[1], b.const(alpha)) if alpha != 1.0 else node.inputs[1]


def _gemm_forward(b, node: NodeView, x: str, w: str) -> str:
    return b.Gemm(x, w, transA=node.attr("transA", 0), transB=node.attr("transB", 0))


def _gemm_vjp(b, node: NodeView, g: str, w: str) -> str:
    # X' · B' = Y  ⇒  ∂/∂X' = G · B'ᵀ, with B' = Bᵀ when transB
    gradient_in = b.Gemm(g, w, transB=0 if node.attr("transB", 0) else 1)
    return b.Transpose(gradient_in, perm=[1, 0]) if node.attr("transA", 0) else gradient_in


def _matmul_vjp(b, node: NodeView, g: str, w: str) -> str:
    if len(node.shape(0)) == 2:
        return b.Gemm(g, w, transB=1)
    return b.MatMul(g, b.Transpose(w, perm=[1, 0]))


GEMM = Bilinear(weight=_weight, forward=_gemm_forward, vjp=_gemm_vjp)
MATMUL = Bilinear(weight=lambda b, node: node.inputs[1], forward=lambda b, node, x, w: b.MatMul(x, w),
                  vjp=_matmul_vjp)
LINEAR = {"Gemm": GEMM, "MatMul": MATMUL}


def _check(node: NodeView) -> None:
    if node.is_data(1) or (len(node.inputs) > 2 and node.is_data(2)):
        raise node.refuse("only a data input A times a constant weight B is supported "
                          "(both operands depend on the input)")
    if node.op_type == "Gemm" and node.attr("transA", 0) and node.graph.shape(node.inputs[0])[0] is None:
        raise node.refuse("transA=1 on a batched input mixes samples; not an image classifier layer")
    if node.op_type == "MatMul" and len(node.shape(1)) != 2:
        raise node.refuse(f"the weight must be 2-D, it has shape {list(node.shape(1))}")


def is_product(node: NodeView) -> bool:
    """A MatMul whose right operand depends on the input, or whose left one does not."""
    return node.op_type == "MatMul" and (node.is_data(1) or not node.is_data(0))


def _or_product(rule: Rule) -> Rule:
    """``rule`` for a linear layer with a constant weight, the product rule for two data operands."""

    @functools.wraps(rule)
    def either(b, node: NodeView) -> list[str | None]:
        return matmul_product_relevance(b, node) if is_product(node) else rule(b, node)

    return either


@gradient("Gemm", "MatMul")
def linear_gradient(b, node: NodeView) -> list[str | None]:
    """G · W'ᵀ; for a MatMul of two data tensors G·Bᵀ and Aᵀ·G (batched, un-broadcast)."""
    if is_product(node):
        return matmul_product_gradient(b, node)
    _check(node)
    return LINEAR[node.op_type].gradient(b, node)


@relevance("Gemm", "MatMul", kind="zB")
@_or_product
def linear_input_layer(b, node: NodeView) -> list[str | None]:
    """z^B rule bounded by the image's per-sample minimum and maximum."""
    return LINEAR[node.op_type].input_layer(b, node)


def flattened_map(node: NodeView) -> str | None:
    """The 4-D tensor that this layer's input was flattened from, if any."""
    producer = node.graph.producer.get(node.inputs[0])
    while producer is not None and producer.op_type in _TRANSPARENT:
        producer = node.graph.producer.get(producer.input[0])
    if producer is None or producer.op_type not in ("Flatten", "Reshape"):
        return None
    source = producer.input[0]
    return source if len(node.graph.shape(source)) == 4 and len(node.shape(0)) == 2 else None


def token_view(node: NodeView) -> tuple[int, int] | None:
    """``(channels, tokens)`` of the sample view ``[N, C, tokens]`` when the layer reads a token tensor
    (rank ≥ 3, or a batch merged with tokens); ``None`` for a plain ``[N, C]`` input."""
    shape = node.shape(0)
    found = batch(node, node.inputs[0])
    factor = found[1] if found is not None else 1
    if len(shape) < 3 and factor == 1:
        return None
    if found is None or found[0] != 0:
        raise node.refuse(f"the token tensor '{node.inputs[0]}' {list(shape)} carries the batch at axis "
                          f"{None if found is None else found[0]}; the token form of the AGF rule needs it at axis 0")
    return shape[-1], factor * math.prod(shape[1:-1])


def _token_agf(b: GraphBuilder, node: NodeView, channels: int, tokens: int) -> str:
    """The conv rule (eq. 10–14) of a linear layer applied per token, a 1×1 conv over ``tokens``."""
    relevance_out, weight = node.relevance[0], node.inputs[1]
    mask = nonzero(b, relevance_out)
    masked_gradient = MATMUL.vjp(b, node, b.Mul(node.gradient[0], mask), weight)
    abs_weight = MATMUL.absolute_weight(b, node)
    # op(1, |W|) is data-free and the same for every token: ONNX Runtime folds it when it loads the model
    ones_through = b.MatMul(b.const(np.ones((1, channels), np.float32)), abs_weight)
    agnostic = MATMUL.vjp(b, node, safe_divide(b, relevance_out, b.Mul(ones_through, mask)), abs_weight)
    influence = MATMUL.absolute_influence(b, node)

    def channel_first(tensor: str) -> str:  # [N(·P), T…, C] → [N, C, P·T]
        return b.Transpose(b.Reshape(tensor, b.ints([-1, tokens, channels])), perm=[0, 2, 1])

    views = [channel_first(t) for t in (node.inputs[0], node.input_gradients[0], masked_gradient, influence, agnostic)]
    relevance_in = full_rule(b, *views, shape=(channels, tokens))
    return b.Reshape(b.Transpose(relevance_in, perm=[0, 2, 1]), b.ints(static_shape(node, node.inputs[0])))


@relevance("Gemm", "MatMul", kind="agf")
@_or_product
def linear_agf(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Absolute influence C; Δshift(C, nmax(gradient–input map)) after a flattened 4-D map; on tokens the conv rule."""
    view = token_view(node)
    if view is not None:
        return data_only(node, {0: _token_agf(b, node, *view)})
    influence = LINEAR[node.op_type].absolute_influence(b, node)
    source = flattened_map(node)
    if source is None:
        return data_only(node, {0: influence})
    view = b.ints([0, *node.graph.shape(source)[1:]])
    flat = b.ints([0, -1])
    gradient_map = b.Relu(channel_mean(b, b.Mul(source, b.Reshape(node.input_gradients[0], view))))
    gradient_map = b.Reshape(b.Expand(gradient_map, b.ints([1, *node.graph.shape(source)[1:]])), flat)
    gradient_map = normalise_by_max(b, b.Mul(b.Relu(gradient_map), nonzero(b, influence)), 2)
    return data_only(node, {0: delta_shift(b, influence, gradient_map, 2)})


@relevance("Gemm", "MatMul", kind="flat")
@_or_product
def linear_flat(b: GraphBuilder, node: NodeView) -> list[str | None]:
    """Absolute influence only: ΦX = C (the authors' rule for 1×1 convs, which a per-token linear layer is)."""
    return data_only(node, {0: LINEAR[node.op_type].absolute_influence(b, node)})


@relevance("Gemm", "MatMul", kind="alpha1beta0")
@_or_product
def linear_alpha1beta0(b, node: NodeView) -> list[str | None]:
    """LRP-α1β0: positive contributions only, no bias."""
    return LINEAR[node.op_type].alpha_beta(b, node, 1.0, 0.0)


@relevance("Gemm", "MatMul", kind="alpha2beta1")
@_or_product
def linear_alpha2beta1(b, node: NodeView) -> list[str | None]:
    """LRP-α2β1: twice the positive contributions minus the negative ones, no bias."""
    return LINEAR[node.op_type].alpha_beta(b, node, 2.0, 1.0)


@relevance("Gemm", "MatMul", kind="rap")
@_or_product
def linear_rap(b, node: NodeView) -> list[str | None]:
    """RAP: relevance split by sign over the positive and negative contributions, shifted to conserve ΣR."""
    return LINEAR[node.op_type].relative(b, node, negative_on_second=False)


@relevance("Gemm", "MatMul", kind="rap_first")
@_or_product
def linear_rap_first(b, node: NodeView) -> list[str | None]:
    """RAP's first step at the logits layer (first_prop + redistribute), from the target's one-hot."""
    return LINEAR[node.op_type].relative_start(b, node, _bias(b, node))


def _bias(b, node: NodeView) -> str | None:
    """The bias the layer adds: Gemm's ``C`` times ``beta``, or a constant ``Add`` right after a MatMul."""
    if node.op_type == "Gemm":
        if len(node.inputs) < 3 or not node.inputs[2]:
            return None
        beta = node.attr("beta", 1.0)
        return b.Mul(node.inputs[2], b.const(beta)) if beta != 1.0 else node.inputs[2]
    readers = node.graph.consumers.get(node.outputs[0], [])
    if len(readers) == 1 and readers[0].op_type == "Add":
        others = [i for i in readers[0].input if i != node.outputs[0]]
        if len(others) == 1 and node.graph.is_constant(others[0]):
            return others[0]
    return None
