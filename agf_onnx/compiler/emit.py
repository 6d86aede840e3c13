"""The compiler: canonicalise, walk back from the logits emitting the gradient and relevance
streams with the registered rules, and append the explanation graph to the original one.

    model.onnx ──canonicalise──▶ graph ──walk back from the logits──▶ gradient stream
                                                                 └──▶ relevance stream
    model_agf.onnx = original graph + explanation graph (inputs + ``target``, outputs + ``heatmap``)
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import contract, modelfile
from ..contract import CLASSES_OUTPUT, HEATMAP_OUTPUT, HEATMAPS_OUTPUT, TARGET_INPUT
from ..errors import CompileError, UnsupportedOpsError
from ..rules import lookup
from . import deployed, passes, ssl
from .builder import FOLD_LIMIT, GraphBuilder
from .graph import GraphView, NodeView, ai_onnx_opset
from .maps import RawMap, coarse_map, contrastive, input_map, layer_map
from .maths import as_scores, retained, safe_divide
from .methods import Kind, Method, get_method, with_options
from .modifiers import NONE as NO_MODIFIERS
from .modifiers import Modifiers
from .planning import Plan, head_chain, path_between, plan
from .replicate import Copies, average, noisy, repeated, replicate, tiled
from .spec import CompileSpec

__all__ = ["RawMap", "TARGET_INPUT", "check_compiled", "compile", "compile_canonical", "gradient_model"]


class _Streams:
    """Per-tensor contributions of the gradient and relevance streams, combined on first read."""

    def __init__(self, b: GraphBuilder, graph: GraphView) -> None:
        self.b, self.graph = b, graph
        self.gradients: dict[str, list[str]] = defaultdict(list)
        self.relevances: dict[str, list[str]] = defaultdict(list)

    def gradient(self, tensor: str) -> str | None:
        parts = self.gradients.get(tensor)
        if not parts:
            return None
        if len(parts) > 1:
            with self.b.scope(f"{tensor}/fanout"):
                self.gradients[tensor] = [self.b.Sum(*parts)]
        return self.gradients[tensor][0]

    def relevance(self, tensor: str) -> str | None:
        """Fan-out: ``ΦX = X ⊙ Σ_k sdiv(Φk, X)`` (impl), computed as ``X ⊙ sdiv(Σ_k Φk, X)`` (one
        division; ``retained`` for ``X ≥ 0``); one consumer passes its Φ as it is."""
        parts = self.relevances.get(tensor)
        if not parts:
            return None
        if len(parts) > 1:
            b = self.b
            with b.scope(f"{tensor}/fanout"):
                total = b.Sum(*parts)
                self.relevances[tensor] = [retained(b, total, tensor) if self.graph.nonnegative(tensor)
                                           else b.Mul(tensor, safe_divide(b, total, tensor))]
        return self.relevances[tensor][0]


def _walk(b: GraphBuilder, graph: GraphView, path: Sequence[onnx.NodeProto], data: set[str], streams: _Streams,
          kinds: Mapping[str, str], start: str | None = None, first_layers: set[str] = frozenset(),
          gradients: bool = True) -> None:
    """Visit ``path`` from the output back, applying each node's gradient rule (unless
    ``gradients`` is off: a second relevance stream of rules that need none) and, for nodes in
    ``kinds``, its relevance rule. Reverse topological order means every consumer of a tensor
    has contributed before the tensor's own producer reads its streams."""
    for proto in reversed(path):
        node = NodeView(proto, graph, frozenset(i for i in proto.input if i in data),
                        is_first_layer=proto.name in first_layers)
        entry = lookup(proto.op_type, proto.domain)
        if gradients:
            node.gradient = [streams.gradient(o) for o in proto.output]
            if all(g is None for g in node.gradient):
                continue  # no path from this node to the explained score
            with b.scope(f"{proto.name}/vjp"):
                node.input_gradients = entry.gradient(b, node)
            for name, contribution in _per_input(proto, node.input_gradients, "gradient"):
                if contribution is not None:
                    streams.gradients[name].append(contribution)
        kind = kinds.get(proto.name)
        if kind is None:
            continue
        node.relevance = [streams.relevance(o) for o in proto.output]
        if all(r is None for r in node.relevance) and start in proto.output:
            node.relevance = [_start_relevance(b, streams, o) if o == start else None for o in proto.output]
        if all(r is None for r in node.relevance):
            continue
        with b.scope(f"{proto.name}/rel"):
            contributions = entry.relevance[kind](b, node)
        for name, contribution in _per_input(proto, contributions, f"'{kind}' relevance"):
            if contribution is not None:
                streams.relevances[name].append(contribution)


def _per_input(proto: onnx.NodeProto, values: Sequence[str | None], rule: str) -> Iterable[tuple[str, str | None]]:
    """The node's inputs paired with a rule's results, one per input (a rule that returned one too
    few would otherwise drop a stream silently)."""
    if len(values) != len(proto.input):
        raise CompileError(f"internal error: the {rule} rule of {proto.op_type} node '{proto.name}' returned "
                           f"{len(values)} values for {len(proto.input)} inputs")
    return zip(proto.input, values, strict=True)


def _float_image(b: GraphBuilder, plan: Plan) -> str:
    """The image as float32 (integer images are cast, as the model itself does)."""
    return plan.image if plan.graph.dtypes.get(plan.image) == TensorProto.FLOAT else b.Cast(plan.image, to=1)


def _as_logits(b: GraphBuilder, scores: str, shape: tuple) -> str:
    """A ``[N, K]`` tensor back in the logits' own shape."""
    return scores if len(shape) == 2 else b.Reshape(scores, b.ints([0, *shape[1:]]))


def _target(b: GraphBuilder, scores: str) -> str:
    """The explained class per sample, ``[N, 1]``: ``target``, or the top class where negative."""
    target = b.Where(b.Less(TARGET_INPUT, b.const(0, np.int64)), b.ArgMax(scores, axis=1, keepdims=0), TARGET_INPUT)
    return b.Unsqueeze(target, b.ints([1]))


class TopKMaps(NamedTuple):
    """The top-K outputs as emitted: ``heatmaps`` ``[N, K, H, W]``, ``classes`` ``[N, K]``, K."""

    heatmaps: str
    classes: str
    count: int


def _emit_top_k(b: GraphBuilder, plan: Plan, method: Method, options: Mapping,
                top_k: int, scores: str | None = None, modifiers: Modifiers = NO_MODIFIERS) -> TopKMaps:
    """Heatmaps ``[N, K, H, W]`` of the K best classes and their indices ``[N, K]`` in one run: the
    path replicated on the image repeated K times, copy k explaining the k-th best class.
    ``scores`` (``[N, K]``, default: the logits) rank the classes (SSL: v)."""
    shape = plan.graph.shape(plan.logits)
    if not 1 <= top_k <= shape[1]:
        raise CompileError(f"--top-k {top_k}: must be between 1 and the number of classes ({shape[1]})")
    with b.scope("topk"):
        ranked = as_scores(b, plan.logits, shape) if scores is None else scores
        classes = b.TopK(ranked, b.ints([top_k]), axis=1, outputs=2)[1]  # [N, K]
        copies = Copies(repeated(b, plan.image, plan.graph.shape(plan.image), top_k), top_k,
                        b.Reshape(b.Transpose(classes, perm=[1, 0]), b.ints([-1, 1])), "topk",
                        plan.graph.dtypes.get(plan.image) or TensorProto.FLOAT)
    heatmap = _emit(b, replicate(b, plan, copies), method, options, target=copies.targets, modifiers=modifiers)
    size = plan.map_size
    with b.scope("topk"):
        heatmaps = b.Transpose(b.Reshape(heatmap, b.ints([top_k, -1, *size])), perm=[1, 0, *range(2, 2 + len(size))])
    return TopKMaps(heatmaps, classes, top_k)


def _raw_replicated(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None,
                    others: Method | None = None) -> RawMap | tuple[RawMap, RawMap]:
    """Kind.REPLICATED (Integrated Gradients, SmoothGrad): the path replicated on the method's copies
    of each image; their gradients combined per image. With ``others`` (contrast), a second gradient
    stream from its seed runs through the same copies, and the pair of maps is returned."""
    image, shape = _float_image(b, plan), plan.graph.shape(plan.image)
    with b.scope("replicas"):
        source, count = method.map.copies(b, image, shape, options)
    with b.scope("start"):
        target = _target(b, as_scores(b, plan.logits, plan.graph.shape(plan.logits))) if target is None else target
        copies = Copies(source, count, tiled(b, target, count), "replica")
    replicated = replicate(b, plan, copies)
    maps = []
    for seeded, scope in ((method, "target"), (others, "contrast")):
        if seeded is None:
            continue
        with b.scope(scope):
            streams = _gradient_streams(b, replicated, seeded, copies.targets)
            with b.scope("image_map"):
                combined = method.map.combine(b, image, shape, streams.gradient(source), count, options)
        maps.append(input_map(b, plan, combined))
    return maps[0] if others is None else (maps[0], maps[1])


def _gradient_streams(b: GraphBuilder, plan: Plan, method: Method, target: str | None,
                      path: Sequence[onnx.NodeProto] | None = None) -> _Streams:
    """The gradient stream of ``method.start`` at the logits, through ``path`` (default: the whole path)."""
    with b.scope("start"):
        streams, _, _ = _seeded(b, plan, method, target)
    _walk(b, plan.graph, plan.path if path is None else path, plan.data, streams, {})
    return streams


def _seeded(b: GraphBuilder, plan: Plan, method: Method, target: str | None) -> tuple[_Streams, str, str]:
    """Streams whose gradient at the logits is ``method.start``'s seed: (streams, scores ``[N, K]``, seed)."""
    streams = _Streams(b, plan.graph)
    shape = plan.graph.shape(plan.logits)
    scores = as_scores(b, plan.logits, shape)
    seed = method.start(b, scores, _target(b, scores) if target is None else target, shape[1])
    streams.gradients[plan.logits].append(_as_logits(b, seed, shape))
    return streams, scores, seed


def _raw_gradient(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None) -> RawMap:
    """Kind.GRADIENT: the map comes from ∇x at the image."""
    streams = _gradient_streams(b, plan, method, target)
    with b.scope("image_map"):
        return input_map(b, plan, method.map.function(b, _float_image(b, plan), streams.gradient(plan.image)))


def _raw_layer(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None) -> RawMap:
    """Kind.LAYER: only the nodes above the layer are needed."""
    above = {n.name for n in plan.graph.data_flow(plan.layer)[0]}
    streams = _gradient_streams(b, plan, method, target, [n for n in plan.path if n.name in above])
    with b.scope("layer_map"):
        return layer_map(b, plan, method.map.function, streams.gradient(plan.layer))


def _raw_path(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None) -> RawMap:
    """Kind.PATH (FullGrad): the gradient stream read at every layer."""
    streams = _gradient_streams(b, plan, method, target)
    with b.scope("path_map"):
        relevance = method.map.function(b, plan, streams.gradient, _float_image(b, plan))
    return input_map(b, plan, relevance, per_channel=False)  # the map is [N, 1, H, W] whatever the image's layout


def _raw_attention(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None) -> RawMap:
    """Kind.ATTENTION (Chefer et al.): the gradient stream read at the attention matrices."""
    streams = _gradient_streams(b, plan, method, target)
    with b.scope("attention_map"):
        coarse, size = method.map.function(b, plan, streams.gradient)
    return coarse_map(b, plan, coarse, size)


def _raw_relevance(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None) -> RawMap:
    """Kind.RELEVANCE: the relevance stream through the registered rules, started at the top linear
    layer's input (AGF, ``_start_relevance``) or at the logits (LRP: ``logit_relevance``)."""
    shape, at_logits = plan.graph.shape(plan.logits), method.map.logit_relevance
    with b.scope("start"):
        streams, scores, seed = _seeded(b, plan, method, target)
        if at_logits is not None:  # LRP: R = y ⊙ onehot(t) at the logits
            streams.relevances[plan.logits].append(_as_logits(b, at_logits(b, scores, seed), shape))
    # LRP's rules read no gradient: emitting the gradient stream would only cost run time
    _walk(b, plan.graph, plan.path, plan.data, streams, plan.kinds, plan.start, plan.first_layers,
          gradients=at_logits is None)
    relevance = streams.relevance(plan.image)
    if relevance is None and plan.start == plan.image:
        relevance = _start_relevance(b, streams, plan.image)
    if relevance is None:
        raise CompileError(f"no relevance reaches the image '{plan.image}'")
    return input_map(b, plan, relevance)


#: One emitter per method kind: (b, plan, method, options, target [N, 1] or None) → the map before its scaling.
_EMITTERS = {Kind.RELEVANCE: _raw_relevance, Kind.GRADIENT: _raw_gradient, Kind.LAYER: _raw_layer,
             Kind.REPLICATED: _raw_replicated, Kind.PATH: _raw_path, Kind.ATTENTION: _raw_attention}


def _contrasted(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None,
                contrast: str) -> RawMap:
    """``A_t − A_o · ΣA_t / ΣA_o``: the others' map from a second stream through the same forward pass."""
    others = method.seeded_by_others(contrast)
    if target is None:  # both streams explain the same class
        with b.scope("start"):
            target = _target(b, as_scores(b, plan.logits, plan.graph.shape(plan.logits)))
    if method.kind is Kind.REPLICATED:  # one replica of the path carries both gradient streams
        own, theirs = _raw_replicated(b, plan, method, options, target, others)
    else:
        own = _EMITTERS[method.kind](b, plan, method, options, target)
        with b.scope("contrast"):
            theirs = _EMITTERS[method.kind](b, plan, others, options, target)
    with b.scope("contrast"):
        return own._replace(tensor=contrastive(b, own.tensor, theirs.tensor, 1 + len(own.shape)))


def _modified(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None,
              modifiers: Modifiers) -> RawMap:
    """The method's map under ``modifiers`` (see ``modifiers.py``): the smoothing tunnel outside (the
    path replicated on noisy copies), the contrast inside."""
    if modifiers.smooth:
        count = modifiers.smooth
        with b.scope("smooth"):
            source = noisy(b, _float_image(b, plan), plan.graph.shape(plan.image), count, modifiers.noise,
                           modifiers.seed)
            if target is None:
                target = _target(b, as_scores(b, plan.logits, plan.graph.shape(plan.logits)))
            copies = Copies(source, count, tiled(b, target, count), "smooth")
        raw = _modified(b, replicate(b, plan, copies), method, options, copies.targets,
                        dataclasses.replace(modifiers, smooth=0))
        with b.scope("smooth"):
            return raw._replace(tensor=average(b, raw.tensor, count, raw.shape, modifiers.square))
    if modifiers.contrast:
        return _contrasted(b, plan, method, options, target, modifiers.contrast)
    return _EMITTERS[method.kind](b, plan, method, options, target)


def _emit(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None = None,
          modifiers: Modifiers = NO_MODIFIERS) -> str:
    """Emit the method's streams (under ``modifiers``) and the heatmap; returns the heatmap tensor's
    name. ``target`` (``[N, 1]``) replaces the ``target`` input (top-K, self-supervised targets)."""
    raw = _modified(b, plan, method, options, target, modifiers)
    with b.scope("heatmap"):
        return raw.finish(b, raw.tensor)


def gradient_model(model: onnx.ModelProto | str | os.PathLike, output: str | None = None,
                   source: str | None = None) -> onnx.ModelProto:
    """The model plus its emitted gradient graph: a new input ``gradient_in`` (shaped like
    ``output``) and a new output ``gradient_out`` = ∂⟨output, gradient_in⟩/∂``source``.

    This exercises exactly the gradient rules the compiler uses; the tests compare it with
    ``torch.autograd``. Defaults: the first input and the first output.
    """
    canonical = passes.canonicalise(modelfile.load(model))
    graph = GraphView(canonical)
    source, output = source or graph.inputs[0], output or graph.outputs[0]
    path, data = path_between(graph, source, output)
    missing = defaultdict(list)
    for node in path:
        if lookup(node.op_type, node.domain) is None:
            missing[node.op_type].append(node.name)
    if missing:
        raise UnsupportedOpsError(missing)
    b = GraphBuilder(reserved=_all_names(canonical.graph) | {"gradient_in", "gradient_out"},
                     constant=lambda name: graph.small_constant(name, FOLD_LIMIT), opset=ai_onnx_opset(canonical))
    streams = _Streams(b, graph)
    streams.gradients[output].append("gradient_in")
    _walk(b, graph, path, data, streams, kinds={})
    result = streams.gradient(source)
    if result is None:
        raise CompileError(f"'{output}' does not depend on '{source}'")
    canonical.graph.node.extend(b.nodes)
    canonical.graph.node.append(helper.make_node("Identity", [result], ["gradient_out"], name="agf/gradient_out"))
    canonical.graph.initializer.extend(b.initializers)
    out_info = next(o for o in canonical.graph.output if o.name == output)
    in_info = next(i for i in canonical.graph.input if i.name == source)
    canonical.graph.input.append(helper.make_value_info("gradient_in", out_info.type))
    canonical.graph.output.append(helper.make_value_info("gradient_out", in_info.type))
    del canonical.graph.value_info[:]
    onnx.checker.check_model(canonical, full_check=True)
    return canonical


def _start_relevance(b: GraphBuilder, streams: _Streams, start: str) -> str | None:
    """``ΦX = X ⊙ ∇X`` at the data input of the top linear layer (spec "Start")."""
    if start in streams.relevances:
        return streams.relevance(start)
    gradient = streams.gradient(start)
    if gradient is None:
        return None
    with b.scope("start"):
        streams.relevances[start] = [b.Mul(start, gradient)]
    return streams.relevances[start][0]


def _scores_output(plan: Plan) -> str:
    """The graph output that carries the class scores: the logits, or a Softmax of them."""
    return next((output for output in plan.graph.outputs
                 if any(tensor == plan.logits for tensor, _ in head_chain(plan.graph, output))), "")


def _assemble(model: onnx.ModelProto, b: GraphBuilder, plan: Plan, heatmap: str, spec: CompileSpec,
              top_k: TopKMaps | None = None) -> onnx.ModelProto:
    graph = model.graph
    for name in (TARGET_INPUT, HEATMAP_OUTPUT, *((HEATMAPS_OUTPUT, CLASSES_OUTPUT) if top_k else ())):
        if name in plan.graph.producer or name in plan.graph.shapes:
            raise CompileError(f"the model already has a tensor named '{name}'; the compiled model needs that name")
    graph.node.extend(b.nodes)
    graph.node.append(helper.make_node("Identity", [heatmap], [HEATMAP_OUTPUT], name="agf/heatmap/output"))
    graph.initializer.extend(b.initializers)
    # a real input with no initializer behind it: every runtime lists it and honours it (onnxruntime-web and
    # -node cannot see an input that an initializer of the same name backs; -node would ignore the feed)
    graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, ["T"]))
    graph.output.append(helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT,
                                                      [passes.BATCH_DIM, *plan.heatmap_shape]))
    if top_k:
        heatmaps, classes, count = top_k.heatmaps, top_k.classes, top_k.count
        graph.node.append(helper.make_node("Identity", [heatmaps], [HEATMAPS_OUTPUT], name="agf/topk/heatmaps"))
        graph.node.append(helper.make_node("Identity", [classes], [CLASSES_OUTPUT], name="agf/topk/classes"))
        graph.output.append(helper.make_tensor_value_info(HEATMAPS_OUTPUT, TensorProto.FLOAT,
                                                          [passes.BATCH_DIM, count, *plan.map_size]))
        graph.output.append(helper.make_tensor_value_info(CLASSES_OUTPUT, TensorProto.INT64, [passes.BATCH_DIM, count]))
    try:
        model, _ = passes.infer_shapes(model)
    except CompileError as error:
        raise CompileError(f"internal error: the compiled model's {error}") from error
    # what `agf-onnx explain` and other tools need to know about the compiled model
    contract.record(model, {contract.METHOD: spec.method, contract.MODIFIERS: spec.modifiers.metadata(),
                            contract.SPEC: spec.record(),
                            contract.IMAGE: plan.image, contract.LAYOUT: "NHWC" if plan.channels_last else "NCHW",
                            contract.LOGITS: plan.logits, contract.SCORES: _scores_output(plan),
                            **(_token_metadata(plan) if plan.tokens is not None else {})})
    model.doc_string = (model.doc_string + "\n" if model.doc_string else "") + \
        "agf-onnx: feed 'target' (int64 [N] or [1]; -1 = the top class) and read 'heatmap' " + \
        ("[N, T] (per token, 0 at padding)." if plan.tokens is not None else "[N, 1, H, W].")
    return model


def _token_metadata(plan: Plan) -> dict[str, str]:
    """What ``agf-onnx explain`` needs to feed a compiled text model: the roles of its inputs, and
    the rows of its embedding table (a tokenizer with more tokens is not the model's)."""
    tokens = plan.tokens
    return {contract.IMAGE: tokens.ids, contract.VOCABULARY: str(plan.graph.shape(tokens.table)[0]),
            contract.INPUT_KIND: "tokens", contract.TOKEN_IDS: tokens.ids, contract.ATTENTION_MASK: tokens.mask or "",
            contract.TOKEN_INPUTS: ",".join(tokens.others), contract.EMBEDDING: tokens.embedding}


def compile(model: onnx.ModelProto | str | os.PathLike, spec: CompileSpec | None = None, /,
            **fields) -> onnx.ModelProto:
    """Compile an ONNX classifier into a model that also outputs the explanation ``heatmap``.

    Args:
        model: a ``ModelProto`` or the path of an ``.onnx`` file (external data is read beside it).
        spec: what to compile (``CompileSpec``: the method, its options, the modifiers, top-K, …);
            or, instead, its fields as keywords: ``compile(model, method="lrp", top_k=3)``.
            It is validated before the model is read, and recorded in the metadata ``agf_onnx.spec``.

    Raises:
        UnsupportedOpsError: ops without a rule on the path from the image to the logits.
        CompileError: anything else that makes the model impossible to explain, with the reason.
    """
    spec = CompileSpec.of(spec, fields)
    loaded = modelfile.load(model)
    if deployed.needs_view(loaded):  # fp16, int8, fused ops: explained through a float32 view (deployed.py)
        return deployed.compile_deployed(loaded, spec, compile_canonical)
    return compile_canonical(passes.canonicalise(loaded, spec.input_shapes), spec)


def compile_canonical(canonical: onnx.ModelProto, spec: CompileSpec, reserved: Iterable[str] = ()) -> onnx.ModelProto:
    """``compile`` of a model that ``passes.canonicalise`` already made canonical (it is extended in
    place; ``spec.input_shapes`` were applied then). ``inspect`` plans and compiles the same
    canonical model. ``reserved``: names the emitted graph must not take besides the model's own (a
    deployed form's original graph, ``deployed.py``)."""
    chosen = with_options(get_method(spec.method), spec.options)  # RAP's residual rule
    modifiers = chosen.under(spec.modifiers)  # a preset's contrast (CLRP, SGLRP) with the chosen ones
    found = plan(canonical, image=spec.image, logits=spec.logits, method=chosen, flat_policy=spec.flat_policy,
                 flat=spec.flat, full=spec.full, layer=spec.layer)
    b = GraphBuilder(reserved=_all_names(canonical.graph) | set(reserved),
                     constant=lambda name: found.graph.small_constant(name, FOLD_LIMIT), opset=ai_onnx_opset(canonical))
    self_supervised = ssl.emit(b, found, spec.ssl_bank, spec.features, spec.ssl_mode or "diff") \
        if spec.ssl_bank is not None else None
    explained = self_supervised.explained if self_supervised else None
    heatmap = _emit(b, found, chosen, dict(spec.options), target=explained, modifiers=modifiers)
    extra = _emit_top_k(b, found, chosen, dict(spec.options), int(spec.top_k),
                        self_supervised.scores if self_supervised else None, modifiers) if spec.top_k else None
    compiled = _assemble(canonical, b, found, heatmap, spec, extra)
    if self_supervised is not None:
        compiled = ssl.attach(compiled, self_supervised)
    _prune(compiled.graph, {node.name for node in b.nodes})
    if spec.check:
        check_compiled(compiled)
    return compiled


def check_compiled(compiled: onnx.ModelProto) -> None:
    """``onnx.checker``'s full check of a compiled model; a failure is a compiler bug, never the user's."""
    try:
        onnx.checker.check_model(passes.weightless(compiled), full_check=True)
    except Exception as error:  # say so plainly
        raise CompileError(f"internal error: the compiled model fails the ONNX checker: {error}") from error


def _prune(graph: onnx.GraphProto, emitted: set[str]) -> None:
    """Remove the emitted nodes (by name) that no output needs (the gradient stream below the last
    layer whose rule reads it, a stream a method starts but never reads: ONNX Runtime would run
    them), then the initializers nothing reads (also those opset conversion left: ONNX Runtime
    warns about each)."""
    needed = {output.name for output in graph.output}
    dead = set()
    for node in reversed(graph.node):
        if node.name in emitted and not needed.intersection(node.output):
            dead.add(node.name)
        else:
            needed.update(node.input)
    kept = [node for node in graph.node if node.name not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    passes.keep_initializers(graph, read)  # in place: ``remove`` searched the list for each


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names
