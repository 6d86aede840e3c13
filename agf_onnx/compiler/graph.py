"""Read-only views of a canonicalised ONNX graph: who produces and reads each tensor, its static
shape, which tensors are constants (weights), and the values of those constants."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CompileError

Shape = tuple  # of int | None; None is a dynamic dimension (the batch)


def _shape_of(value_info: onnx.ValueInfoProto) -> Shape | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


#: The name of the batch dim in inferred shapes; ``N*k`` where it is merged with ``k`` other elements.
BATCH_DIM = "N"


def batch_dim(factor: int) -> str:
    """The name of a dim holding the batch merged with ``factor`` other elements: ``N``, ``N*k``."""
    return BATCH_DIM if factor == 1 else f"{BATCH_DIM}*{factor}"


def batch_factor(dim_param: str) -> int | None:
    """``N`` → 1, ``N*k`` → k, anything else → None."""
    if dim_param == BATCH_DIM:
        return 1
    head, _, factor = dim_param.partition("*")
    return int(factor) if head == BATCH_DIM and factor.isdigit() else None


def _batch_of(value_info: onnx.ValueInfoProto) -> tuple[int, int] | None:
    """``(axis, factor)`` of the one dim named ``N`` or ``N*factor`` (``passes.infer_shapes``)."""
    found = [(axis, batch_factor(d.dim_param)) for axis, d in enumerate(value_info.type.tensor_type.shape.dim)
             if d.HasField("dim_param") and batch_factor(d.dim_param) is not None]
    return found[0] if len(found) == 1 else None


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    """The version of the ``ai.onnx`` opset ``model`` imports."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise CompileError("the model imports no ai.onnx opset")
    return version


def evaluator(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str], initializers: Mapping[str, onnx.TensorProto],
              opset_import, inputs: Sequence[onnx.ValueInfoProto] = ()):
    """``onnx.reference`` evaluator of ``nodes`` alone, with the initializers they read (looked up by
    name: scanning all of them per call made shape folding quadratic, 5,146 calls on a 128-block ViT)."""
    from onnx.reference import ReferenceEvaluator

    used = {i for node in nodes for i in node.input}
    graph = helper.make_graph(list(nodes), "subgraph", list(inputs),
                              [helper.make_value_info(name, onnx.TypeProto()) for name in outputs],
                              [initializers[name] for name in sorted(used) if name in initializers])
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=opset_import))


class GraphView:
    """Indexes over ``model.graph``; build it again after a pass changes the graph."""

    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, onnx.TensorProto] | None = None) -> None:
        """``weights``: initializers held elsewhere (another model's), seen as this graph's own; they
        stand in for the inputs of the same names that ``passes.weightless`` made of them."""
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {**(weights or {}), **{t.name: t for t in graph.initializer}}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.shapes: dict[str, Shape] = {}
        self.dtypes: dict[str, int] = {}
        #: tensor → (axis, factor): where its batch lives, merged batch-major with ``factor`` elements
        self.batches: dict[str, tuple[int, int]] = {}
        for info in [*graph.input, *graph.value_info, *graph.output]:
            shape = _shape_of(info)
            if shape is not None:
                self.shapes[info.name] = shape
                batch = _batch_of(info)
                if batch is not None:
                    self.batches[info.name] = batch
            self.dtypes[info.name] = info.type.tensor_type.elem_type
        for name, tensor in self.initializers.items():
            self.shapes[name] = tuple(tensor.dims)
            self.dtypes[name] = tensor.data_type
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = [o.name for o in graph.output]
        #: tensor → how many elements precede each sample inside its merged batch axis (1: batch-major,
        #: ``N·T``; ``T`` for ``T·N``; None where no reshape chain tells)
        self._batch_outer: dict[str, int | None] = self._merge_orders()
        self.constants: set[str] = set(self.initializers)
        self._nonnegative: dict[str, bool] = {}
        for node in self.nodes:
            if node.op_type in _NONDETERMINISTIC:
                continue
            if all(not name or name in self.constants for name in node.input):
                self.constants.update(name for name in node.output if name)

    def shape(self, name: str) -> Shape:
        if name not in self.shapes:
            raise CompileError(f"tensor '{name}' has no inferred shape")
        return self.shapes[name]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def batch(self, name: str) -> tuple[int, int] | None:
        """``(axis, factor)``: the axis of ``name`` that holds the batch, merged batch-major with
        ``factor`` other elements (1: the plain batch); None for tensors without a batch."""
        return self.batches.get(name)

    def merged_outer(self, name: str) -> int | None:
        """The number of elements that precede the batch inside its merged axis (``T`` in ``[T·N, C]``),
        1 where the batch is major or not merged, None where it cannot be told."""
        batch = self.batches.get(name)
        return 1 if batch is None or batch[1] == 1 else self._batch_outer.get(name)

    def _merge_orders(self) -> dict[str, int | None]:
        """Follows the batch through the graph (nodes in topological order): a Reshape or Flatten
        merging it with axes before it puts those elements first; any other op keeps the order of
        the input whose batch axis is merged the same way."""
        outer: dict[str, int | None] = {name: 1 for name in self.inputs}
        for node in self.nodes:
            data = [name for name in node.input if name in self.batches]
            for out in node.output:
                batch = self.batches.get(out)
                if batch is None:
                    continue
                if batch[1] == 1:
                    outer[out] = 1
                elif node.op_type in ("Reshape", "Flatten") and data:
                    outer[out] = self._reshaped_outer(data[0], out, outer.get(data[0]))
                else:
                    same = [outer.get(name) for name in data if self.batches[name][1] == batch[1]]
                    outer[out] = same[0] if same else None
        return outer

    def _reshaped_outer(self, source: str, target: str, outer: int | None) -> int | None:
        """``outer`` of ``target``, a row-major reshape of ``source``: the elements before the batch in
        flat order, less those of the whole axes before the target's batch axis."""
        (axis_in, _), (axis_out, factor) = self.batches[source], self.batches[target]
        before_in = self.shapes[source][:axis_in]
        before_out = self.shapes[target][:axis_out]
        if outer is None or None in before_in or None in before_out:
            return None
        elements, whole = int(np.prod(before_in, dtype=np.int64)) * outer, int(np.prod(before_out, dtype=np.int64))
        if elements % whole or factor % (elements // whole):
            return None
        return elements // whole

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def small_constant(self, name: str, limit: int) -> np.ndarray | None:
        """The value of constant ``name`` if it has at most ``limit`` elements, else None."""
        shape = self.shapes.get(name)
        if name not in self.constants or shape is None or None in shape or int(np.prod(shape)) > limit:
            return None
        return self.value(name)

    def nonnegative(self, name: str) -> bool:
        """Whether tensor ``name`` is ``≥ 0`` by construction (a ReLU's output, a pool or reshape of
        one, …); a cheaper ``sdiv`` holds for such denominators. False when unsure."""
        known: dict[str, bool] = self._nonnegative
        pending = [name]
        while pending:  # iterative: deep graphs would overflow a recursive walk
            tensor = pending[-1]
            if tensor in known:
                pending.pop()
                continue
            node = self.producer.get(tensor)
            if tensor in self.initializers:
                known[tensor] = bool(np.all(numpy_helper.to_array(self.initializers[tensor]) >= 0))
            elif node is None or node.op_type not in _NONNEGATIVE_IF_INPUTS | _NONNEGATIVE:
                known[tensor] = node is not None and node.op_type in _NONNEGATIVE
            elif node.op_type in _NONNEGATIVE:
                known[tensor] = True
            elif node.op_type == "Clip" and (len(node.input) < 2 or not node.input[1]):
                known[tensor] = False  # no lower bound
            else:
                read = _NONNEGATIVE_IF_INPUTS_READ.get(node.op_type, range(len(node.input)))
                inputs = [node.input[i] for i in read if i < len(node.input) and node.input[i]]
                waiting = [i for i in inputs if i not in known]
                if waiting:
                    pending.extend(waiting)
                    continue
                known[tensor] = all(known[i] for i in inputs)
            pending.pop()
        return known[name]

    def value(self, name: str) -> np.ndarray:
        """The value of a constant tensor, evaluating the weight-only subgraph behind it."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name not in self.constants:
            raise CompileError(f"tensor '{name}' depends on the input; a constant is needed here")
        return self._evaluate(name)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - the view lives as long as one compile
    def _evaluate(self, name: str) -> np.ndarray:
        needed, stack = [], [name]
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in self.initializers or not tensor:
                continue
            seen.add(tensor)
            node = self.producer[tensor]
            if node not in needed:
                needed.append(node)
            stack.extend(node.input)
        order = [n for n in self.nodes if n in needed]
        return np.asarray(evaluator(order, [name], self.initializers, self.model.opset_import).run(None, {})[0])

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """Names of the nodes that the given tensors depend on."""
        found: set[str] = set()
        stack = list(names)
        while stack:
            node = self.producer.get(stack.pop())
            if node is not None and node.name not in found:
                found.add(node.name)
                stack.extend(node.input)
        return found

    def depends_on(self, tensor: str, other: str) -> bool:
        """Whether ``tensor`` is computed from ``other`` (or is it)."""
        stack, seen = [tensor], set()
        while stack:
            name = stack.pop()
            if name == other:
                return True
            if name in seen:
                continue
            seen.add(name)
            node = self.producer.get(name)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return False

    def data_flow(self, source: str) -> tuple[list[onnx.NodeProto], set[str]]:
        """The nodes that compute differentiably from ``source`` and the float tensors they make.

        Flow stops at ops that only read metadata or compare (``Shape``…) and at index and mask
        tensors: ``Reshape(x, Concat(Shape(x)[0], -1))`` reads ``x`` as data, its shape not.
        """
        data, nodes = {source}, []
        for node in self.nodes:
            if node.op_type in NON_DIFFERENTIABLE or not any(i in data for i in node.input):
                continue
            nodes.append(node)
            data.update(o for o in node.output if o and self.dtypes.get(o) not in _INDICES)
        return nodes, data


#: Ops whose outputs carry no gradient: metadata, comparisons, indices.
NON_DIFFERENTIABLE = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "Less", "GreaterOrEqual",
                      "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Sign", "Round", "Floor", "Ceil",
                      "EyeLike", "ConstantOfShape"}
#: Ops whose output is ≥ 0 whatever they read, and ops whose output is ≥ 0 when the inputs they
#: read (those at the indices of ``_NONNEGATIVE_IF_INPUTS_READ``, else all) are (Clip: its minimum).
_NONNEGATIVE = {"Relu", "Abs", "Sigmoid", "Exp", "Softmax", "Softplus", "Sqrt", "HardSigmoid"}
_NONNEGATIVE_IF_INPUTS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                          "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Concat", "Slice", "Gather",
                          "Expand", "Tile", "Split", "Pad", "Resize", "Add", "Mul", "Sum", "Max", "Min", "Div",
                          "Clip"}
_NONNEGATIVE_IF_INPUTS_READ = {**{op: (0,) for op in ("MaxPool", "AveragePool", "Reshape", "Squeeze", "Unsqueeze",
                                                      "Dropout", "Slice", "Gather", "Expand", "Tile", "Split",
                                                      "Resize")}, "Pad": (0, 2), "Clip": (1,)}
_INDICES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


@dataclass
class NodeView:
    """What a rule sees of one node: its tensors, attributes, shapes, and the incoming streams.

    ``gradient``/``relevance`` hold one entry per output (``None`` where that output carries
    nothing). ``input_gradients`` is what the gradient rule returned, so relevance rules that
    need ``VJP_op(G)`` reuse it instead of emitting it twice.
    """

    proto: onnx.NodeProto
    graph: GraphView
    data: frozenset  # the inputs that depend on the image
    gradient: list[str | None] = field(default_factory=list)
    relevance: list[str | None] = field(default_factory=list)
    input_gradients: list[str | None] = field(default_factory=list)
    is_first_layer: bool = False

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.proto.output)

    @functools.cached_property
    def attrs(self) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in self.proto.attribute}

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def is_data(self, index: int) -> bool:
        return index < len(self.proto.input) and self.proto.input[index] in self.data

    def shape(self, name_or_index: str | int) -> Shape:
        name = self.inputs[name_or_index] if isinstance(name_or_index, int) else name_or_index
        return self.graph.shape(name)

    def value(self, index: int) -> np.ndarray:
        return self.graph.value(self.inputs[index])

    def batch_axis(self, name_or_index: str | int) -> int | None:
        """The axis of an input (by index) or any tensor (by name) that holds the batch."""
        name = self.inputs[name_or_index] if isinstance(name_or_index, int) else name_or_index
        batch = self.graph.batch(name)
        return None if batch is None else batch[0]

    def refuse(self, why: str) -> CompileError:
        return CompileError(f"{self.op_type} node '{self.name}': {why}")
