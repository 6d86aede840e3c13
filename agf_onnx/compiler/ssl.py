"""Self-supervised explanations (the paper's Algorithm 2), inside the compiled graph.

For a model ``M = head ∘ features`` trained without labels and a bank ``B`` (``[R, D]``) of the
feature vectors ``features(J)`` of reference images (``agf-onnx bank``):

    L_I = features(I)                          flattened per image, [N, D]
    n   = argmin_{r ∉ S} ‖L_I − B_r‖₂          the nearest bank row that is not the image itself
                                               (first one on ties), ``ssl_neighbour``
    S   = {r : ‖L_I − B_r‖² ≤ 1e-5 (‖L_I‖² + ‖B_r‖²)}   the rows at distance 0: the image itself
    L_N = B_n                                  (0, and n = −1, where every row is in S)
    v   = head(L_I − L_N)                      diff: Algorithm 2
        | head(L_I + L_N)                      sum:  the paper's Σ ablation (Table 4)
        | head(L_I)                            none: no neighbour (v is the model's own logits)
    t   = argmax v                             (first class on ties), ``ssl_target``

and the chosen method explains class ``t`` of ``M``; a non-negative ``target`` input overrides it,
and ``top_k`` explains the K best classes of ``v``. The distances are ``‖B_r‖² − 2 L_I·B_r`` (one
Gemm: a MatMul against the bank transposed in place, so the bank is stored once), which is
``‖L_I − B_r‖² − ‖L_I‖²``: the per-image constant ``‖L_I‖²`` does not move the argmin, and leaving it
out of the ranking spares the rounding that adding it would bring; it is added only to tell the
image itself (distance 0) from the other rows. The paper's neighbour is another image: an image in
its own bank would otherwise find itself (L_I − L_N = 0, v = head(0), the same class t for every
such image). ``head`` is the model's own subgraph from the
features tensor to the logits, cloned to read the shifted features: the weights are shared, so the
compiled file grows by the bank (one float32 initializer) and a few small nodes. With ``none`` the
bank is not stored and ``ssl_neighbour`` is −1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import contract, modelfile
from ..bankfile import BankLike, load_bank
from ..contract import SSL_BANK_ROWS, SSL_FEATURES, SSL_MODE, SSL_NEIGHBOUR_OUTPUT, SSL_TARGET_OUTPUT, TARGET_INPUT
from ..errors import CompileError
from . import passes
from .builder import GraphBuilder
from .graph import GraphView
from .maths import as_scores
from .planning import Plan, find_image, find_logits, path_between, top_linear

MODES = ("diff", "sum", "none")


@dataclass
class SSLGraph:
    """The tensors the SSL part of a compiled graph makes."""

    mode: str
    features: str
    rows: int
    explained: str  # [N, 1] int64: t, or the ``target`` input where it is non-negative
    scores: str  # [N, K] v, whose K best classes top-K explains
    target: str  # [N] int64 t
    neighbour: str  # [N] int64 the bank row, −1 for ``none``


def _dims(graph: GraphView, name: str) -> list[int | str | None]:
    """The raw inferred dims of ``name``: ints, symbols (the batch is ``N``), None where unknown."""
    model = graph.model.graph
    info = next((i for i in [*model.value_info, *model.output, *model.input] if i.name == name), None)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in info.type.tensor_type.shape.dim]


def resolve_features(graph: GraphView, image: str, logits: str, data: set[str], features: str | None,
                     argument: str = "--features") -> tuple[str, list[onnx.NodeProto], list[int]]:
    """The features tensor (default: the data input of the op that makes the logits), the head
    nodes from it to the logits in topological order, and its shape ``[N, ...]``."""
    if features is None:
        features = top_linear(graph, logits, data).input[0]
    elif features not in graph.producer and features not in graph.inputs:
        raise CompileError(f"{argument} '{features}': the model has no such tensor (names are those of the model "
                           "after canonicalisation; `agf-onnx inspect` lists the nodes)")
    if features not in data or not graph.depends_on(logits, features):
        raise CompileError(f"{argument} '{features}' is not on the path from the image '{image}' to the logits "
                           f"'{logits}'")
    flow, head_data = graph.data_flow(features)
    above = graph.ancestors([logits])
    head = [node for node in flow if node.name in above]
    if logits not in head_data:
        raise CompileError(f"{argument} '{features}': the logits '{logits}' are not computed from it differentiably")
    for node in head:  # the head must see the image only through the features tensor
        stray = [i for i in node.input if i in data and i not in head_data]
        if stray:
            raise CompileError(f"{argument} '{features}': the head from it to the logits also reads '{stray[0]}' "
                               f"({node.op_type} '{node.name}'), which does not come from '{features}'; pick a "
                               "tensor every path from the image to the logits passes through")
    dims = _dims(graph, features)
    if len(dims) < 2 or dims[0] != passes.BATCH_DIM or not all(isinstance(d, int) for d in dims[1:]):
        raise CompileError(f"{argument} '{features}' has shape {['?' if d is None else d for d in dims]}: the features "
                           f"need the batch axis '{passes.BATCH_DIM}' first and static sizes after it, one row "
                           "per image")
    return features, head, dims


def _clone_head(b: GraphBuilder, head: Sequence[onnx.NodeProto], features: str, source: str) -> dict[str, str]:
    """Emit a copy of the head that reads ``source`` instead of ``features`` (weights shared);
    returns the renaming of the tensors it makes."""
    renamed = {features: source}
    for node in head:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = b.fresh(f"head/{node.name}")
        clone.input[:] = [renamed.get(i, i) for i in node.input]
        for output in node.output:
            if output:
                renamed[output] = b.fresh(f"head/{output}")
        clone.output[:] = [renamed.get(o, o) for o in node.output]
        b.nodes.append(clone)
    return renamed


#: A bank row counts as the image itself when ‖L_I − B_r‖² ≤ SELF_MATCH · (‖L_I‖² + ‖B_r‖²). The
#: distance is formed as ‖B_r‖² − 2 L_I·B_r + ‖L_I‖² in float32, whose cancellation leaves about
#: 1e-7 × the norms of a true 0 (and the same image run in another batch differs by rounding):
#: 1e-5 stays 100× above that, while two different images' features are much farther apart.
SELF_MATCH = 1e-5
#: The distance given to excluded rows: no true distance reaches it.
_EXCLUDED = float(np.finfo(np.float32).max)


def _nearest_other(b: GraphBuilder, own: str, bank: np.ndarray) -> tuple[str, str]:
    """The nearest bank row to each ``own`` row [N, D] that is not the image itself, and that row
    (L_N). The paper's neighbour is another image: an image found in the bank would be its own
    neighbour (L_I − L_N = 0, v = the head's bias, one class for every such image), so rows at
    distance 0 (``SELF_MATCH``) are excluded. Where every row is the image itself the neighbour
    is −1 and L_N = 0 (v = head(L_I), as ``none``)."""
    squared_norms = (bank.astype(np.float64) ** 2).sum(1).astype(np.float32)
    # ‖B_r‖² − 2 L_I·B_r: ‖L_I − B_r‖² − ‖L_I‖², one Gemm against the bank stored once
    rows, norms = b.const(bank), b.const(squared_norms)  # stored once, read twice
    shifted_distances = b.Gemm(own, rows, norms, alpha=-2.0, beta=1.0, transB=1)
    own_norms = b.ReduceSumSquare(own, axes=[1], keepdims=1)  # [N, 1]
    distances = b.Add(shifted_distances, own_norms)
    tolerance = b.Mul(b.Add(own_norms, norms), b.const(SELF_MATCH))
    itself = b.LessOrEqual(distances, tolerance)
    candidates = b.Where(itself, b.const(_EXCLUDED), shifted_distances)
    closest = b.ArgMin(candidates, axis=1, keepdims=0, select_last_index=0)
    found = b.Less(b.ReduceMin(candidates, axes=[1], keepdims=0), b.const(_EXCLUDED))  # [N] bool
    neighbour = b.Where(found, closest, b.const(-1, np.int64))
    nearest = b.Mul(b.Gather(rows, closest, axis=0),
                    b.Cast(b.Unsqueeze(found, b.ints([1])), to=TensorProto.FLOAT))  # L_N [N, D], 0 when none
    return neighbour, nearest


def emit(b: GraphBuilder, plan: Plan, bank: BankLike, features: str | None = None, mode: str = "diff") -> SSLGraph:
    """Emit L_I, the nearest bank row, v and t (module docstring) for the model in ``plan``."""
    if mode not in MODES:
        raise CompileError(f"--ssl-mode {mode}: expected one of {', '.join(MODES)}")
    bank = load_bank(bank)
    graph = plan.graph
    features, head, dims = resolve_features(graph, plan.image, plan.logits, plan.data, features)
    width = int(np.prod(dims[1:]))
    if bank.shape[1] != width:
        raise CompileError(f"--ssl-bank: the bank's rows have {bank.shape[1]} values but the features tensor "
                           f"'{features}' has {width} per image (shape {dims}); build the bank with "
                           f"`agf-onnx bank MODEL IMAGES --features {features}`")
    logits_shape = graph.shape(plan.logits)
    with b.scope("ssl"):
        if mode == "none":  # v = head(L_I) is the model's own logits
            scores = as_scores(b, plan.logits, logits_shape)
            target = b.ArgMax(scores, axis=1, keepdims=0)
            neighbour = b.ConstantOfShape(b.Shape(target), value=helper.make_tensor("value", TensorProto.INT64,
                                                                                    [1], [-1]))
        else:
            own = b.Reshape(features, b.ints([0, width]))  # L_I [N, D]
            neighbour, nearest = _nearest_other(b, own, bank)
            shifted = b.Sub(own, nearest) if mode == "diff" else b.Add(own, nearest)
            renamed = _clone_head(b, head, features, b.Reshape(shifted, b.ints([0, *dims[1:]])))
            scores = as_scores(b, renamed[plan.logits], logits_shape)
            target = b.ArgMax(scores, axis=1, keepdims=0)
        explained = b.Where(b.Less(TARGET_INPUT, b.const(0, np.int64)), target, TARGET_INPUT)
        explained = b.Unsqueeze(explained, b.ints([1]))
    return SSLGraph(mode, features, len(bank), explained, scores, target, neighbour)


def attach(model: onnx.ModelProto, ssl: SSLGraph) -> onnx.ModelProto:
    """Add the outputs ``ssl_target`` and ``ssl_neighbour`` (int64 ``[N]``) and the SSL metadata."""
    taken = {o.name for o in model.graph.output} | {o for n in model.graph.node for o in n.output} | \
        {i.name for i in model.graph.input}
    for name, tensor in ((SSL_TARGET_OUTPUT, ssl.target), (SSL_NEIGHBOUR_OUTPUT, ssl.neighbour)):
        if name in taken:
            raise CompileError(f"the model already has a tensor named '{name}'; the compiled SSL model needs that name")
        model.graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"agf/ssl/{name}"))
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, [passes.BATCH_DIM]))
    contract.record(model, {SSL_MODE: ssl.mode, SSL_FEATURES: ssl.features, SSL_BANK_ROWS: str(ssl.rows)})
    shift = {"diff": " − L_N", "sum": " + L_N", "none": ""}[ssl.mode]
    model.doc_string += (f"\nagf-onnx SSL ({ssl.mode}): 'ssl_target' int64 [N] is t = argmax head(L_I{shift}), the "
                         "class explained where 'target' is negative; 'ssl_neighbour' int64 [N] is the nearest bank "
                         "row (−1 for none).")
    return model


# -- the bank ---------------------------------------------------------------------------------

def features_model(model: onnx.ModelProto | str | os.PathLike, features: str | None = None, *,
                   input_shapes: Mapping[str, Sequence[int | str]] | None = None, image: str | None = None,
                   logits: str | None = None) -> tuple[onnx.ModelProto, str]:
    """The canonicalised model (the graph ``compile`` sees) with the features tensor as an extra
    output; returns it and the tensor's name."""
    canonical = passes.canonicalise(modelfile.load(model), input_shapes)
    graph = GraphView(canonical)
    image, logits = find_image(graph, image), find_logits(graph, logits)
    _, data = path_between(graph, image, logits)
    features, _, _ = resolve_features(graph, image, logits, data, features)
    if features not in {o.name for o in canonical.graph.output}:
        info = next(i for i in canonical.graph.value_info if i.name == features)
        canonical.graph.output.append(info)
    contract.record(canonical, {contract.IMAGE: image})
    return canonical, features
