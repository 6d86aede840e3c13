"""ONNX Runtime's ``com.microsoft`` contrib ops, written back as standard ``ai.onnx`` ops.

ONNX Runtime's optimisers (``SessionOptions.optimized_model_filepath`` at level EXTENDED, and
``onnxruntime.transformers.optimizer``) fuse standard subgraphs into contrib ops: ``FusedConv`` =
Conv + activation, ``BiasGelu`` = Add + GELU, ``SkipLayerNormalization`` = residual Add +
LayerNormalization, ``Attention`` = packed QKV projection + scaled-dot-product attention … The
rules in ``rules/`` know the standard forms, so ``decompose`` replaces each contrib node by the
standard ops that compute the same outputs under the same output tensor names, in the forms the
exporters write and the rules (and ``tokens.py``'s attention detection: a Softmax whose output is
the left operand of a MatMul) recognise:

- GELUs as ``x · ½(1 + erf(x/√2))`` or ``x · ½(1 + tanh(√(2/π)(x + 0.044715 x³)))`` (the forms
  TorchScript exports, which the activation rules read as a gate), QuickGelu as ``x · sigmoid(αx)``;
- layer norms as ``LayerNormalization`` (opset ≥ 17; written out as ReduceMean/Sub/Div below
  17), RMS norms as ``x / √(mean(x²) + ε) · γ``;
- attention as timm/torch write it: MatMul QKV, Split, Reshape/Transpose to heads,
  ``Softmax(q·kᵀ·s + mask)``, MatMul with V, Transpose/Reshape back.

After ``decompose``: no node of the ``com.microsoft`` domain is left (nor ONNX Runtime's
``SimplifiedLayerNormalization``, which it registers in the ``ai.onnx`` domain); every other node
is untouched and in its place. A contrib op with no decomposition, or an attribute form that is
not written out here, is refused by name (op type, domain, node names). The layout-specific
``com.microsoft.nchwc`` ops of level ALL are refused with the advice to save at EXTENDED.

Ops are emitted at the model's ``ai.onnx`` opset; every form is valid from opset 13 on
(``Split`` with a ``split`` input, ``Softmax`` over the last axis); ``ReduceMean`` takes its axes
as an attribute below opset 18 and as an input from 18 on, and ``LayerNormalization`` exists
from 17 on (both chosen here by the opset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CompileError, UnsupportedOpsError
from .builder import GraphBuilder

MICROSOFT = "com.microsoft"
NCHWC = "com.microsoft.nchwc"
#: ONNX Runtime registers these contrib ops in the ``ai.onnx`` domain (no standard op of the name).
_ONNX_DOMAIN_CONTRIB = {"SimplifiedLayerNormalization"}


class LayoutSpecificOpsError(UnsupportedOpsError):
    """A file saved at ORT_ENABLE_ALL: ``com.microsoft.nchwc`` ops in a blocked channel layout."""

    def __init__(self, unsupported: dict[str, list[str]]) -> None:
        super().__init__(unsupported)
        self.args = (f"{self.args[0]}\nThese `com.microsoft.nchwc` ops hold tensors in a blocked channel layout "
                     "(NCHWc) whose block size is this CPU's vector width: ONNX Runtime wrote them at "
                     "ORT_ENABLE_ALL and warns that such a file is tied to the machine that wrote it. "
                     "Save the optimised file at ORT_ENABLE_EXTENDED instead (its FusedConv, FusedGemm, "
                     "BiasGelu… are explained).",)


class _Node:
    """One contrib node as its decomposer sees it: inputs (``""`` where omitted), outputs,
    attributes with their defaults, and the float element type and opset to emit at."""

    def __init__(self, node: onnx.NodeProto, model: _ModelFacts) -> None:
        self.model, self.opset = model, model.opset
        self.name, self.op_type = node.name, node.op_type
        self.inputs, self.outputs = list(node.input), list(node.output)
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.dtype = model.float_type(node)

    def input(self, index: int) -> str:
        """The input at ``index``, ``""`` where omitted."""
        return self.inputs[index] if index < len(self.inputs) else ""

    def output(self, index: int) -> str:
        """The output at ``index``, ``""`` where not asked for."""
        return self.outputs[index] if index < len(self.outputs) else ""

    def attr(self, name: str, default=None):
        value = self.attributes.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def scalar(self, b: GraphBuilder, value: float) -> str:
        return b.const(np.asarray(value, self.dtype), self.dtype)


Decomposer = Callable[[GraphBuilder, _Node], dict[int, str]]
#: op type (``com.microsoft``) → its decomposer: returns {output index: the tensor computing it}.
DECOMPOSERS: dict[str, Decomposer] = {}


def decomposes(op_type: str) -> Callable[[Decomposer], Decomposer]:
    def register(function: Decomposer) -> Decomposer:
        DECOMPOSERS[op_type] = function
        return function
    return register


# -- activations (the forms the rules know) ------------------------------------------------------
def _activation(b: GraphBuilder, node: _Node, x: str, kind: str, params: Sequence[float]) -> str:
    """``kind(x)`` for the activations ONNX Runtime fuses into FusedConv and FusedGemm (MLAS's
    Relu, Tanh, Sigmoid, LeakyRelu(α), Clip(min, max), HardSigmoid(α, β))."""
    if kind in ("", "Identity"):
        return x
    if kind in ("Relu", "Tanh", "Sigmoid"):
        return b.op(kind, x)
    if kind == "LeakyRelu":
        return b.LeakyRelu(x, alpha=float(params[0]))
    if kind == "HardSigmoid":
        return b.HardSigmoid(x, alpha=float(params[0]), beta=float(params[1]))
    if kind == "Clip":
        return b.Clip(x, node.scalar(b, params[0]), node.scalar(b, params[1]))
    raise CompileError(f"{node.op_type} node '{node.name}': fused activation '{kind}' is not one ONNX Runtime "
                       "writes (Relu, Tanh, Sigmoid, LeakyRelu, Clip, HardSigmoid)")


def _gelu_erf(b: GraphBuilder, node: _Node, x: str) -> str:
    """``x · ½(1 + erf(x/√2))``, as TorchScript exports nn.GELU()."""
    gate = b.Add(b.Erf(b.Div(x, node.scalar(b, np.sqrt(2.0)))), node.scalar(b, 1.0))
    return b.Mul(b.Mul(x, gate), node.scalar(b, 0.5))


def _gelu_tanh(b: GraphBuilder, node: _Node, x: str) -> str:
    """``x · ½(1 + tanh(√(2/π)(x + 0.044715 x³)))``, as TorchScript exports GELU(approximate='tanh')."""
    cube = b.Mul(x, b.Mul(x, x))
    inner = b.Mul(b.Add(x, b.Mul(cube, node.scalar(b, 0.044715))), node.scalar(b, np.sqrt(2 / np.pi)))
    gate = b.Add(b.Tanh(inner), node.scalar(b, 1.0))
    return b.Mul(b.Mul(x, gate), node.scalar(b, 0.5))


def _plus_bias(b: GraphBuilder, node: _Node, index: int) -> str:
    """Input 0 plus the optional bias at ``index``."""
    bias = node.input(index)
    return b.Add(node.input(0), bias) if bias else node.input(0)


@decomposes("FusedConv")
def fused_conv(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = activation(Conv(X, W, B) + Z), Z optional (ONNX Runtime's Conv + Add + Relu fusion)."""
    conv_attributes = {k: v for k, v in node.attributes.items() if k not in ("activation", "activation_params")}
    y = b.Conv(*[i for i in node.inputs[:3] if i], **conv_attributes)
    if node.input(3):
        y = b.Add(y, node.input(3))
    return {0: _activation(b, node, y, node.attr("activation", ""), node.attr("activation_params", []))}


@decomposes("FusedGemm")
def fused_gemm(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = activation(α·A'·B' + β·C), activation parameters ``activation_alpha``/``_beta``."""
    gemm_attributes = {k: v for k, v in node.attributes.items() if k in ("alpha", "beta", "transA", "transB")}
    y = b.Gemm(*[i for i in node.inputs[:3] if i], **gemm_attributes)
    kind = node.attr("activation", "")
    params = {"LeakyRelu": [node.attr("activation_alpha", 0.01)],
              "HardSigmoid": [node.attr("activation_alpha", 0.2), node.attr("activation_beta", 0.5)],
              "Clip": [node.attr("activation_alpha", -np.inf), node.attr("activation_beta", np.inf)]}.get(kind, [])
    return {0: _activation(b, node, y, kind, params)}


@decomposes("FusedMatMul")
def fused_matmul(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = α · A'·B', A' and B' with the last two axes swapped where transA/transB."""
    if node.attr("transBatchA", 0) or node.attr("transBatchB", 0):
        raise CompileError(f"FusedMatMul node '{node.name}': transBatchA/transBatchB (a batch-axis transpose "
                           "fused into the product) is not written out; save the file at ORT_ENABLE_BASIC")
    a, c = node.input(0), node.input(1)
    a = _swap_last_axes(b, node, a) if node.attr("transA", 0) else a
    c = _swap_last_axes(b, node, c) if node.attr("transB", 0) else c
    y = b.MatMul(a, c)
    alpha = float(node.attr("alpha", 1.0))
    return {0: y if alpha == 1.0 else b.Mul(y, node.scalar(b, alpha))}


def _swap_last_axes(b: GraphBuilder, node: _Node, x: str) -> str:
    """x with its last two axes swapped: a weight transposed now, a tensor by a Transpose."""
    weight = node.model.initializer(x)
    if weight is not None:
        return b.const(np.swapaxes(weight, -1, -2), weight.dtype)
    rank = node.model.rank(x)
    if rank < 2:
        raise CompileError(f"{node.op_type} node '{node.name}': the rank of '{x}' (transposed operand) is unknown")
    return b.Transpose(x, perm=[*range(rank - 2), rank - 1, rank - 2])


@decomposes("Gelu")
def gelu(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = X · ½(1 + erf(X/√2))."""
    return {0: _gelu_erf(b, node, node.input(0))}


@decomposes("BiasGelu")
def bias_gelu(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """C = Gelu(A + B), erf form."""
    return {0: _gelu_erf(b, node, _plus_bias(b, node, 1))}


@decomposes("FastGelu")
def fast_gelu(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = ½X'(1 + tanh(0.797885 X' + 0.035677 X'³)), X' = X + bias (bias optional)."""
    return {0: _gelu_tanh(b, node, _plus_bias(b, node, 1))}


@decomposes("QuickGelu")
def quick_gelu(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = X · sigmoid(α X) (α = 1: SiLU/Swish; 1.702: CLIP's quick GELU)."""
    x, alpha = node.input(0), float(node.attr("alpha", 1.702))
    return {0: b.Mul(x, b.Sigmoid(x if alpha == 1.0 else b.Mul(x, node.scalar(b, alpha))))}


@decomposes("BiasAdd")
def bias_add(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = X + bias + skip."""
    return {0: b.Add(b.Add(node.input(0), node.input(1)), node.input(2))}


# -- normalisations ------------------------------------------------------------------------------
def _reduce_mean_last(b: GraphBuilder, node: _Node, x: str) -> str:
    """mean over the last axis, kept (ReduceMean's axes: an attribute below opset 18, an input from 18)."""
    if node.opset >= 18:
        return b.ReduceMean(x, b.ints([-1]), keepdims=1)
    return b.ReduceMean(x, axes=[-1], keepdims=1)


def _skip_sum(b: GraphBuilder, node: _Node, bias_index: int) -> str:
    """(input + bias) + skip: the optimiser takes ``input`` from the branch's MatMul and its bias
    from the branch's Add, so this is the order of the unoptimised graph, ``skip + (x·W + b)``.
    The order matters to relevance rules (a z-rule shares Φ between the residual merge's operands
    in proportion to their values, a bias added after the merge would shift the shares)."""
    branch = b.Add(node.input(0), node.input(bias_index)) if node.input(bias_index) else node.input(0)
    return b.Add(branch, node.input(1))


def _layer_norm(b: GraphBuilder, node: _Node, x: str, gamma: str, beta: str) -> tuple[str, str, str]:
    """(LayerNorm over the last axis, mean, 1/√(var + ε)): one LayerNormalization from opset 17,
    below it the primitive form TorchScript exports at those opsets."""
    epsilon = float(node.attr("epsilon", 1e-12))
    if node.opset >= 17:
        return b.LayerNormalization(x, gamma, *([beta] if beta else []), axis=-1, epsilon=epsilon, outputs=3)
    mean = _reduce_mean_last(b, node, x)
    centred = b.Sub(x, mean)
    variance = _reduce_mean_last(b, node, b.Mul(centred, centred))
    std = b.Sqrt(b.Add(variance, node.scalar(b, epsilon)))
    y = b.Mul(b.Div(centred, std), gamma)
    return (b.Add(y, beta) if beta else y), mean, b.Reciprocal(std)


def _rms_norm(b: GraphBuilder, node: _Node, x: str, gamma: str) -> tuple[str, str]:
    """(x / √(mean(x²) + ε) · γ, 1/√(mean(x²) + ε)), as torch exports nn.RMSNorm."""
    rms = b.Sqrt(b.Add(_reduce_mean_last(b, node, b.Mul(x, x)), node.scalar(b, float(node.attr("epsilon", 1e-12)))))
    return b.Mul(b.Div(x, rms), gamma), b.Reciprocal(rms)


@decomposes("SkipLayerNormalization")
def skip_layer_norm(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """S = (input + bias) + skip; output = LayerNorm(S)·γ + β; mean, 1/σ and S as optional outputs."""
    total = _skip_sum(b, node, 4)
    y, mean, inv_std = _layer_norm(b, node, total, node.input(2), node.input(3))
    return {0: y, 1: mean, 2: inv_std, 3: total}


@decomposes("SkipSimplifiedLayerNormalization")
def skip_simplified_layer_norm(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """S = (input + bias) + skip; output = S / √(mean(S²) + ε) · γ; 1/rms and S as optional outputs."""
    if node.output(1):
        raise CompileError(f"SkipSimplifiedLayerNormalization node '{node.name}': its 'mean' output is "
                           "not defined for an RMS norm and is not written out")
    total = _skip_sum(b, node, 3)
    y, inv_rms = _rms_norm(b, node, total, node.input(2))
    return {0: y, 2: inv_rms, 3: total}


def simplified_layer_norm(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = X / √(mean(X²) + ε) · γ over the last axis (ONNX Runtime's ai.onnx-domain RMS norm)."""
    axis, rank = node.attr("axis", -1), node.model.rank(node.input(0))
    if axis != -1 and not (rank and axis == rank - 1):
        raise CompileError(f"SimplifiedLayerNormalization node '{node.name}': axis {axis} of a rank-{rank or '?'} "
                           "input (only the last axis is written out)")
    y, inv_rms = _rms_norm(b, node, node.input(0), node.input(1))
    return {0: y, 1: inv_rms}


# -- attention and embeddings ------------------------------------------------------------------
def _attention_mask(b: GraphBuilder, node: _Node, mask: str, keys: str) -> str:
    """The additive mask [B, 1, 1|S, T] from ``mask_index``: a raw 0/1 mask [B, T] or [B, S, T]
    (0 → mask_filter_value), or right-padding lengths [B] (keys at or past the length masked)."""
    filter_value = node.scalar(b, float(node.attr("mask_filter_value", -10000.0)))
    rank = node.model.rank(mask)
    if rank == 1:
        count = b.Gather(b.Shape(keys), b.ints([2]))  # T, from K's [B, heads, T, d]
        positions = b.Range(b.const(0, np.int64), b.Squeeze(count), b.const(1, np.int64))
        masked = b.Not(b.Less(b.Unsqueeze(positions, b.ints([0])),
                              b.Unsqueeze(b.Cast(mask, to=TensorProto.INT64), b.ints([1]))))
        return b.Unsqueeze(b.Mul(b.Cast(masked, to=_onnx_type(node.dtype)), filter_value), b.ints([1, 2]))
    if rank in (2, 3):
        masked = b.Not(b.Greater(mask, b.const(0, node.model.numpy_type(mask))))
        additive = b.Mul(b.Cast(masked, to=_onnx_type(node.dtype)), filter_value)
        return b.Unsqueeze(additive, b.ints([1, 2] if rank == 2 else [1]))
    raise CompileError(f"{node.op_type} node '{node.name}': a mask of rank {rank} is not written out "
                       "(raw masks [B, T] and [B, S, T] and lengths [B] are)")


def _scaled_dot_product(b: GraphBuilder, node: _Node, q: str, k: str, v: str, heads: int, head_size: int,
                        mask: str, attention_bias: str) -> str:
    """concat_h(softmax(q_h k_hᵀ · s + mask + attention_bias) v_h) of [B, S, ·] projections, as
    timm writes it: heads split by Reshape/Transpose, ``MatMul(Softmax(·), V)``, merged back."""
    q, k, v = (b.Transpose(b.Reshape(t, b.ints([0, 0, heads, -1])), perm=[0, 2, 1, 3]) for t in (q, k, v))
    scale = node.attr("scale", None) or 1.0 / np.sqrt(head_size)
    scores = b.Mul(b.MatMul(q, b.Transpose(k, perm=[0, 1, 3, 2])), node.scalar(b, scale))
    if mask:
        scores = b.Add(scores, _attention_mask(b, node, mask, k))
    if attention_bias:
        scores = b.Add(scores, attention_bias)
    context = b.MatMul(b.Softmax(scores, axis=-1), v)
    return b.Reshape(b.Transpose(context, perm=[0, 2, 1, 3]), b.ints([0, 0, -1]))


def _refuse_decoder_inputs(node: _Node, inputs: Sequence[tuple[int, str]], outputs: Sequence[tuple[int, str]]) -> None:
    """Past/present key-value caches, causal masks and rotary embeddings are decoder machinery
    an image classifier does not have: refused by name."""
    used = [name for index, name in inputs if node.input(index)] + [name for index, name in outputs
                                                                      if node.output(index)]
    used += [name for name in ("unidirectional", "do_rotary", "past_present_share_buffer") if node.attr(name, 0)]
    if used:
        raise CompileError(f"{node.op_type} node '{node.name}': {', '.join(used)} is not written out (encoder "
                           "attention without caches is)")


@decomposes("Attention")
def attention(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = concat_h(softmax(q_h k_hᵀ · s + mask + bias_attn) v_h), [q k v] = X·W + bias, s = scale or 1/√d."""
    _refuse_decoder_inputs(node, [(4, "past"), (6, "past_sequence_length")], [(1, "present")])
    heads = int(node.attr("num_heads"))
    weights = node.model.initializer(node.input(1))
    if weights is None:
        raise CompileError(f"Attention node '{node.name}': its packed QKV weight '{node.input(1)}' is not an "
                           "initializer")
    sizes = list(node.attr("qkv_hidden_sizes", [])) or [weights.shape[-1] // 3] * 3
    projected = b.MatMul(node.input(0), node.input(1))
    if node.input(2):
        projected = b.Add(projected, node.input(2))
    q, k, v = b.Split(projected, b.ints(sizes), axis=-1, outputs=3)
    return {0: _scaled_dot_product(b, node, q, k, v, heads, sizes[0] // heads, node.input(3), node.input(5))}


@decomposes("MultiHeadAttention")
def multi_head_attention(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """Y = concat_h(softmax(q_h k_hᵀ · s + mask + bias_attn) v_h), q, k, v = query, key, value
    (each [B, ·, hidden]) plus their parts of ``bias``, s = scale or 1/√(hidden/heads)."""
    _refuse_decoder_inputs(node, [(6, "past_key"), (7, "past_value"), (8, "past_sequence_length")],
                           [(1, "present_key"), (2, "present_value"), (3, "qk")])
    ranks = [node.model.rank(node.input(i)) if node.input(i) else 0 for i in range(3)]
    if ranks != [3, 3, 3]:
        raise CompileError(f"MultiHeadAttention node '{node.name}': query, key and value of ranks {ranks}; only "
                           "separate [B, S, hidden] query, key and value are written out (not packed QKV/KV or "
                           "per-head key/value)")
    heads, hidden = int(node.attr("num_heads")), node.model.last_dim(node.input(0))
    if not hidden and not node.attr("scale", None):
        raise CompileError(f"MultiHeadAttention node '{node.name}': the hidden size of its query is unknown")
    q, k, v = node.input(0), node.input(1), node.input(2)
    if node.input(3):
        sizes = [node.model.last_dim(name) for name in (q, k, v)]
        q_bias, k_bias, v_bias = b.Split(node.input(3), b.ints(sizes), axis=0, outputs=3)
        q, k, v = b.Add(q, q_bias), b.Add(k, k_bias), b.Add(v, v_bias)
    return {0: _scaled_dot_product(b, node, q, k, v, heads, hidden // heads if hidden else 1, node.input(4),
                                   node.input(5))}


@decomposes("EmbedLayerNormalization")
def embed_layer_norm(b: GraphBuilder, node: _Node) -> dict[int, str]:
    """E = word[ids] + position[position_ids or 0…S−1] + segment[segment_ids]; output = LayerNorm(E);
    mask_index = the count of leading 1s of each mask row (int32, [B])."""
    ids = node.input(0)
    positions = node.input(8)
    if not positions:
        length = b.Squeeze(b.Gather(b.Shape(ids), b.ints([1])))
        positions = b.Range(b.const(0, np.int64), length, b.const(1, np.int64))
    total = b.Add(b.Gather(node.input(2), ids, axis=0), b.Gather(node.input(3), positions, axis=0))
    if node.input(1) and node.input(4):
        total = b.Add(total, b.Gather(node.input(4), node.input(1), axis=0))
    y, _, _ = _layer_norm(b, node, total, node.input(5), node.input(6))
    produced = {0: y, 2: total}
    if node.output(1):
        produced[1] = _leading_ones(b, node, node.input(7), ids)
    return produced


def _leading_ones(b: GraphBuilder, node: _Node, mask: str, ids: str) -> str:
    """Per row, the index of the first element that is not 1 (the row length when there is none),
    int32 [B]; zeros without a mask."""
    if not mask:
        return b.Cast(b.Mul(b.Gather(b.Shape(ids), b.ints([0])), b.const(0, np.int64)), to=TensorProto.INT32)
    not_one = b.Cast(b.Not(b.Equal(mask, b.const(1, node.model.numpy_type(mask)))), to=TensorProto.INT32)
    sentinel = b.Cast(b.Expand(b.const([[1]], np.int64), b.Concat(b.Gather(b.Shape(mask), b.ints([0])),
                                                                   b.ints([1]), axis=0)), to=TensorProto.INT32)
    first = b.ArgMax(b.Concat(not_one, sentinel, axis=1), axis=1, keepdims=0)
    return b.Cast(first, to=TensorProto.INT32)


# -- the pass ---------------------------------------------------------------------------------------
def decompose(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every ``com.microsoft`` node (and ONNX Runtime's ai.onnx-domain
    ``SimplifiedLayerNormalization``) replaced, in place, by standard ops computing the same
    outputs under the same names. A model without contrib ops is returned as an equal copy.

    Raises ``UnsupportedOpsError`` naming every contrib op type that has no decomposition as
    ``domain.op_type`` (as the planner names ops of other domains) with its node names,
    ``LayoutSpecificOpsError`` for ``com.microsoft.nchwc`` ops, and
    ``CompileError`` for an attribute form of a known op that is not written out."""
    model = _copy(model)
    graph = model.graph
    domains = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in graph.node} - domains - {"", "ai.onnx"}):
        # ONNX Runtime's transformer optimiser writes com.microsoft nodes without importing the domain
        # (its own loader does not ask); ONNX's shape inference of the inner tensors needs the import
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    nchwc = _by_op(n for n in graph.node if n.domain == NCHWC)
    if nchwc:
        raise LayoutSpecificOpsError({f"{NCHWC}.{op}": names for op, names in nchwc.items()})
    missing = _by_op(n for n in graph.node if _is_contrib(n) and _decomposer(n) is None)
    if missing:
        raise UnsupportedOpsError({f"{MICROSOFT}.{op}": names for op, names in missing.items()})
    if not any(_is_contrib(n) for n in graph.node):
        return model
    facts = _ModelFacts(model)
    taken = {name for n in graph.node for name in (*n.input, *n.output, n.name)} | \
            {t.name for t in graph.initializer} | {i.name for i in graph.input}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not _is_contrib(node):
            nodes.append(node)
            continue
        b = GraphBuilder(reserved=taken)
        with b.scope(f"{node.name or node.op_type}/decomposed"):
            produced = _decomposer(node)(b, _Node(node, facts))
        _give_names(b, node, produced)
        _keep_node_name(b, node)
        taken |= b._taken
        nodes.extend(b.nodes)
        graph.initializer.extend(b.initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_domains(model)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _is_contrib(node: onnx.NodeProto) -> bool:
    return node.domain == MICROSOFT or (node.domain in ("", "ai.onnx") and node.op_type in _ONNX_DOMAIN_CONTRIB)


def _decomposer(node: onnx.NodeProto) -> Decomposer | None:
    if node.domain in ("", "ai.onnx"):
        return simplified_layer_norm if node.op_type == "SimplifiedLayerNormalization" else None
    return DECOMPOSERS.get(node.op_type)


def _by_op(nodes) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node in nodes:
        found.setdefault(node.op_type, []).append(node.name or "(unnamed)")
    return found


def _give_names(b: GraphBuilder, node: onnx.NodeProto, produced: dict[int, str]) -> None:
    """Make each asked-for output of ``node`` the name of the tensor computing it: the emitting
    node's output is renamed (an Identity where the value is not emitted by this builder)."""
    producers = {out: (n, i) for n in b.nodes for i, out in enumerate(n.output)}
    for index, wanted in enumerate(node.output):
        if not wanted:
            continue
        if index not in produced or not produced[index]:
            raise CompileError(f"{node.op_type} node '{node.name}': output {index} ('{wanted}') is not written out")
        tensor = produced[index]
        if tensor in producers and tensor not in b._values:
            emitter, slot = producers[tensor]
            emitter.output[slot] = wanted
            for n in b.nodes:  # later readers of the old name
                n.input[:] = [wanted if i == tensor else i for i in n.input]
            producers[wanted] = producers.pop(tensor)
        else:
            b.nodes.append(helper.make_node("Identity", [tensor], [wanted], name=b.fresh("Identity")))


#: The standard op a fused op is built around: its node keeps the fused node's name, so that a
#: layer named on the unoptimised file (``--layer`` of Grad-CAM) names the same op here.
_CORE = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul"}


def _keep_node_name(b: GraphBuilder, node: onnx.NodeProto) -> None:
    core = _CORE.get(node.op_type)
    emitted = next((n for n in b.nodes if n.op_type == core), None)
    if emitted is not None and node.name:
        emitted.name = node.name


class _ModelFacts:
    """What decomposers read of the model beyond the node: its opset, initializers, and the
    element types and ranks the file states (ONNX shape inference does not know the contrib ops;
    it is asked only for tensors of the standard part of the graph)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self._model = model
        self._weights = {t.name: t for t in graph.initializer}
        self._infos = {info.name: info for info in (*graph.input, *graph.value_info, *graph.output)}
        self._inferred: dict[str, onnx.ValueInfoProto] | None = None
        #: contrib outputs of a rank the schema fixes (shape inference does not know contrib ops)
        self._ranks = {n.output[1]: 1 for n in graph.node
                       if n.domain == MICROSOFT and n.op_type == "EmbedLayerNormalization" and len(n.output) > 1}

    def initializer(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self._weights[name]) if name in self._weights else None

    def _info(self, name: str) -> onnx.ValueInfoProto | None:
        if name in self._infos:
            return self._infos[name]
        if self._inferred is None:
            inferred = onnx.shape_inference.infer_shapes(self._model)
            self._inferred = {info.name: info for info in inferred.graph.value_info}
        return self._inferred.get(name)

    def elem_type(self, name: str) -> int:
        if name in self._ranks:  # EmbedLayerNormalization's mask_index
            return TensorProto.INT32
        if name in self._weights:
            return self._weights[name].data_type
        info = self._info(name)
        return info.type.tensor_type.elem_type if info is not None else TensorProto.UNDEFINED

    def numpy_type(self, name: str) -> np.dtype:
        elem_type = self.elem_type(name)
        if elem_type == TensorProto.UNDEFINED:
            raise CompileError(f"the element type of '{name}' is not stated in the file")
        return helper.tensor_dtype_to_np_dtype(elem_type)

    def rank(self, name: str) -> int:
        """The rank of ``name``; 0 where the file does not state it."""
        if name in self._weights:
            return len(self._weights[name].dims)
        if name in self._ranks:
            return self._ranks[name]
        info = self._info(name)
        shaped = info is not None and info.type.tensor_type.HasField("shape")
        return len(info.type.tensor_type.shape.dim) if shaped else 0

    def last_dim(self, name: str) -> int:
        """The size of the last axis of ``name``; 0 where the file does not state it."""
        if name in self._weights:
            return int(self._weights[name].dims[-1])
        info = self._info(name)
        dims = info.type.tensor_type.shape.dim if info is not None else []
        return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else 0

    def float_type(self, node: onnx.NodeProto) -> np.dtype:
        """The float type ``node`` computes in: that of its first weight (initializer) that is
        float, else of its first input whose stated type is; float32 when none is known."""
        floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
        for name in node.input:
            if name in self._weights and self._weights[name].data_type in floats:
                return helper.tensor_dtype_to_np_dtype(self._weights[name].data_type)
        for name in node.input:
            if name and name in self._infos and self._infos[name].type.tensor_type.elem_type in floats:
                return helper.tensor_dtype_to_np_dtype(self._infos[name].type.tensor_type.elem_type)
        return np.dtype(np.float32)


def _onnx_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _drop_unused_domains(model: onnx.ModelProto) -> None:
    """Drop the opset imports of domains no node uses any more (ONNX Runtime's optimiser lists
    nine; ``com.microsoft`` is gone now)."""
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
