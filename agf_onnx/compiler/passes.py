"""Canonicalisation passes: each takes a model, returns ``(model, changed)``, and states what holds
after it ran. ``canonicalise`` runs them in order. None of them changes what the original
outputs compute: values move between nodes and initializers, opsets change versions, names
are added, nothing is recomputed differently."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

from ..errors import CompileError, UnsupportedOpsError
from ..rules import unsupported
from .builder import TARGET_OPSET
from .graph import BATCH_DIM, GraphView, ai_onnx_opset, batch_dim, batch_factor, evaluator

#: Ops whose folded output can be far larger than their inputs (the onnx zoo stores weights
#: as ConstantOfShape): folding them would bloat the file, so their outputs stay computed.
_EXPANDING_OPS = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample"}


def drop_initializer_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: graph inputs are the model's real inputs (IR 3 listed every initializer as one),
    and the IR version (≥ 4) allows initializers that are not inputs."""
    weights = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in weights]
    changed = len(keep) != len(model.graph.input) or model.ir_version < 4
    if changed:
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)
    return model, changed


def name_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: every node has a unique, non-empty name (error messages and rule scopes use it)."""
    seen: set[str] = set()
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{index}"
            name, n = base, 0
            while name in seen:
                n += 1
                name = f"{base}_{n}"
            node.name, changed = name, True
        seen.add(node.name)
    return model, changed


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    attribute = node.attribute[0] if len(node.attribute) == 1 else None
    if attribute is None:
        return None
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return numpy_helper.to_array(value)
    if attribute.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if attribute.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    return None


def constants_to_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: weights held in ``Constant`` nodes (Paddle, older exporters) are initializers."""
    graph, changed = model.graph, False
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and not node.domain else None
        if value is None or node.output[0] in outputs:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(keep)
    return model, changed


def upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: the model imports ``ai.onnx`` at TARGET_OPSET (17) or newer, with an IR version that
    allows it. A model at 17 or newer keeps its opset and every node as it is (the explanation is
    emitted at its opset: ``GraphBuilder.opset``); one at 11–16 (TorchScript's ``opset_version``)
    is upgraded to 17 by the project's own adapters (``_ADAPTERS``: the ops whose form or meaning
    changed in between; every other op means the same at 17, its newer versions having added
    types or attributes whose default is the old behaviour), so that ONNX Runtime computes the
    same bits. Older models (opset < 11, which no current exporter writes) go through
    ``onnx.version_converter``."""
    version = ai_onnx_opset(model)
    changed = False
    if version < 11:
        model, changed = _convert_with_onnx(model, version), True
    elif version < TARGET_OPSET:
        _adapt_to_target(model, version)
        changed = True
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < needed:
        model.ir_version, changed = needed, True
    return model, changed


def _convert_with_onnx(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    weights = {t.name: t for t in model.graph.initializer}
    skeleton = weightless(model)  # converted without its large weights: the converter serialises what it gets
    try:
        converted = version_converter.convert_version(skeleton, TARGET_OPSET)
    except Exception as error:
        raise CompileError(f"cannot convert the model from opset {version} to {TARGET_OPSET}: {error}") from error
    graph = converted.graph
    moved = [i for i in graph.input if i.name in weights and i.name not in {t.name for t in graph.initializer}]
    for info in moved:
        graph.input.remove(info)
        graph.initializer.append(weights[info.name])
    converted.ir_version = max(model.ir_version, 8)
    converted.producer_name, converted.producer_version = model.producer_name, model.producer_version
    converted.doc_string = model.doc_string
    converted.metadata_props.extend(model.metadata_props)
    return converted


class _Adapter:
    """Rewrites of the nodes of an opset 11–16 model into their opset-17 form (see ``upgrade_opset``)."""

    def __init__(self, model: onnx.ModelProto, version: int) -> None:
        self.model, self.version = model, version
        self.initializers: list[onnx.TensorProto] = []
        self._ranks: dict[str, int] | None = None
        self.rank("")  # before any node changes

    def ints(self, name: str, values) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, np.int64).reshape(-1), name))
        return name

    def rank(self, tensor: str) -> int | None:
        """The rank of ``tensor`` in the original model, where shape inference tells it."""
        if self._ranks is None:
            probes = _BatchProbes(self.model)  # follows Shape → Gather → Concat → Reshape by value
            for node in self.model.graph.node:
                probes.infer(node)
            self._ranks = {name: len(dims) for name, dims in probes.dims[0].items()}
        return self._ranks.get(tensor)

    def adapt(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """``node`` at opset 17: itself, changed in place, or the nodes that compute the same."""
        attributes = {a.name: a for a in node.attribute}
        moved_to_input = {"Split": "split", "Squeeze": "axes", "Unsqueeze": "axes", "ReduceSum": "axes"}
        if self.version < 13 and moved_to_input.get(node.op_type) in attributes:
            name = moved_to_input[node.op_type]
            values = helper.get_attribute_value(attributes[name])
            node.attribute.remove(attributes[name])
            node.input.append(self.ints(f"{node.name}/{name}", values))
        elif self.version < 12 and node.op_type == "Dropout" and "ratio" in attributes:
            node.attribute.remove(attributes["ratio"])  # inference: the identity at any ratio
        elif self.version < 16 and node.op_type == "RoiAlign" and "coordinate_transformation_mode" not in attributes:
            node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "output_half_pixel"))
        elif self.version < 13 and node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
            return self._softmax(node, attributes)
        return [node]

    def _softmax(self, node: onnx.NodeProto, attributes: dict) -> list[onnx.NodeProto]:
        """Before 13 these ops normalise the input flattened to 2-D at ``axis`` (default 1) over the
        whole second part; from 13 over ``axis`` alone. Equal where ``axis`` is the last; elsewhere
        ``Reshape(op(Flatten(x, axis), axis=1), Shape(x))``, exactly the old computation."""
        axis = helper.get_attribute_value(attributes["axis"]) if "axis" in attributes else 1
        rank = self.rank(node.input[0])
        if rank is not None and axis % rank == rank - 1:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("axis", -1))
            return [node]
        base, x, y = node.name, node.input[0], node.output[0]
        return [helper.make_node("Shape", [x], [f"{base}/shape"], name=f"{base}/shape"),
                helper.make_node("Flatten", [x], [f"{base}/flat"], name=f"{base}/flat", axis=axis),
                helper.make_node(node.op_type, [f"{base}/flat"], [f"{base}/normalised"], name=base, axis=1),
                helper.make_node("Reshape", [f"{base}/normalised", f"{base}/shape"], [y], name=f"{base}/reshape")]


def _adapt_to_target(model: onnx.ModelProto, version: int) -> None:
    graph = model.graph
    adapter = _Adapter(model, version)
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        if node.domain in ("", "ai.onnx"):
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise CompileError(f"{node.op_type} node '{node.name}': subgraphs at opset {version} are not "
                                   f"upgraded; export the model at opset {TARGET_OPSET} or newer")
            try:
                onnx.defs.get_schema(node.op_type, TARGET_OPSET)
            except onnx.defs.SchemaError as error:
                raise CompileError(f"{node.op_type} node '{node.name}': no such op at opset {TARGET_OPSET}") from error
            nodes.extend(adapter.adapt(node))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(adapter.initializers)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = TARGET_OPSET


#: Ops that move or pick values without arithmetic: folding them gives the same bits that
#: ONNX Runtime computes, so the original outputs stay bit-identical.
_EXACT_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat", "Split", "Slice",
              "Gather", "Cast"}


def _folds_exactly(node: onnx.NodeProto, values: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether folding ``node`` leaves the original outputs bit-identical: it only moves data, or
    it computes integers (shape arithmetic). Float arithmetic on weights (the weight
    standardisation of NF-ResNets and BiT) stays a node: ``onnx.reference`` rounds differently
    from ONNX Runtime's kernels, which compute it (or fold it when the session loads)."""
    if node.op_type in _EXACT_OPS:
        return True
    return all(values[i].data_type not in _FLOAT_TYPES for i in node.input if i)


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: no node that moves data or computes integers computes only from initializers
    (unless it expands data, ``_EXPANDING_OPS``), so rules see such weights and every shape value
    as initializers; initializers nothing reads are gone. Float arithmetic on weights stays (see
    ``_folds_exactly``); the rules treat its outputs as the constants they are."""
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep, changed = [], False
    for node in graph.node:
        foldable = (not node.domain and node.op_type not in _EXPANDING_OPS and node.op_type != "Constant"
                    and all(not i or i in values for i in node.input)
                    and not any(o in outputs for o in node.output) and len(node.input) > 0
                    and not node.op_type.startswith("Random") and _folds_exactly(node, values))
        if foldable:
            names = [o for o in node.output if o]
            try:
                results = evaluator([node], names, values, model.opset_import).run(None, {})
            except Exception:  # an op the reference evaluator lacks stays a node: ORT folds it
                results = None
            if results is not None:
                in_bytes = sum(values[i].ByteSize() for i in node.input if i)
                arrays = [np.asarray(r) for r in results]
                if sum(a.nbytes for a in arrays) <= in_bytes + 1024:
                    for name, array in zip(names, arrays):
                        values[name] = numpy_helper.from_array(array, name)
                    changed = True
                    continue
        keep.append(node)
    used = {i for n in keep for i in n.input} | outputs
    used |= {i for n in keep for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for i in _graph_reads(a.g)}
    if changed or len(used & set(values)) != len(graph.initializer):
        del graph.node[:]
        graph.node.extend(keep)
        keep_initializers(graph, used, [t for name, t in values.items() if name in used])
        changed = True
    return model, changed


def keep_initializers(graph: onnx.GraphProto, kept: set[str], added: Iterable[onnx.TensorProto] = ()) -> None:
    """Remove the initializers not named in ``kept`` in place and append those of ``added`` the
    graph lacks. Never ``del graph.initializer[:]`` + ``extend``: protobuf's upb backend copies each
    appended message into the model's arena, and an arena frees nothing before the whole model
    goes, so every such rebuild kept another copy of all the weights alive (Swin-B compiled at 14×
    its weights: one rebuild per round of ``canonicalise``'s loop, ``docs/memory.md``)."""
    initializers = graph.initializer
    for index in range(len(initializers) - 1, -1, -1):
        if initializers[index].name not in kept:
            del initializers[index]
    present = {t.name for t in initializers}
    initializers.extend(t for t in added if t.name not in present)


def _graph_reads(graph: onnx.GraphProto) -> set[str]:
    return {i for n in graph.node for i in n.input}


def parse_input_shape(text: str) -> tuple[str, list[int | str]]:
    """``NAME=d0,d1,...`` → ``(NAME, dims)``; a dim that is not an integer stays symbolic."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not dims:
        raise CompileError(f"--input-shape '{text}': expected NAME=d0,d1,... such as x=1,3,224,224")
    parsed: list[int | str] = []
    for dim in dims.split(","):
        dim = dim.strip()
        if dim.lstrip("-").isdigit():
            if int(dim) <= 0:
                raise CompileError(f"--input-shape '{text}': dimension {dim} must be positive")
            parsed.append(int(dim))
        elif dim:
            parsed.append(dim)
        else:
            raise CompileError(f"--input-shape '{text}': empty dimension")
    return name, parsed


def set_input_shapes(model: onnx.ModelProto,
                     shapes: Mapping[str, Sequence[int | str]]) -> tuple[onnx.ModelProto, bool]:
    """After: the named inputs have the given dims, the other inputs' dims that share a symbolic
    name with a dim given a value have that value too (a text model's mask and token types follow
    its ids' sequence length), and every float input of rank ≥ 2 and every integer ``[N, T]``
    input has a symbolic batch dimension ``N`` (the compiled model takes any batch size)."""
    inputs = {i.name: i for i in model.graph.input}
    for name in shapes:
        if name not in inputs:
            raise CompileError(f"--input-shape: the model has no input '{name}' "
                               f"(inputs: {', '.join(inputs) or 'none'})")
    shared = _shared_dim_values(inputs, shapes)
    changed = False
    for name, info in inputs.items():
        tensor = info.type.tensor_type
        dims = list(shapes[name]) if name in shapes else None
        if dims is None and tensor.HasField("shape") and any(d.dim_param in shared for d in tensor.shape.dim):
            dims = [shared.get(d.dim_param, d.dim_param) if d.dim_param else d.dim_value for d in tensor.shape.dim]
        if dims is not None:
            if tensor.HasField("shape") and len(tensor.shape.dim) != len(dims):
                raise CompileError(f"--input-shape {name}: the model's input has rank "
                                   f"{len(tensor.shape.dim)}, not {len(dims)}")
            del tensor.shape.dim[:]
            for dim in dims:
                entry = tensor.shape.dim.add()
                if isinstance(dim, int):
                    entry.dim_value = dim
                else:
                    entry.dim_param = dim
            changed = True
        batched = (tensor.elem_type in _IMAGE_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) >= 2) or \
            (tensor.elem_type in _TOKEN_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) == 2)
        if batched:
            batch = tensor.shape.dim[0]
            if batch.dim_param != BATCH_DIM:
                batch.Clear()
                batch.dim_param = BATCH_DIM
                changed = True
    return model, changed


def _shared_dim_values(inputs: Mapping[str, onnx.ValueInfoProto],
                       shapes: Mapping[str, Sequence[int | str]]) -> dict[str, int]:
    """Symbolic dim name → the value given to a dim of that name (``--input-shape ids=1,128`` fixes
    every input dim named like the ids' sequence axis); the batch axis (the first) is never shared."""
    shared: dict[str, int] = {}
    for name, dims in shapes.items():
        tensor = inputs[name].type.tensor_type
        if not tensor.HasField("shape") or len(tensor.shape.dim) != len(dims):
            continue
        for axis, (dim, given) in enumerate(zip(tensor.shape.dim, dims)):
            if axis and dim.dim_param and isinstance(given, int):
                shared[dim.dim_param] = given
    return shared


def free_batch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: the model takes any batch size where its graph allows it, including a model exported
    with a fixed batch ``B`` (TorchScript and dynamo write batch-dependent shapes as constants then):

    - a ``Reshape`` of data whose constant target holds the batch (``[1, 197, 3, 4, 16]``, older
      exports' ``[1, -1]``) reads a target with ``0`` (copy the input's batch axis) or ``-1`` there;
      ``allowzero=1`` is respected (a ``0`` there would be a literal zero: ``-1`` is written);
    - a constant concatenated with data along another axis (timm's class token, folded from
      ``expand(B, -1, -1)`` to ``[1, 1, C]``) is first expanded to the data's batch.

    Results at batch ``B`` are unchanged (only shapes are rewritten; Expand copies). Each node's
    output shapes are inferred at batches ``B`` and ``2B``: the axis that doubles holds the batch.
    A node of a fixed-batch file that cannot take another batch and is none of the above is
    refused by name."""
    graph = model.graph
    probes = _BatchProbes(model)
    if not probes.inputs:
        return model, False
    changed = False
    position = 0
    while position < len(graph.node):
        node = graph.node[position]
        if node.op_type == "Reshape" and _free_reshape(node, probes):
            changed = True
        elif node.op_type == "Concat" and not node.domain:
            added = _expand_concatenated_constants(node, probes, {o: n for n in graph.node for o in n.output})
            for offset, extra in enumerate(added):
                graph.node.insert(position + offset, extra)
                probes.infer(extra)
            position += len(added)
            changed |= bool(added)
        probes.infer(node)
        position += 1
    graph.initializer.extend(probes.added)
    fixed = [i for i in graph.input if i.name in probes.inputs and i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if fixed and probes.blocked:
        _refuse_unsupported_ops(model, probes.inputs)  # the file's first refusal, if it has one
        node = probes.blocked[0]
        raise CompileError(f"the model was exported with a fixed batch of {probes.batch} (input '{fixed[0].name}'), and "
                           f"{node.op_type} node '{node.name}' cannot take another batch; export it again with a "
                           "dynamic batch (torch.onnx.export(..., dynamic_axes={'x': {0: 'N'}}) or dynamic_shapes)")
    return model, changed


def _refuse_unsupported_ops(model: onnx.ModelProto, inputs: Sequence[str]) -> None:
    """Raise ``UnsupportedOpsError`` for the nodes between ``inputs`` and the outputs that no rule
    covers (what ``planning.plan`` says first of such a file), if there are any."""
    graph = GraphView(model)
    above = graph.ancestors(graph.outputs)
    flow = [node for source in inputs for node in graph.data_flow(source)[0] if node.name in above]
    missing = unsupported(flow)
    if missing:
        raise UnsupportedOpsError(missing)


class _BatchProbes:
    """Every tensor's dims at the file's batch ``B`` and at ``2B``, inferred node by node (nodes are
    fed to ``infer`` in order); a tensor whose dims are not all known at both is left out."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opsets = {o.domain: o.version for o in model.opset_import}
        self.opset_import = list(model.opset_import)
        self.initializers = {t.name: t for t in graph.initializer}
        self.dims: tuple[dict[str, list[int]], dict[str, list[int]]] = ({}, {})
        self.types: dict[str, int] = {}
        self.values: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        for tensor in graph.initializer:
            self._set(tensor.name, tensor.data_type, list(tensor.dims), list(tensor.dims))
        self.inputs: list[str] = []
        self.batch = 1
        for info in graph.input:
            tensor = info.type.tensor_type
            if info.name in self.initializers or tensor.elem_type not in _IMAGE_TYPES or \
                    not tensor.HasField("shape") or len(tensor.shape.dim) < 2:
                continue
            first, *rest = tensor.shape.dim
            if not all(d.HasField("dim_value") for d in rest):
                continue
            if not self.inputs and first.HasField("dim_value") and first.dim_value > 0:
                self.batch = first.dim_value
            self.inputs.append(info.name)
            sizes = [d.dim_value for d in rest]
            self._set(info.name, tensor.elem_type, [self.batch, *sizes], [2 * self.batch, *sizes])
        #: nodes whose outputs are inferred at batch B but not at 2B: they fix the batch
        self.blocked: list[onnx.NodeProto] = []
        #: initializers made for the rewritten nodes
        self.added: list[onnx.TensorProto] = []
        #: tensor → the elements that precede each sample inside its merged batch axis (1: batch-major,
        #: ``T`` in ``[T·N, C]``), None where untold (as ``GraphView.merged_outer``)
        self.outer: dict[str, int | None] = {name: 1 for name in self.inputs}

    def _set(self, name: str, elem_type: int, small: list[int], large: list[int]) -> None:
        self.dims[0][name], self.dims[1][name], self.types[name] = small, large, elem_type

    def known(self, name: str) -> bool:
        return name in self.dims[0]

    def batch_axis(self, name: str) -> tuple[int, int] | None:
        """``(axis, factor)``: the one axis of ``name`` that doubles with the batch, holding the batch
        merged with ``factor`` other elements; None for tensors that do not hold it."""
        if not self.known(name):
            return None
        small, large = self.dims[0][name], self.dims[1][name]
        varying = [axis for axis, (a, c) in enumerate(zip(small, large)) if a != c]
        if len(varying) != 1 or large[varying[0]] != 2 * small[varying[0]] or small[varying[0]] % self.batch:
            return None
        return varying[0], small[varying[0]] // self.batch

    def add_initializer(self, tensor: onnx.TensorProto) -> str:
        """Record ``tensor`` as a new initializer of the model (``added``)."""
        if tensor.name not in self.initializers:
            self.added.append(tensor)
        self.initializers[tensor.name] = tensor
        self._set(tensor.name, tensor.data_type, list(tensor.dims), list(tensor.dims))
        return tensor.name

    def infer(self, node: onnx.NodeProto) -> None:
        """Record ``node``'s output dims at both batches, where ONNX's shape inference tells them."""
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute) or \
                not all(not name or self.known(name) for name in node.input):
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opsets.get(node.domain, 1), node.domain)
        except onnx.defs.SchemaError:
            return
        small = {name: self.initializers[name] for name in node.input
                 if name in self.initializers and np.prod(self.initializers[name].dims) <= _SHAPE_VALUE_SIZE}
        values = [self._shape_values(node, dims, small) for dims in self.dims]
        results = []
        for dims, data in zip(self.dims, values):
            types = {name: helper.make_tensor_type_proto(self.types[name], dims[name]) for name in node.input if name}
            data = {**small, **{name: numpy_helper.from_array(value, name) for name, value in data.items()}}
            try:
                results.append(shape_inference.infer_node_outputs(schema, node, types, data,
                                                                  opset_imports=self.opset_import))
            except Exception:  # noqa: BLE001 - an op ONNX cannot infer here: its outputs stay unknown
                if results:
                    self.blocked.append(node)
                return
        for name in node.output:
            shapes = [result.get(name) for result in results]
            if not name or any(t is None or not t.tensor_type.HasField("shape") for t in shapes):
                continue
            small, large = ([d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
                            for t in shapes)
            if None not in small and None not in large:
                self._set(name, shapes[0].tensor_type.elem_type, small, large)
                self.outer[name] = self._outer(node, name)

    def _outer(self, node: onnx.NodeProto, output: str) -> int | None:
        """``outer`` of ``output``: through a Reshape or Flatten, the elements before the batch in flat
        order less the whole axes before its batch axis; else the same as an input's merged alike."""
        batch = self.batch_axis(output)
        if batch is None or batch[1] == 1:
            return 1
        held = [(name, self.batch_axis(name)) for name in node.input if name and self.batch_axis(name)]
        if node.op_type in ("Reshape", "Flatten") and held:
            source, (axis_in, _) = held[0]
            inner = self.outer.get(source)
            if inner is None:
                return None
            elements = int(np.prod(self.dims[0][source][:axis_in])) * inner
            whole = int(np.prod(self.dims[0][output][:batch[0]]))
            return elements // whole if elements % whole == 0 and batch[1] % (elements // whole) == 0 else None
        same = [self.outer.get(name) for name, (_, factor) in held if factor == batch[1]]
        return same[0] if same else None

    def _shape_values(self, node: onnx.NodeProto, dims: dict[str, list[int]],
                      constants: Mapping[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
        """The values of ``node``'s inputs that are shape values at this batch (``Shape`` outputs and
        arithmetic on them and on constants: TorchScript's ``flatten`` and ``expand`` targets), after
        recording its own outputs' where it computes one."""
        known = self.values[0] if dims is self.dims[0] else self.values[1]
        inputs = {name: known[name] for name in node.input if name in known}
        if node.op_type == "Shape" and not node.domain:
            attributes = {a.name: a.i for a in node.attribute}
            shape = dims[node.input[0]]
            known[node.output[0]] = np.array(shape[attributes.get("start", 0):attributes.get("end", len(shape))],
                                             np.int64)
        elif node.op_type in _SHAPE_ARITHMETIC and not node.domain and node.input and \
                all(not name or name in inputs or name in constants for name in node.input):
            feeds = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
                     for name, value in inputs.items()]
            try:
                results = evaluator([node], list(node.output), dict(constants), self.opset_import, feeds).run(None, inputs)
            except Exception:  # noqa: BLE001 - not evaluable here: the outputs' values stay unknown
                return inputs
            for name, value in zip(node.output, results):
                if np.asarray(value).size <= _SHAPE_VALUE_SIZE:
                    known[name] = np.asarray(value)
        return inputs


def _allowzero(node: onnx.NodeProto) -> bool:
    """Whether a Reshape's ``0`` entries are literal zeros (``allowzero=1``, opset 14+) rather than copies."""
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def _free_reshape(node: onnx.NodeProto, probes: _BatchProbes) -> bool:
    """Point a Reshape whose constant target holds the batch at one that follows it (see ``free_batch``).

    A target that still fits the input at batch ``2B`` is kept, unless it holds the batch as a
    literal ``B`` where the plain batch belongs (older exports' ``[1, -1]``). Otherwise the batch block
    of the input (after ``P = ∏ dims[:axis]`` outer elements) becomes the first target axis ``j``
    with ``∏ target[:j] = P`` (not the last, the features, unless the batch was last): row-major
    order keeps each sample's elements together there, as at batch ``B``; failing that, the first
    axis ``j`` that holds the batch after ``P / ∏ target[:j]`` of its elements (``[T·N, C]``)."""
    data, shape = node.input[0], node.input[1] if len(node.input) > 1 else ""
    batch = probes.batch_axis(data)
    if batch is None or shape not in probes.initializers:
        return False
    allowzero = _allowzero(node)
    target = numpy_helper.to_array(probes.initializers[shape]).astype(np.int64)
    small, large = probes.dims[0][data], probes.dims[1][data]
    explicit = _explicit_target(target, small, allowzero)
    if target.ndim != 1 or (explicit < 0).any() or int(np.prod(explicit)) != int(np.prod(small)):
        return False
    if probes.outer.get(data) is None:
        return False  # where the batch sits inside its merged axis is untold
    outer = int(np.prod(small[:batch[0]])) * probes.outer[data]
    last_in = batch[0] == len(small) - 1
    # batch-major: the batch starts target axis j; not the last axis (the features a MatMul reads)
    # unless it was the input's last axis too
    axes = [j for j in range(len(explicit)) if int(np.prod(explicit[:j])) == outer
            and explicit[j] > 0 and explicit[j] % probes.batch == 0 and (j < len(explicit) - 1 or last_in)]
    # else merged after other elements of axis j (``[T·N, C]``: torch's MultiheadAttention)
    axes += [j for j in range(len(explicit)) if outer % int(np.prod(explicit[:j])) == 0
             and explicit[j] % (outer // int(np.prod(explicit[:j])) * probes.batch) == 0]
    if not axes:
        return False
    axis = axes[0]
    resolved = _explicit_target(target, large, allowzero)
    follows = (resolved >= 0).all() and int(np.prod(resolved)) == int(np.prod(large))
    literal_batch = batch[1] == 1 and target[axis] == explicit[axis] == probes.batch
    if follows and not (literal_batch and resolved[axis] == explicit[axis]):
        # the target already takes the batch: kept, even where the batch merges after other
        # elements (``[T·N, C]`` of torch's MultiheadAttention), which batch 1 alone cannot tell
        return False
    freed = explicit.copy()
    copies = axis == batch[0] and explicit[axis] == small[axis] and not allowzero
    freed[axis] = 0 if copies else -1
    node.input[1] = probes.add_initializer(numpy_helper.from_array(freed, f"{node.name}/batch_free"))
    return True


def _expand_concatenated_constants(node: onnx.NodeProto, probes: _BatchProbes,
                                   producers: Mapping[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes that expand each batch-less input of a Concat to the batch of its data inputs (see
    ``free_batch``), the inputs pointed at them; none where nothing needs it. At a file batch
    ``B > 1`` the input is itself an ``Expand`` of one copy (the class token): that copy is expanded."""
    held = [(name, probes.batch_axis(name)) for name in node.input]
    data = [(name, batch) for name, batch in held if batch is not None]
    if not data:
        return []
    reference, (batch_axis, _) = data[0]
    rank = len(probes.dims[0][reference])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % rank
    if axis == batch_axis:
        return []
    size = probes.dims[0][reference][batch_axis]
    added: list[onnx.NodeProto] = []
    for index, (name, batch) in enumerate(held):
        dims = probes.dims[0].get(name)
        if batch is not None or dims is None or len(dims) != rank or dims[batch_axis] != size:
            continue
        source = name
        if dims[batch_axis] != 1:  # B copies of one entry: expand the one entry instead
            producer = producers.get(name)
            single = producer.input[0] if producer is not None and producer.op_type == "Expand" else ""
            single_dims = probes.dims[0].get(single)
            if single_dims is None or len(single_dims) != rank or single_dims[batch_axis] != 1:
                continue
            source = single
        prefix = f"{node.name}/batch_expand_{index}"

        def ints(key: str, values: list[int], prefix: str = prefix) -> str:
            return probes.add_initializer(numpy_helper.from_array(np.array(values, np.int64), f"{prefix}/{key}"))

        pieces = [ints("before", dims[:batch_axis])] if batch_axis else []
        pieces.append(f"{prefix}/batch")
        pieces += [ints("after", dims[batch_axis + 1:])] if batch_axis + 1 < rank else []
        added += [helper.make_node("Shape", [reference], [f"{prefix}/shape"], name=f"{prefix}/shape"),
                  helper.make_node("Slice", [f"{prefix}/shape", ints("start", [batch_axis]),
                                             ints("end", [batch_axis + 1])], [f"{prefix}/batch"], name=f"{prefix}/batch"),
                  helper.make_node("Concat", pieces, [f"{prefix}/dims"], name=f"{prefix}/dims", axis=0),
                  helper.make_node("Expand", [source, f"{prefix}/dims"], [f"{prefix}/value"], name=f"{prefix}/value")]
        large = list(dims)
        large[batch_axis] *= 2
        probes._set(f"{prefix}/value", probes.types[name], list(dims), large)
        node.input[index] = f"{prefix}/value"
    return added


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
#: Token ids and attention masks: integer ``[N, T]`` inputs of text models.
_TOKEN_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
_IMAGE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
           onnx.TensorProto.BFLOAT16, onnx.TensorProto.UINT8}


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large float initializers turned into inputs of the same type and shape.

    Shape inference and the checker read only their shapes; serialising hundreds of MB of
    weights for them would dominate the compile time.
    """
    graph = model.graph
    skeleton = helper.make_graph(list(graph.node), graph.name, list(graph.input), list(graph.output),
                                 value_info=list(graph.value_info))
    for tensor in graph.initializer:
        if tensor.data_type in _IMAGE_TYPES and np.prod(tensor.dims, dtype=np.int64) > 256:
            skeleton.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            skeleton.initializer.append(tensor)
    return helper.make_model(skeleton, opset_imports=list(model.opset_import), ir_version=model.ir_version)


#: Two small batch sizes: shapes inferred at both tell which dims carry the batch (a dim that is
#: ``b·k`` at batch ``b`` is the batch merged with ``k`` other elements, batch-major). Small, so
#: that nothing shape inference evaluates (``Range(0, N)``…) is materialised at a made-up size.
PROBE_BATCHES = (2, 3)


def _infer_at_batch(skeleton: onnx.ModelProto, batch: int, strict: bool) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(skeleton)
    for info in probe.graph.input:
        dims = info.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param == BATCH_DIM:
            dims[0].Clear()
            dims[0].dim_value = batch
    return shape_inference.infer_shapes(probe, check_type=True, strict_mode=strict, data_prop=True)


def _merged_dim(small: onnx.TensorShapeProto.Dimension, large: onnx.TensorShapeProto.Dimension,
                target: onnx.TensorShapeProto.Dimension) -> None:
    """Write into ``target`` what the same dim inferred at the two probe batches says."""
    first, second = PROBE_BATCHES
    if small.HasField("dim_value") and large.HasField("dim_value"):
        a, c = small.dim_value, large.dim_value
        target.Clear()
        if a == c:
            target.dim_value = a
        elif a % first == 0 and a // first * second == c:
            target.dim_param = batch_dim(a // first)
        return  # any other dependence on the batch: unknown
    if not (small.HasField("dim_param") and large.HasField("dim_param") and small.dim_param == large.dim_param):
        target.Clear()


def _infer_with_named_batch(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """Shape inference with the batch axis named ``N`` (or ``N*k`` where it is merged with ``k``
    other elements) in every result.

    Inferring with a symbolic batch loses it through broadcasts and reshapes (``[N, -1]`` of an
    ``[N, C, H, W]`` tensor has an unknown second axis). Inferring at two small batch sizes and
    comparing keeps every axis known and tells where the batch went (after a Transpose, merged
    into the tokens…).
    """
    skeleton = weightless(model)
    del skeleton.graph.value_info[:]
    for info in skeleton.graph.output:  # re-inferred: stale batch sizes would clash
        info.type.tensor_type.ClearField("shape")
    small, large = (_infer_at_batch(skeleton, batch, strict) for batch in PROBE_BATCHES)
    other = {info.name: info for info in [*large.graph.value_info, *large.graph.output, *large.graph.input]}
    for info in [*small.graph.value_info, *small.graph.output, *small.graph.input]:
        twin = other.get(info.name)
        shape = info.type.tensor_type.shape
        if twin is None or len(twin.type.tensor_type.shape.dim) != len(shape.dim):
            info.type.tensor_type.ClearField("shape")
            continue
        for dim, twin_dim in zip(shape.dim, twin.type.tensor_type.shape.dim):
            _merged_dim(dim, twin_dim, dim)
    return small


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: ``graph.value_info`` and the outputs hold the inferred type and shape of every tensor,
    the batch axis named ``N``. Also run on the compiled model: ONNX Runtime's memory planner
    cannot match buffers whose batch axis it lost, and took 20 s instead of 2 to load a
    ResNet-50 sized explanation graph without these annotations."""
    try:
        inferred = _infer_with_named_batch(model, strict=True)
    except Exception as error:
        lines = str(error).strip().splitlines()
        first = lines[0] + (f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else "") if lines else ""
        raise CompileError(f"shape inference failed at batch sizes {' and '.join(map(str, PROBE_BATCHES))}: "
                           f"{first}") from error
    declared = {info.name: info for info in model.graph.output}
    for info in inferred.graph.output:  # what inference cannot tell (behind a custom-domain op): as the file says
        _keep_declared_shape(info, declared.get(info.name))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model, True


def _keep_declared_shape(info: onnx.ValueInfoProto, declared: onnx.ValueInfoProto | None) -> None:
    """Give an output whose shape inference left it unknown the file's declared shape, its first
    dim (the batch of a classifier's scores) named ``N``."""
    if declared is None or info.type.tensor_type.HasField("shape") or \
            not declared.type.tensor_type.HasField("shape") or not declared.type.tensor_type.shape.dim:
        return
    info.type.tensor_type.shape.CopyFrom(declared.type.tensor_type.shape)
    if not info.type.tensor_type.elem_type:
        info.type.tensor_type.elem_type = declared.type.tensor_type.elem_type
    batch = info.type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_param = BATCH_DIM


#: Ops a shape computation is made of (TorchScript's and TensorFlow converters' arithmetic on
#: ``Shape`` outputs); a value computed from anything else is not folded.
_SHAPE_ARITHMETIC = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul", "Div", "Mod",
                     "Floor", "Ceil", "Max", "Min", "Neg", "Abs", "Equal", "Less", "Greater", "LessOrEqual",
                     "GreaterOrEqual", "Not", "And", "Or", "Where", "Range", "ConstantOfShape", "Reshape", "Expand",
                     "Identity", "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Sqrt", "Pow", "Tile",
                     "Transpose", "Sign", "Clip", "Size"}
#: Shape values are short: anything longer is data and stays computed.
_SHAPE_VALUE_SIZE = 64


def _dims_at(info: onnx.ValueInfoProto | None, batch: int) -> list[int] | None:
    """A tensor's dims at batch size ``batch``; None if any dim is unknown."""
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in info.type.tensor_type.shape.dim:
        factor = batch_factor(dim.dim_param) if dim.HasField("dim_param") else None
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif factor is not None:
            dims.append(batch * factor)
        else:
            return None
    return dims


class _ShapeValues:
    """Evaluates tensors computed only from ``Shape`` outputs and constants, at each probe batch
    (also small ones behind ``ConstantOfShape``, which ``fold_constants`` leaves alone for size)."""

    def __init__(self, model: onnx.ModelProto, size: int = _SHAPE_VALUE_SIZE) -> None:
        graph = model.graph
        self.size = size
        self.model = model
        self.infos = {info.name: info for info in [*graph.input, *graph.value_info]}
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.order = {id(n): i for i, n in enumerate(graph.node)}
        self._cache: dict[str, list[np.ndarray] | None] = {}
        #: tensor → the tensors whose ``Shape`` its value is computed from
        self.sources: dict[str, list[str]] = {}

    def values(self, tensor: str) -> list[np.ndarray] | None:
        """``tensor``'s value at each of ``PROBE_BATCHES``, or None if it is not a shape value."""
        if tensor not in self._cache:
            self._cache[tensor] = self._evaluate(tensor)
        return self._cache[tensor]

    def _evaluate(self, tensor: str) -> list[np.ndarray] | None:
        needed, shapes, stack, seen = [], [], [tensor], set()
        while stack:
            name = stack.pop()
            if not name or name in seen or name in self.initializers:
                continue
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type == "Shape":
                shapes.append(node)
            elif node.op_type in _SHAPE_ARITHMETIC:
                needed.append(node)
                stack.extend(node.input)
            else:
                return None
        needed.sort(key=lambda n: self.order[id(n)])
        results = []
        for batch in PROBE_BATCHES:
            feeds = {}
            for node in shapes:
                dims = _dims_at(self.infos.get(node.input[0]), batch)
                if dims is None:
                    return None
                attrs = {a.name: a.i for a in node.attribute}
                feeds[node.output[0]] = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)
            try:
                if tensor in feeds:
                    value = feeds[tensor]
                else:
                    inputs = [helper.make_tensor_value_info(k, onnx.TensorProto.INT64, v.shape) for k, v in feeds.items()]
                    run = evaluator(needed, [tensor], self.initializers, self.model.opset_import, inputs)
                    value = np.asarray(run.run(None, feeds)[0])
            except Exception:  # not evaluable here: left to shape inference and the runtime
                return None
            if value.size > self.size:
                return None
            results.append(value)
        self.sources[tensor] = [node.input[0] for node in shapes]
        return results

    def batch_expression(self, tensor: str, values: list[np.ndarray], prefix: str) -> list[onnx.NodeProto] | None:
        """Nodes that compute ``tensor``'s value as ``Concat(constants, Shape(source)[axis]·k, constants)``
        when one entry of it is the batch times ``k`` (the rest constant): a form ONNX's shape
        inference propagates, unlike ``Where``/``Equal`` chains (timm's ``expand(B, -1, -1)``)."""
        small, large = values
        if small.ndim != 1 or small.shape != large.shape or small.dtype != np.int64:
            return None
        varying = np.flatnonzero(small != large).tolist()
        first, second = PROBE_BATCHES
        if len(varying) != 1 or small[varying[0]] % first or small[varying[0]] // first * second != large[varying[0]]:
            return None
        position, factor = varying[0], small[varying[0]] // first
        for source in self.sources.get(tensor, []):
            info = self.infos.get(source)
            dims = info.type.tensor_type.shape.dim if info is not None else []
            batch = [(axis, batch_factor(d.dim_param)) for axis, d in enumerate(dims) if d.HasField("dim_param")
                     and batch_factor(d.dim_param) is not None]
            if len(batch) != 1 or factor % batch[0][1]:
                continue
            axis, multiple = batch[0][0], factor // batch[0][1]
            names = {k: f"{prefix}/{k}" for k in ("shape", "batch", "scaled", "before", "after", "axis", "next",
                                                     "multiple")}
            constants = {"before": small[:position], "after": small[position + 1:], "axis": np.array([axis]),
                         "next": np.array([axis + 1]), "multiple": np.array([multiple])}
            for key, value in constants.items():
                self.initializers[names[key]] = numpy_helper.from_array(np.asarray(value, np.int64), names[key])
            nodes = [helper.make_node("Shape", [source], [names["shape"]], name=names["shape"]),
                     helper.make_node("Slice", [names["shape"], names["axis"], names["next"]], [names["batch"]],
                                      name=names["batch"]),
                     helper.make_node("Mul", [names["batch"], names["multiple"]], [names["scaled"]],
                                      name=names["scaled"]),
                     helper.make_node("Concat", [names["before"], names["scaled"], names["after"]], [f"{prefix}/value"],
                                      name=f"{prefix}/value", axis=0)]
            return nodes
        return None


def _explicit_target(target: np.ndarray, source: list[int] | None, allowzero: bool = False) -> np.ndarray:
    """A Reshape target with its ``0`` (copy, unless ``allowzero``: then a literal zero) and ``-1``
    (infer) entries resolved against the input's dims ``source``, where they are known."""
    if source is None:
        return target
    explicit = np.array([source[i] if d == 0 and i < len(source) and not allowzero else d
                         for i, d in enumerate(target)], np.int64)
    if (explicit == -1).sum() == 1:
        known = int(np.prod(explicit[explicit != -1]))
        if known and np.prod(source) % known == 0:
            explicit[explicit == -1] = np.prod(source) // known
    return explicit


def _reshape_target(values: list[np.ndarray], source: onnx.ValueInfoProto | None,
                    allowzero: bool = False) -> np.ndarray | None:
    """A constant Reshape target equivalent to ``values`` (the target at each probe batch), where
    at most one entry depends on the batch: ``0`` there when it copies the input's own dim (the
    same batch at the same axis), else ``-1``; None when no constant target says the same."""
    if values[0].ndim != 1 or values[0].shape != values[1].shape:
        return None
    small, large = (_explicit_target(value, _dims_at(source, batch), allowzero)
                    for value, batch in zip(values, PROBE_BATCHES))
    varying = np.flatnonzero(small != large).tolist()
    if not varying:
        return values[0]
    if len(varying) > 1:
        return None
    axis = varying[0]
    first, second = PROBE_BATCHES
    if small[axis] % first or small[axis] // first * second != large[axis]:
        return None  # not the batch times a constant
    factor = small[axis] // first
    source_dims = source.type.tensor_type.shape.dim if source is not None else []
    if axis < len(source_dims) and source_dims[axis].dim_param == batch_dim(factor) and not allowzero:
        target = values[0].copy()
        target[axis] = 0
        return target if (target == -1).sum() <= 1 else None
    if (small < 0).any() or (small == 0).any():
        return None  # an entry left unresolved: no second -1 can stand beside it
    target = small.copy()
    target[axis] = -1
    return target


def fold_shape_arithmetic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: an input computed only from ``Shape`` outputs and constants (TorchScript's
    ``x.reshape(n, g, c // g, h, w)``, TensorFlow converters' SAME padding ``Shape → Gather → … →
    Pad``, ``Range``/``Expand`` sizes) is a constant wherever its value does not depend on the
    batch, given the inferred non-batch dims; a Reshape target that depends on the batch at one
    position reads a constant with ``0`` (the input's own batch axis) or ``-1`` there. Shape
    inference cannot divide symbolic sizes; here each computation is evaluated at the two probe
    batch sizes, which tells what depends on the batch."""
    graph = model.graph
    shape_values = _ShapeValues(model)
    changed = False
    rewritten: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for node in graph.node:
        for index, tensor in enumerate(node.input):
            if not tensor or tensor in shape_values.initializers:
                continue
            values = shape_values.values(tensor)
            if values is None:
                continue
            if node.op_type == "Reshape" and index == 1:
                value = _reshape_target(values, shape_values.infos.get(node.input[0]), _allowzero(node))
            else:
                value = values[0] if np.array_equal(values[0], values[1]) else None
            if value is None:
                rewritten.extend(_rewrite_batch_expression(shape_values, node, index, values))
                continue
            # a Reshape target gets its own name (it may differ from the tensor's value: 0 and -1 entries);
            # its data input, when computed from shapes too (BEiT's relative position index), is the value
            name = f"{node.name}/folded_shape" if node.op_type == "Reshape" and index == 1 else f"{tensor}/folded"
            if name not in shape_values.initializers:
                graph.initializer.append(numpy_helper.from_array(np.asarray(value, values[0].dtype), name))
                shape_values.initializers[name] = graph.initializer[-1]
            node.input[index] = name
            changed = True
    for consumer, nodes in rewritten:  # each before the node it now feeds, keeping the order topological
        position = list(graph.node).index(consumer)
        for offset, added in enumerate(nodes):
            graph.node.insert(position + offset, added)
        changed = True
    known = {t.name for t in graph.initializer}
    graph.initializer.extend(t for name, t in shape_values.initializers.items() if name not in known)
    return model, changed


def _rewrite_batch_expression(shape_values: _ShapeValues, node: onnx.NodeProto, index: int,
                              values: list[np.ndarray]) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """Point input ``index`` of ``node`` at an equivalent ``Shape → Slice → Mul → Concat`` of its
    batch-dependent value, where it has one (see ``_ShapeValues.batch_expression``)."""
    if node.op_type not in ("Expand", "Tile", "ConstantOfShape", "Range"):
        return []
    nodes = shape_values.batch_expression(node.input[index], values, f"{node.name}/batch_shape_{index}")
    if nodes is None or node.input[index] == nodes[-1].output[0]:
        return []
    node.input[index] = nodes[-1].output[0]
    return [(node, nodes)]


#: Index tensors up to this size (at the larger probe batch) are checked for being the identity.
_INDEX_SIZE = 1 << 22


def strided_gathers_to_reshapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: no ``Gather`` picks every element of a flat tensor in order with indices computed from
    the batch size (torch's dynamo exporter writes ``as_strided`` of a contiguous tensor that way,
    ``Range(0, N)`` included); each such gather is the ``Reshape`` it amounts to, with ``-1`` at
    the batch, which the rules can follow."""
    graph = model.graph
    index_values = _ShapeValues(model, _INDEX_SIZE)
    changed = False
    for position, node in enumerate(list(graph.node)):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        data = index_values.infos.get(node.input[0])
        if axis != 0 or data is None or len(data.type.tensor_type.shape.dim) != 1:
            continue
        values = index_values.values(node.input[1])
        if values is None or any(v.ndim < 1 or not np.array_equal(v.reshape(-1), np.arange(v.size)) for v in values):
            continue
        small, large = (v.shape for v in values)
        varying = [i for i, (a, c) in enumerate(zip(small, large)) if a != c]
        if len(small) != len(large) or len(varying) > 1:
            continue
        target = np.array([-1 if i in varying else d for i, d in enumerate(small)], np.int64)
        name = f"{node.name}/as_reshape"
        graph.initializer.append(numpy_helper.from_array(target, name))
        graph.node.remove(node)
        graph.node.insert(position, helper.make_node("Reshape", [node.input[0], name], list(node.output), name=node.name))
        changed = True
    return model, changed


def prune_dead_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: every node's output is read by another node or is a graph output (folding shape
    computations leaves the ``Shape → Gather → …`` chains behind them unread)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    kept = list(graph.node)
    while True:
        read = outputs | {i for n in kept for i in n.input}
        read |= {i for n in kept for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for i in _graph_reads(a.g)}
        alive = [n for n in kept if any(o in read for o in n.output if o)]
        if len(alive) == len(kept):
            break
        kept = alive
    changed = len(kept) != len(graph.node)
    if changed:
        del graph.node[:]
        graph.node.extend(kept)
    return model, changed


def canonicalise(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int | str]] | None = None) -> onnx.ModelProto:
    """Run every pass in order; see each pass for what it guarantees."""
    model, _ = drop_initializer_inputs(model)
    model, _ = constants_to_initializers(model)
    model, _ = upgrade_opset(model)
    model, _ = constants_to_initializers(model)  # the version converter's own Constant nodes (opset < 11)
    model, _ = name_nodes(model)
    model, _ = fold_constants(model)
    model, _ = free_batch(model)
    model, _ = set_input_shapes(model, input_shapes or {})
    model = _infer_input_shapes(model)
    for _ in range(64):  # each fold can make the next reshape's input shape known (Swin: one stage a round)
        model, folded = fold_shape_arithmetic(model)
        model, reshaped = strided_gathers_to_reshapes(model)
        if not (folded or reshaped):
            break
        model, _ = prune_dead_nodes(model)
        model, _ = fold_constants(model)
        model = _infer_input_shapes(model)
    return model


def _infer_input_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``infer_shapes`` of the model as given, where a failure is the input's, not the compiler's (a
    fixed batch that ``free_batch`` could not free is refused there, by name)."""
    return infer_shapes(model)[0]
