"""The compiler: canonicalise, walk back from the logits emitting the gradient and relevance
streams with the registered rules, and append the explanation graph to the original one.

    model.onnx ──canonicalise──▶ graph ──walk back from the logits──▶ gradient stream
                                                                 └──▶ relevance stream
    model_agf.onnx = original graph + explanation graph (inputs + ``target``, outputs + ``heatmap``)
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import passes
from .builder import GraphBuilder
from .errors import CompileError, UnsupportedOpsError
from .graph import GraphView, NodeView
from .maths import max_per_sample, resize, safe_divide, sum_per_sample
from .methods import Method, flat_layers, get_method, is_token_linear
from .rules import REGISTRY
from .tokens import TokenGrid, as_grid, patch_grid

TARGET_INPUT = "target"
HEATMAP_OUTPUT = "heatmap"
HEATMAPS_OUTPUT, CLASSES_OUTPUT = "heatmaps", "classes"  # with top_k
#: Ops after the logits that the explanation starts below (spec "Start").
HEAD_OPS = ("Softmax", "LogSoftmax")
_INTEGER_IMAGES = (TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16)
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
#: Linear ops that may start the relevance stream (spec "the top linear layer").
LINEAR_OPS = ("Gemm", "MatMul", "Conv")
#: Preprocessing: ops that relabel the image's layout or scale and shift it by constants. The
#: linear layer behind them still reads the image (z^B rule), and a Transpose behind them still
#: tells a channels-last image.
_PREPROCESSING_OPS = ("Transpose", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Add", "Sub",
                      "Mul", "Div", "BatchNormalization")


@dataclass
class Plan:
    """What the compiler found in the model before emitting anything."""

    graph: GraphView
    image: str
    logits: str
    start: str  # the data input X of the top linear layer, where relevance starts
    path: list[onnx.NodeProto]  # nodes from the image to the logits, in topological order
    data: set[str]  # tensors that depend on the image
    kinds: dict[str, str]  # node name → relevance rule kind (nodes below the start)
    first_layers: set[str]
    channels_last: bool
    unsupported: dict[str, list[str]]  # op type → node names (empty unless planned with strict=False)
    layer: str | None = None  # the explained layer's output tensor, for layer methods (Grad-CAM)
    layer_grid: TokenGrid | None = None  # where the layer's patch tokens lie, when it is a token tensor

    @property
    def image_size(self) -> tuple[int, int]:
        """The image's height and width, whatever its layout."""
        shape = self.graph.shape(self.image)
        return (shape[1], shape[2]) if self.channels_last else (shape[2], shape[3])


def _find_image(graph: GraphView, image: str | None) -> str:
    candidates = [name for name in graph.inputs if len(graph.shapes.get(name, ())) == 4]
    if image is not None:
        if image not in graph.inputs:
            raise CompileError(f"--image: the model has no input '{image}' (inputs: {', '.join(graph.inputs)})")
        return image
    if len(candidates) != 1:
        raise CompileError("cannot tell which input is the image: " +
                           (f"several 4-D inputs ({', '.join(candidates)}); pass --image NAME" if candidates
                            else f"no 4-D input among {', '.join(graph.inputs) or 'none'}; pass --image NAME"))
    return candidates[0]


def _find_logits(graph: GraphView, logits: str | None) -> str:
    if logits is not None:
        if logits not in graph.producer and logits not in graph.inputs:
            raise CompileError(f"--logits: the model has no tensor '{logits}'")
    else:
        candidates = [name for name in graph.outputs if _is_score_shape(graph.shapes.get(name, ()))
                      and graph.dtypes.get(name) == TensorProto.FLOAT]
        if len(candidates) != 1:
            raise CompileError("cannot tell which output holds the class scores: "
                               + (f"several [N, classes] float outputs ({', '.join(candidates)})" if candidates
                                  else f"no [N, classes] float output among {', '.join(graph.outputs)}")
                               + "; pass --logits NAME")
        logits = candidates[0]
    # spec: the logits precede a trailing Softmax, also one wrapped in reshapes (opset conversion
    # writes an opset-9 Softmax over [N, K, 1, 1] as Reshape → Softmax → Reshape)
    for tensor, reader in _head_chain(graph, logits):
        if reader in HEAD_OPS:
            logits = tensor
    return logits


def _head_chain(graph: GraphView, tensor: str) -> list[tuple[str, str | None]]:
    """``tensor`` and the tensors below it through Softmax/LogSoftmax and reshapes, each with the op
    type that reads it on the way up (``None`` for ``tensor`` itself)."""
    chain, reader = [(tensor, None)], graph.producer.get(tensor)
    while reader is not None and reader.op_type in (*HEAD_OPS, *_RESHAPES):
        chain.append((reader.input[0], reader.op_type))
        reader = graph.producer.get(reader.input[0])
    return chain


def _is_score_shape(shape: tuple) -> bool:
    """``[N, K]``, or ``[N, K, 1, 1]`` as convolutional heads (SqueezeNet, DenseNet) leave it."""
    return len(shape) >= 2 and all(d == 1 for d in shape[2:])


def _top_linear(graph: GraphView, logits: str, data: set[str]) -> onnx.NodeProto:
    """The last linear op before the logits (its data input X is where AGF's relevance starts)."""
    tensor = logits
    while tensor in graph.producer:
        node = graph.producer[tensor]
        inputs = [i for i in node.input if i in data]
        if node.op_type in LINEAR_OPS and inputs and node.input[0] in data and graph.is_constant(node.input[1]):
            return node
        if not inputs:
            break
        tensor = inputs[0]
    raise CompileError(f"no Gemm, MatMul or Conv between the image and the logits '{logits}'")


def _path(graph: GraphView, source: str, target: str) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes that compute ``target`` differentiably from ``source``, in topological order,
    and the tensors that depend on ``source``."""
    flow, data = graph.data_flow(source)
    above = graph.ancestors([target])
    return [node for node in flow if node.name in above], data


def _preprocessing_input(graph: GraphView, node: onnx.NodeProto) -> str | None:
    """The one non-constant input of a preprocessing op, else None."""
    if node.op_type not in _PREPROCESSING_OPS:
        return None
    inputs = [i for i in node.input if i and not graph.is_constant(i)]
    return inputs[0] if len(inputs) == 1 else None


def _reads_image(graph: GraphView, tensor: str, image: str) -> bool:
    while tensor != image:
        producer = graph.producer.get(tensor)
        tensor = _preprocessing_input(graph, producer) if producer is not None else None
        if tensor is None:
            return False
    return True


def _channels_last(graph: GraphView, image: str) -> bool:
    """Whether the image reaches the network through a Transpose NHWC → NCHW."""
    tensor = image
    while len(graph.consumers.get(tensor, [])) == 1:
        reader = graph.consumers[tensor][0]
        if reader.op_type == "Transpose":
            perm = [helper.get_attribute_value(a) for a in reader.attribute if a.name == "perm"]
            return perm == [[0, 3, 1, 2]]
        if _preprocessing_input(graph, reader) != tensor:
            return False
        tensor = reader.output[0]
    return False


def plan(model: onnx.ModelProto, *, image: str | None = None, logits: str | None = None,
         method: Method, flat_policy: str = "authors", flat: Iterable[str] = (),
         full: Iterable[str] = (), strict: bool = True, layer: str | None = None) -> Plan:
    """Locate image, logits and the explained path; choose a rule for every node on it.

    ``strict=False`` records unsupported ops in the plan instead of raising (``inspect``)."""
    graph = GraphView(model)
    image = _find_image(graph, image)
    logits = _find_logits(graph, logits)
    path, data = _path(graph, image, logits)
    if not path:
        raise CompileError(f"the logits '{logits}' do not depend on the image '{image}'")
    top = _top_linear(graph, logits, data) if method.logit_relevance is None or method.top_layer else None
    start = logits if method.logit_relevance is not None else top.input[0]
    relevant = graph.ancestors([start]) & {node.name for node in path} if method.relevance_stream else set()
    first_layers = {n.name for n in path if n.op_type in LINEAR_OPS and _reads_image(graph, n.input[0], image)}
    layers = [n for n in path if n.name in relevant and (n.op_type == "Conv" or is_token_linear(graph, n))]
    flats = flat_layers(graph, layers, data, flat_policy, flat, full)
    kinds: dict[str, str] = {}
    unsupported: dict[str, list[str]] = defaultdict(list)
    for node in path:
        entry = REGISTRY.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        kind = None
        if entry is not None and node.name in relevant:
            kind = method.kind_for(node.op_type, entry.relevance, first_layer=node.name in first_layers,
                                   flat=node.name in flats, top_layer=top is not None and node.name == top.name)
            if method.top_layer and top is not None and node.name == top.name and kind != method.top_layer:
                raise CompileError(f"--method {method.name} starts at a Gemm or MatMul that computes the logits; "
                                   f"the last linear layer here is {node.op_type} '{node.name}'")
        if entry is None or entry.gradient is None or (node.name in relevant and kind is None):
            unsupported[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"].append(node.name)
        elif kind is not None:
            kinds[node.name] = kind
    if unsupported and strict:
        raise UnsupportedOpsError(unsupported)
    if strict:
        _check_static(graph, image, [image, logits, *(o for n in path for o in n.output if o)])
    dtype = graph.dtypes.get(image)
    if dtype != TensorProto.FLOAT and not (dtype in _INTEGER_IMAGES and any(n.op_type == "Cast" for n in path)):
        raise CompileError(f"the image input '{image}' is {TensorProto.DataType.Name(dtype)}: float32 images, "
                           "or integer images the model casts to float32, are supported")
    if layer is not None and method.layer_map is None:
        raise CompileError(f"--layer: the method '{method.name}' explains at the image, not at a layer")
    found = Plan(graph, image, logits, start, path, data, kinds, first_layers, _channels_last(graph, image),
                 dict(unsupported))
    if method.layer_map is not None:
        found.layer, found.layer_grid = _find_layer(found, layer)
    return found


def _check_static(graph: GraphView, image: str, tensors: Iterable[str]) -> None:
    """Every dim of every explained tensor is known, except the one that carries the batch."""
    image_dims = graph.shape(image)
    if any(d is None for d in image_dims[1:]):
        raise CompileError(f"the image input '{image}' has shape {list(image_dims)}: every axis but the batch must "
                           f"be static; pass --input-shape {image}=d0,d1,...")
    for name in tensors:
        shape, batch = graph.shape(name), graph.batch(name)
        if not shape or any(d is None and (batch is None or axis != batch[0]) for axis, d in enumerate(shape)):
            producer = graph.producer.get(name)
            where = f" (output of {producer.op_type} node '{producer.name}')" if producer is not None else ""
            raise CompileError(f"tensor '{name}'{where} has shape {list(shape)}: shape inference could not tell "
                               "its size, and every axis but the batch must be static")


def _find_layer(plan: Plan, layer: str | None) -> tuple[str, TokenGrid | None]:
    """The output of ``layer`` (a node name) and, for a token tensor ``[N, T, C]``, the grid of its
    patch tokens. Default: the last Conv with a spatial output or the last transformer block's
    output (a residual Add of token tensors whose tokens lie on a grid), whichever comes later."""
    graph, path = plan.graph, plan.path
    first = [n for n in path if n.name in plan.first_layers]

    def grid_of(node: onnx.NodeProto) -> TokenGrid | None:
        shape = graph.shape(node.output[0])
        if len(shape) != 3 or graph.batch(node.output[0]) != (0, 1):
            return None
        return patch_grid(graph, first, plan.image_size, shape[1])

    def spatial(node: onnx.NodeProto) -> bool:
        shape = graph.shape(node.output[0])
        return len(shape) == 4 and any(d > 1 for d in shape[2:])

    candidates = [n for n in path if (n.op_type == "Conv" and spatial(n)) or
                  (n.op_type == "Add" and sum(i in plan.data for i in n.input) == 2 and grid_of(n) is not None)]
    if layer is None:
        if not candidates:
            raise CompileError("no Conv with a spatial output nor a transformer block's output on the path from the "
                               "image to the logits; pass --layer NODE")
        chosen = candidates[-1]
    else:
        chosen = next((n for n in path if n.name == layer), None)
        if chosen is None or not (len(graph.shape(chosen.output[0])) == 4 or grid_of(chosen) is not None):
            raise CompileError(f"--layer: no node '{layer}' with a 4-D output or a [N, tokens, channels] output whose "
                               f"tokens lie on the patch grid on the explained path (for example: "
                               f"{', '.join(n.name for n in candidates[-5:]) or 'none'})")
    return chosen.output[0], (grid_of(chosen) if chosen.op_type != "Conv" else None)


class _Streams:
    """Per-tensor contributions of the gradient and relevance streams, combined on first read."""

    def __init__(self, b: GraphBuilder) -> None:
        self.b = b
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
        """Fan-out: ``ΦX = X ⊙ Σ_k sdiv(Φk, X)`` (impl); one consumer passes its Φ as it is."""
        parts = self.relevances.get(tensor)
        if not parts:
            return None
        if len(parts) > 1:
            b = self.b
            with b.scope(f"{tensor}/fanout"):
                self.relevances[tensor] = [b.Mul(tensor, b.Sum(*(safe_divide(b, part, tensor) for part in parts)))]
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
        entry = REGISTRY[proto.op_type]
        if gradients:
            node.gradient = [streams.gradient(o) for o in proto.output]
            if all(g is None for g in node.gradient):
                continue  # no path from this node to the explained score
            with b.scope(f"{proto.name}/vjp"):
                node.input_gradients = entry.gradient(b, node)
            for name, contribution in zip(proto.input, node.input_gradients):
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
        for name, contribution in zip(proto.input, contributions):
            if contribution is not None:
                streams.relevances[name].append(contribution)


def _float_image(b: GraphBuilder, plan: Plan) -> str:
    """The image as float32 (integer images are cast, as the model itself does)."""
    return plan.image if plan.graph.dtypes.get(plan.image) == TensorProto.FLOAT else b.Cast(plan.image, to=1)


def _as_scores(b: GraphBuilder, logits: str, shape: tuple) -> str:
    """Logits as ``[N, K]`` (convolutional heads leave ``[N, K, 1, 1]``)."""
    return logits if len(shape) == 2 else b.Reshape(logits, b.ints([0, -1]))


def _as_logits(b: GraphBuilder, scores: str, shape: tuple) -> str:
    """A ``[N, K]`` tensor back in the logits' own shape."""
    return scores if len(shape) == 2 else b.Reshape(scores, b.ints([0, *shape[1:]]))


def _target(b: GraphBuilder, scores: str) -> str:
    """The explained class per sample, ``[N, 1]``: ``target``, or the top class where negative."""
    target = b.Where(b.Less(TARGET_INPUT, b.const(0, np.int64)), b.ArgMax(scores, axis=1, keepdims=0), TARGET_INPUT)
    return b.Unsqueeze(target, b.ints([1]))


def _clone_path(b: GraphBuilder, plan: Plan, source: str, suffix: str) -> tuple[GraphView, list, dict[str, str]]:
    """Emit a copy of the path from the image to the logits that reads ``source`` (a batch built
    from the image) instead of the image; returns a view of the graph with it, the cloned nodes
    and the renaming of data tensors."""
    renamed = {tensor: f"{tensor}/{suffix}" for tensor in plan.data}
    renamed[plan.image] = source
    clones = []
    for node in plan.path:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = f"{node.name}/{suffix}"
        clone.input[:] = [renamed.get(i, i) for i in node.input]
        clone.output[:] = [renamed.get(o, o) for o in node.output]
        clones.append(clone)
    b.nodes.extend(clones)
    augmented = onnx.ModelProto()
    augmented.CopyFrom(plan.graph.model)
    augmented.graph.node.extend(b.nodes)
    augmented.graph.initializer.extend(b.initializers)
    return GraphView(passes.infer_shapes(augmented)[0]), clones, renamed


def _emit_top_k(b: GraphBuilder, plan: Plan, method: Method, options: Mapping,
                top_k: int) -> tuple[str, str, int]:
    """Heatmaps ``[N, K, H, W]`` of the K best classes and their indices ``[N, K]`` in one run:
    the path is cloned on the image repeated K times, each copy explaining one of the classes."""
    shape = plan.graph.shape(plan.logits)
    if not 1 <= top_k <= shape[1]:
        raise CompileError(f"--top-k {top_k}: must be between 1 and the number of classes ({shape[1]})")
    image_shape = plan.graph.shape(plan.image)
    with b.scope("topk"):
        classes = b.TopK(_as_scores(b, plan.logits, shape), b.ints([top_k]), axis=1, outputs=2)[1]  # [N, K]
        repeated = b.Expand(b.Unsqueeze(plan.image, b.ints([0])), b.ints([top_k] + [1] * len(image_shape)))
        repeated = b.Reshape(repeated, b.ints([-1, *image_shape[1:]]))  # K-major: copy k of sample n at k·N + n
        targets = b.Reshape(b.Transpose(classes, perm=[1, 0]), b.ints([-1, 1]))
    view, clones, renamed = _clone_path(b, plan, repeated, "topk")
    names = {node.name: clone.name for node, clone in zip(plan.path, clones)}
    cloned = Plan(view, repeated, renamed[plan.logits], renamed.get(plan.start, plan.start), clones,
                  set(renamed.values()), {names[n]: k for n, k in plan.kinds.items()},
                  {names[n] for n in plan.first_layers}, plan.channels_last, {},
                  renamed.get(plan.layer, plan.layer) if plan.layer else None, plan.layer_grid)
    heatmap = _emit(b, cloned, method, options, target=targets)
    height, width = plan.image_size
    with b.scope("topk"):
        heatmaps = b.Transpose(b.Reshape(heatmap, b.ints([top_k, -1, height, width])), perm=[1, 0, 2, 3])
    return heatmaps, classes, top_k


def _emit_replicated(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None = None) -> str:
    """Methods that differentiate the model at several inputs per image (Integrated Gradients,
    SmoothGrad): the path from the image to the logits is cloned and run on a batch of
    ``count·N`` expanded inputs, built in the graph; the gradients are combined per image."""
    image = _float_image(b, plan)
    with b.scope("replicas"):
        expanded, count = method.expand(b, image, plan.graph.shape(plan.image), options)
    view, clones, renamed = _clone_path(b, plan, expanded, "replica")
    logits, shape = renamed[plan.logits], plan.graph.shape(plan.logits)
    streams = _Streams(b)
    with b.scope("start"):
        target = _target(b, _as_scores(b, plan.logits, shape)) if target is None else target
        target = b.Tile(target, b.ints([count, 1]))
        seed = method.start(b, _as_scores(b, logits, shape), target, shape[1])
        streams.gradients[logits].append(_as_logits(b, seed, shape))
    _walk(b, view, clones, set(renamed.values()), streams, {})
    with b.scope("image_map"):
        relevance = method.combine(b, image, plan.graph.shape(plan.image), streams.gradient(expanded), count, options)
    with b.scope("heatmap"):
        return _heatmap(b, relevance, plan.channels_last)


def _emit(b: GraphBuilder, plan: Plan, method: Method, options: Mapping, target: str | None = None) -> str:
    """Emit both streams and the heatmap; returns the heatmap tensor's name. ``target`` (``[N, 1]``)
    replaces the ``target`` input (top-K)."""
    if method.expand is not None:
        return _emit_replicated(b, plan, method, options, target)
    streams = _Streams(b)
    shape = plan.graph.shape(plan.logits)
    with b.scope("start"):
        scores = _as_scores(b, plan.logits, shape)
        seed = method.start(b, scores, _target(b, scores) if target is None else target, shape[1])
        streams.gradients[plan.logits].append(_as_logits(b, seed, shape))
        if method.logit_relevance is not None:  # LRP: R = y ⊙ onehot(t) at the logits
            streams.relevances[plan.logits].append(_as_logits(b, method.logit_relevance(b, scores, seed), shape))
        if method.contrast is not None:  # CLRP: a second stream from the other classes
            contrast = _Streams(b)
            contrast.relevances[plan.logits].append(_as_logits(b, method.contrast(b, scores, seed), shape))
    if method.layer_map is not None:  # a layer method: only the nodes above the layer are needed
        above = {n.name for n in plan.graph.data_flow(plan.layer)[0]}
        _walk(b, plan.graph, [n for n in plan.path if n.name in above], plan.data, streams, {})
        with b.scope("layer_map"):
            return _layer_heatmap(b, method, plan, streams.gradient(plan.layer))
    # LRP's rules read no gradient: emitting the gradient stream would only cost run time
    _walk(b, plan.graph, plan.path, plan.data, streams, plan.kinds, plan.start, plan.first_layers,
          gradients=method.logit_relevance is None)
    if method.attention_map is not None:  # Chefer et al.: the gradient stream read at the attention matrices
        with b.scope("attention_map"):
            coarse, size = method.attention_map(b, plan, streams.gradient)
            return _upsampled_heatmap(b, plan, coarse, size)
    if method.path_map is not None:  # FullGrad: the gradient stream read at every layer
        with b.scope("path_map"):
            relevance = method.path_map(b, plan, streams.gradient, _float_image(b, plan))
        with b.scope("heatmap"):
            return _heatmap(b, relevance, plan.channels_last)
    if method.image_map is not None:  # a gradient method: the map comes from ∇x at the image
        with b.scope("image_map"):
            relevance = method.image_map(b, _float_image(b, plan), streams.gradient(plan.image))
        with b.scope("heatmap"):
            return _heatmap(b, relevance, plan.channels_last)
    relevance = streams.relevance(plan.image)
    if method.contrast is not None:
        with b.scope("contrast"):
            _walk(b, plan.graph, plan.path, plan.data, contrast, plan.kinds, plan.start, plan.first_layers,
                  gradients=False)
            relevance = _contrastive(b, relevance, contrast.relevance(plan.image))
    if relevance is None and plan.start == plan.image:
        relevance = _start_relevance(b, streams, plan.image)
    if relevance is None:
        raise CompileError(f"no relevance reaches the image '{plan.image}'")
    with b.scope("heatmap"):
        return _heatmap(b, relevance, plan.channels_last)


def gradient_model(model: onnx.ModelProto | str | os.PathLike, output: str | None = None,
                   input: str | None = None) -> onnx.ModelProto:
    """The model plus its emitted gradient graph: a new input ``gradient_in`` (shaped like
    ``output``) and a new output ``gradient_out`` = ∂⟨output, gradient_in⟩/∂``input``.

    This exercises exactly the gradient rules the compiler uses; the tests compare it with
    ``torch.autograd``. Defaults: the first input and the first output.
    """
    canonical = passes.canonicalise(passes.load(model))
    graph = GraphView(canonical)
    input, output = input or graph.inputs[0], output or graph.outputs[0]
    path, data = _path(graph, input, output)
    missing = defaultdict(list)
    for node in path:
        if node.op_type not in REGISTRY or REGISTRY[node.op_type].gradient is None:
            missing[node.op_type].append(node.name)
    if missing:
        raise UnsupportedOpsError(missing)
    b = GraphBuilder(reserved=_all_names(canonical.graph) | {"gradient_in", "gradient_out"})
    streams = _Streams(b)
    streams.gradients[output].append("gradient_in")
    _walk(b, graph, path, data, streams, kinds={})
    result = streams.gradient(input)
    if result is None:
        raise CompileError(f"'{output}' does not depend on '{input}'")
    canonical.graph.node.extend(b.nodes)
    canonical.graph.node.append(helper.make_node("Identity", [result], ["gradient_out"], name="agf/gradient_out"))
    canonical.graph.initializer.extend(b.initializers)
    out_info = next(o for o in canonical.graph.output if o.name == output)
    in_info = next(i for i in canonical.graph.input if i.name == input)
    canonical.graph.input.append(helper.make_value_info("gradient_in", out_info.type))
    canonical.graph.output.append(helper.make_value_info("gradient_out", in_info.type))
    del canonical.graph.value_info[:]
    onnx.checker.check_model(canonical, full_check=True)
    return canonical


def _layer_heatmap(b: GraphBuilder, method: Method, plan: Plan, gradient: str) -> str:
    """The method's map at the layer (a token layer's patch tokens laid out on their grid)."""
    activation = plan.layer
    if plan.layer_grid is not None:
        channels = plan.graph.shape(activation)[2]
        activation = as_grid(b, activation, plan.layer_grid, channels)
        gradient = as_grid(b, gradient, plan.layer_grid, channels)
        size = (plan.layer_grid.height, plan.layer_grid.width)
    else:
        size = plan.graph.shape(activation)[2:]
    return _upsampled_heatmap(b, plan, method.layer_map(b, activation, gradient), size)


def _upsampled_heatmap(b: GraphBuilder, plan: Plan, coarse: str, coarse_size: Sequence[int]) -> str:
    """A coarse ``[N, 1, h, w]`` map upsampled bilinearly (half-pixel centres, as PyTorch's
    ``interpolate(align_corners=False)``) to the image and divided by its per-sample maximum."""
    upsampled = resize(b, coarse, coarse_size, plan.image_size)
    peak = max_per_sample(b, b.Abs(upsampled), 4)
    return b.Div(upsampled, b.Where(b.Greater(peak, b.const(0.0)), peak, b.const(1.0)))


def _contrastive(b: GraphBuilder, target: str, others: str) -> str:
    """``R_t − R_o · ΣR_t / ΣR_o`` per sample (CLRP, Gu et al. 2018). A plain division, as in the
    authors' code (``sdiv``'s +1e-9 would bias the ratio where ΣR_o is small, as SGLRP's is, and the
    difference of two nearly equal maps amplifies that); 0 where ΣR_o = 0."""
    total = sum_per_sample(b, others, 4)
    nonzero = b.Not(b.Equal(total, b.const(0.0)))
    scale = b.Where(nonzero, b.Div(sum_per_sample(b, target, 4), b.Where(nonzero, total, b.const(1.0))), b.const(0.0))
    return b.Sub(target, b.Mul(others, scale))


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


def _heatmap(b: GraphBuilder, relevance: str, channels_last: bool) -> str:
    """``Σ_c Φ₀ / max Φ₀`` per sample; ``/ max |Φ₀|`` where ``max Φ₀ ≤ 0``; ``[N, 1, H, W]``."""
    channel_sum = b.ReduceSum(relevance, b.ints([3 if channels_last else 1]), keepdims=1)
    if channels_last:
        channel_sum = b.Transpose(channel_sum, perm=[0, 3, 1, 2])
    peak = max_per_sample(b, relevance, 4)
    zero = b.const(0.0)
    scale = b.Where(b.Greater(peak, zero), peak, max_per_sample(b, b.Abs(relevance), 4))
    scale = b.Where(b.Greater(scale, zero), scale, b.const(1.0))
    heatmap = b.Div(channel_sum, scale)
    # float32 overflow is the one way left to a non-finite value; the contract is a finite map
    finite = b.Not(b.Or(b.IsNaN(heatmap), b.IsInf(heatmap)))
    return b.Where(finite, heatmap, zero)


def _scores_output(plan: Plan) -> str:
    """The graph output that carries the class scores: the logits, or a Softmax of them."""
    return next((output for output in plan.graph.outputs
                 if any(tensor == plan.logits for tensor, _ in _head_chain(plan.graph, output))), "")


def _assemble(model: onnx.ModelProto, b: GraphBuilder, plan: Plan, heatmap: str, method: str,
              top_k: tuple[str, str, int] | None = None) -> onnx.ModelProto:
    graph = model.graph
    for name in (TARGET_INPUT, HEATMAP_OUTPUT, *((HEATMAPS_OUTPUT, CLASSES_OUTPUT) if top_k else ())):
        if name in plan.graph.producer or name in plan.graph.shapes:
            raise CompileError(f"the model already has a tensor named '{name}'; the compiled model needs that name")
    graph.node.extend(b.nodes)
    graph.node.append(helper.make_node("Identity", [heatmap], [HEATMAP_OUTPUT], name="agf/heatmap/output"))
    graph.initializer.extend(b.initializers)
    graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, ["T"]))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), TARGET_INPUT))
    height, width = plan.image_size
    graph.output.append(helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT,
                                                      [passes.BATCH_DIM, 1, height, width]))
    if top_k:
        heatmaps, classes, count = top_k
        graph.node.append(helper.make_node("Identity", [heatmaps], [HEATMAPS_OUTPUT], name="agf/topk/heatmaps"))
        graph.node.append(helper.make_node("Identity", [classes], [CLASSES_OUTPUT], name="agf/topk/classes"))
        graph.output.append(helper.make_tensor_value_info(HEATMAPS_OUTPUT, TensorProto.FLOAT,
                                                          [passes.BATCH_DIM, count, height, width]))
        graph.output.append(helper.make_tensor_value_info(CLASSES_OUTPUT, TensorProto.INT64, [passes.BATCH_DIM, count]))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used and t.name != TARGET_INPUT]
    for tensor in unused:  # left over by opset conversion; ONNX Runtime warns about each
        graph.initializer.remove(tensor)
    try:
        model, _ = passes.infer_shapes(model)
    except CompileError as error:
        raise CompileError(f"internal error: the compiled model's {error}") from error
    # what `agf-onnx explain` and other tools need to know about the compiled model
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "agf_onnx.method": method, "agf_onnx.image": plan.image,
                                        "agf_onnx.layout": "NHWC" if plan.channels_last else "NCHW",
                                        "agf_onnx.logits": plan.logits, "agf_onnx.scores": _scores_output(plan)})
    model.doc_string = (model.doc_string + "\n" if model.doc_string else "") + \
        "agf-onnx: feed 'target' (int64 [N] or [1], negative = top class) and read 'heatmap' [N, 1, H, W]."
    return model


def compile(model: onnx.ModelProto | str | os.PathLike, *, method: str = "agf",
            input_shapes: Mapping[str, Sequence[int | str]] | None = None, logits: str | None = None,
            image: str | None = None, flat_policy: str = "authors", flat: Iterable[str] = (),
            full: Iterable[str] = (), layer: str | None = None, options: Mapping | None = None,
            top_k: int | None = None, check: bool = True) -> onnx.ModelProto:
    """Compile an ONNX classifier into a model that also outputs the explanation ``heatmap``.

    Args:
        model: a ``ModelProto`` or the path of an ``.onnx`` file (external data is read beside it).
        method: the explanation method; ``"agf"``.
        input_shapes: fixed shapes for inputs with dynamic spatial axes, e.g. ``{"x": [1, 3, 48, 192]}``
            (the batch axis stays dynamic).
        logits: the tensor holding the class scores; default: the only 2-D float output, before a
            trailing Softmax/LogSoftmax.
        image: the image input; default: the only 4-D input.
        flat_policy: which convs get the flat rule (``methods.FLAT_POLICIES``).
        flat, full: Conv node names forced to the flat or the full AGF rule.
        layer: the node whose output a layer method (Grad-CAM) explains; default: the last Conv
            with a spatial output.
        top_k: also output ``heatmaps`` ``[N, K, H, W]`` for the K best classes and their indices
            ``classes`` ``[N, K]``, in the same run.
        options: method options, e.g. ``{"steps": 50}`` (integrated-gradients), ``{"samples": 25,
            "noise": 0.15, "seed": 0}`` (smoothgrad); see ``methods.py``.
        check: run ``onnx.checker.check_model(full_check=True)`` on the result.

    Raises:
        UnsupportedOpsError: ops without a rule on the path from the image to the logits.
        CompileError: anything else that makes the model impossible to explain, with the reason.
    """
    chosen = get_method(method)
    canonical = passes.canonicalise(passes.load(model), input_shapes)
    found = plan(canonical, image=image, logits=logits, method=chosen, flat_policy=flat_policy, flat=flat, full=full,
                 layer=layer)
    b = GraphBuilder(reserved=_all_names(canonical.graph))
    heatmap = _emit(b, found, chosen, dict(options or {}))
    extra = _emit_top_k(b, found, chosen, dict(options or {}), int(top_k)) if top_k else None
    compiled = _assemble(canonical, b, found, heatmap, method, extra)
    if check:
        try:
            onnx.checker.check_model(passes.weightless(compiled), full_check=True)
        except Exception as error:  # a compiler bug, never the user's: say so plainly
            raise CompileError(f"internal error: the compiled model fails the ONNX checker: {error}") from error
    return compiled


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names
