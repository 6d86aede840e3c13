"""Planning: what the compiler finds in a model before it emits anything — the image, the logits,
the explained path from one to the other, where the relevance stream starts, and which relevance
rule each node on the path gets under the chosen method (``Plan``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx
from onnx import TensorProto, helper

from ..errors import CompileError, UnsupportedOpsError
from ..rules import OpRules, label, lookup, unsupported
from .graph import GraphView
from .methods import Method, flat_layers, is_token_linear
from .plan import Plan
from .text import TokenInput, check_sequence_static, find_token_input
from .tokens import TokenGrid, attention_matrices, patch_grid

#: Ops after the logits that the explanation starts below (spec "Start").
HEAD_OPS = ("Softmax", "LogSoftmax")
_OTHER_FLOATS = (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_INTEGER_IMAGES = (TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16)
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
#: Linear ops that may start the relevance stream (spec "the top linear layer").
LINEAR_OPS = ("Gemm", "MatMul", "Conv")
#: Preprocessing: ops that relabel the image's layout or scale and shift it by constants. The
#: linear layer behind them still reads the image (z^B rule), and a Transpose behind them still
#: tells a channels-last image.
_PREPROCESSING_OPS = ("Transpose", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Add", "Sub",
                      "Mul", "Div", "BatchNormalization")


def find_image(graph: GraphView, image: str | None) -> str:
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


def find_explained(graph: GraphView, image: str | None, logits: str) -> tuple[str, TokenInput | None]:
    """The explained input tensor: the image input, or, for a text model (integer ``[N, T]`` token
    ids and no 4-D input), its embedding sum E with the roles of its inputs (``text.py``)."""
    images = [name for name in graph.inputs if len(graph.shapes.get(name, ())) == 4]
    if image is None and not images or image is not None and len(graph.shapes.get(image, ())) == 2:
        tokens = find_token_input(graph, logits, image)
        if tokens is not None:
            return tokens.embedding, tokens
    return find_image(graph, image), None


def find_logits(graph: GraphView, logits: str | None) -> str:
    if logits is not None:
        if logits not in graph.producer and logits not in graph.inputs:
            raise CompileError(f"--logits: the model has no tensor '{logits}'")
        shape = graph.shapes.get(logits, ())
        if shape and not _is_score_shape(shape):  # a segmentation map, features: no class per sample to explain
            raise CompileError(f"--logits {logits}: shape {['N', *shape[1:]]} is not [N, classes] (nor [N, classes, "
                               "1, 1]); the class scores to explain hold one score per class for each image")
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
    for tensor, reader in head_chain(graph, logits):
        if reader in HEAD_OPS:
            logits = tensor
    return logits


def head_chain(graph: GraphView, tensor: str) -> list[tuple[str, str | None]]:
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


def top_linear(graph: GraphView, logits: str, data: set[str]) -> onnx.NodeProto:
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


def path_between(graph: GraphView, source: str, target: str) -> tuple[list[onnx.NodeProto], set[str]]:
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
    images = [name for name in graph.inputs if len(graph.shapes.get(name, ())) == 4]
    dtype = graph.dtypes.get(image if image is not None else images[0] if len(images) == 1 else "")
    if dtype in _OTHER_FLOATS:  # said first: the logits search would only find no float32 output
        raise CompileError(f"the image input '{image or images[0]}' is {TensorProto.DataType.Name(dtype)}: float32 "
                           "images, or integer images the model casts to float32, are supported")
    logits = find_logits(graph, logits)
    image, tokens = find_explained(graph, image, logits)
    refusal = method.map.text_refusal(layer) if tokens is not None else None
    if refusal is not None:  # the methods that need a pixel grid
        raise CompileError(f"--method {method.name}{refusal}")
    path, data = path_between(graph, image, logits)
    if not path:
        raise CompileError(f"the logits '{logits}' do not depend on the image '{image}'")
    missing = unsupported(path)  # the one refusal of a file, the same for every method: said first
    if missing and strict:
        raise UnsupportedOpsError(missing)
    try:
        top = top_linear(graph, logits, data) if method.map.needs_top_layer else None
    except CompileError:
        if not missing:
            raise
        top = None  # inspect: the unsupported ops (QLinearConv…) are the reason, reported in the plan
    start = logits if method.map.starts_at_logits or top is None else top.input[0]
    relevant = graph.ancestors([start]) & {node.name for node in path} if method.map.relevance_stream else set()
    # z^B needs the image's bounds: a text model's layers reading E get the rules of hidden layers
    first_layers = {n.name for n in path if n.op_type in LINEAR_OPS and tokens is None
                    and _reads_image(graph, n.input[0], image)}
    layers = [n for n in path if n.name in relevant and (n.op_type == "Conv" or is_token_linear(graph, n))]
    flats = flat_layers(graph, layers, data, flat_policy, flat, full)
    kinds: dict[str, str] = {}
    refused: dict[str, list[str]] = defaultdict(list)
    for node in path:
        entry: OpRules | None = lookup(node.op_type, node.domain)
        kind = None
        if entry is not None and node.name in relevant:
            kind = method.rule_for(node, entry.relevance, first_layer=node.name in first_layers,
                                   flat=node.name in flats, top_layer=top is not None and node.name == top.name)
        if entry is None or (node.name in relevant and kind is None):
            refused[label(node)].append(node.name)
        elif kind is not None:
            kinds[node.name] = kind
    if refused and strict:
        raise UnsupportedOpsError(refused)
    if strict:
        if tokens is not None:
            check_sequence_static(graph, tokens)
        _check_static(graph, image, [image, logits, *(o for n in path for o in n.output if o)])
    dtype = graph.dtypes.get(image)
    if dtype != TensorProto.FLOAT and not (dtype in _INTEGER_IMAGES and any(n.op_type == "Cast" for n in path)):
        raise CompileError(f"the image input '{image}' is {TensorProto.DataType.Name(dtype)}: float32 images, "
                           "or integer images the model casts to float32, are supported")
    if layer is not None and not method.map.at_layer:
        raise CompileError(f"--layer: the method '{method.name}' explains at the image, not at a layer")
    found = Plan(graph, image, logits, start, path, data, kinds, first_layers, _channels_last(graph, image),
                 dict(refused), tokens=tokens)
    if method.map.at_layer:
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


#: Ops that carry a conv's output on to an attention's q, k or v without mixing it with other data.
_PROJECTION_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice", "Split", "Identity",
                   "BatchNormalization", "MatMul", "Gemm", "Add", "Mul", "Div", "Cast", "Einsum")


def _projects_attention(plan: Plan, conv: onnx.NodeProto, depth: int = 16) -> bool:
    """Whether ``conv`` computes queries, keys or values of an attention (CvT's convolutional
    projections): its output reaches a product of two data tensors (the scores ``q·kᵀ`` or ``A·V``)
    through reshapes, concatenations and linear maps by constants only. Such a conv is no layer for
    Grad-CAM: with class-token pooling, the last block's patch queries do not reach the logits, and
    its gradient is exactly 0 for every class."""
    graph, frontier, seen = plan.graph, [conv.output[0]], set()
    for _ in range(depth):
        following = []
        for tensor in frontier:
            for reader in graph.consumers.get(tensor, []):
                data = [i for i in reader.input if i in plan.data]
                if reader.op_type in ("MatMul", "Einsum") and len(data) == 2:
                    return True
                if reader.op_type in _PROJECTION_OPS and reader.name not in seen and \
                        (len(data) == 1 or reader.op_type == "Concat"):
                    seen.add(reader.name)
                    following.extend(o for o in reader.output if o)
        frontier = following
    return False


def _find_layer(plan: Plan, layer: str | None) -> tuple[str, TokenGrid | None]:
    """The output of ``layer`` (a node name) and, for a token tensor ``[N, T, C]``, the grid of its
    patch tokens. Default: the last Conv with a spatial output or the last transformer block's
    output (a residual Add of token tensors whose tokens lie on a grid), whichever comes later;
    with a class token, the last block's input."""
    graph, path = plan.graph, plan.path
    first = [n for n in path if n.name in plan.first_layers]

    def grid_of(node: onnx.NodeProto) -> TokenGrid | None:
        shape = graph.shape(node.output[0])
        if len(shape) != 3 or graph.batch(node.output[0]) != (0, 1):
            return None
        if plan.tokens is not None:  # a text's tokens: a T × 1 grid
            return TokenGrid(0, shape[1], 1) if shape[1] == plan.map_size[0] else None
        return patch_grid(graph, first, plan.image_size, shape[1])

    def spatial(node: onnx.NodeProto) -> bool:
        shape = graph.shape(node.output[0])
        return len(shape) == 4 and any(d > 1 for d in shape[2:])

    candidates = [n for n in path if (n.op_type == "Conv" and spatial(n) and not _projects_attention(plan, n)) or
                  (n.op_type == "Add" and sum(i in plan.data for i in n.input) == 2 and grid_of(n) is not None)]
    if layer is None:
        if not candidates:
            raise CompileError("no Conv with a spatial output nor a transformer block's output on the path from the "
                               "image to the logits; pass --layer NODE")
        chosen = candidates[-1]
        grid = grid_of(chosen) if chosen.op_type != "Conv" else None
        if grid is not None and grid.prefix:
            # Only the class token of the last block reaches the logits: its patch tokens carry no
            # gradient. The last block's input (pytorch-grad-cam's recipe for ViTs) still does.
            order = {n.name: i for i, n in enumerate(path)}
            last_attention = max((order[graph.producer[a].name] for a in attention_matrices(graph, path)), default=-1)
            earlier = [n for n in candidates if order[n.name] < last_attention]
            chosen = earlier[-1] if earlier else chosen
    else:
        chosen = next((n for n in path if n.name == layer), None)
        if chosen is None or not (len(graph.shape(chosen.output[0])) == 4 or grid_of(chosen) is not None):
            raise CompileError(f"--layer: no node '{layer}' with a 4-D output or a [N, tokens, channels] output whose "
                               f"tokens lie on the patch grid on the explained path (for example: "
                               f"{', '.join(n.name for n in candidates[-5:]) or 'none'})")
    return chosen.output[0], (grid_of(chosen) if chosen.op_type != "Conv" else None)
