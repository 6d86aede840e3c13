"""Canonicalisation passes: each takes a model, returns ``(model, changed)``, and states what holds
after it ran. ``canonicalise`` runs them in order. None of them changes what the original
outputs compute: values move between nodes and initializers, opsets change versions, names
are added, nothing is recomputed differently."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

from .builder import TARGET_OPSET
from .errors import CompileError
from .graph import BATCH_DIM, batch_dim, batch_factor, evaluator

#: IR version written with TARGET_OPSET (opset 17 came with IR 8).
TARGET_IR_VERSION = 8

#: Ops whose folded output can be far larger than their inputs (the onnx zoo stores weights
#: as ConstantOfShape): folding them would bloat the file, so their outputs stay computed.
_EXPANDING_OPS = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample"}


def load(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Read a model file (external data included) or copy a ``ModelProto``.

    After: a ``ModelProto`` whose tensors hold their data in memory.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise CompileError(f"initializer '{tensor.name}' has external data; pass the model's "
                                   "file path instead of a loaded ModelProto")
        return model
    path = os.fspath(model_or_path)
    if not os.path.isfile(path):
        raise CompileError(f"{path}: no such model file")
    try:
        return onnx.load(path, load_external_data=True)
    except Exception as error:  # protobuf raises several unrelated types on bad files
        raise CompileError(f"{path}: not a readable ONNX model ({error})") from error


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


def expand_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: no ``Gelu`` node (opset 20; torch's dynamo exporter writes it at its default opset): each
    is written out as opset-17 ops, ``x · ½(1 + erf(x/√2))`` or, with ``approximate="tanh"``,
    ``x · ½(1 + tanh(√(2/π)(x + 0.044715 x³)))`` — the forms TorchScript exports, which the
    rules know (a gate ``x · s(x)``). ONNX has no earlier version of Gelu to convert it to."""
    graph, changed = model.graph, False
    constants: dict[str, float] = {}

    def const(name: str, value: float) -> str:
        constants[name] = value
        return name

    nodes = []
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        approximate = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "approximate"),
                           b"none")
        x, y, base = node.input[0], node.output[0], node.name or f"gelu_{len(nodes)}"

        def named(op: str, inputs: list[str], output: str | None = None, base: str = base) -> str:
            output = output or f"{base}/{op}_{len(nodes)}"
            nodes.append(helper.make_node(op, inputs, [output], name=output))
            return output

        if approximate == b"tanh":
            cube = named("Mul", [x, named("Mul", [x, x])])
            inner = named("Add", [x, named("Mul", [cube, const("agf_onnx/gelu/0.044715", 0.044715)])])
            gate = named("Tanh", [named("Mul", [inner, const("agf_onnx/gelu/sqrt(2/pi)", float(np.sqrt(2 / np.pi)))])])
        else:
            gate = named("Erf", [named("Div", [x, const("agf_onnx/gelu/sqrt(2)", float(np.sqrt(2.0)))])])
        gate = named("Add", [gate, const("agf_onnx/gelu/1", 1.0)])
        named("Mul", [named("Mul", [x, gate]), const("agf_onnx/gelu/0.5", 0.5)], y)
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
        known = {t.name for t in graph.initializer}
        graph.initializer.extend(numpy_helper.from_array(np.array(value, np.float32), name)
                                 for name, value in constants.items() if name not in known)
    return model, changed


def convert_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: the model imports ``ai.onnx`` at TARGET_OPSET and is written with IR 8.

    Older models are upgraded and newer ones downgraded: ONNX Runtime registers several CUDA
    kernels only up to opset 17/18 (README, "Opset").
    """
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise CompileError("the model imports no ai.onnx opset")
    changed = version != TARGET_OPSET
    if changed:
        weights = {t.name: t for t in model.graph.initializer}
        skeleton = weightless(model)  # converted without its large weights: the converter serialises what it gets
        unchanged = version > TARGET_OPSET and _hide_unchanged_ops(skeleton)
        try:
            converted = version_converter.convert_version(skeleton, TARGET_OPSET)
        except Exception as error:
            raise CompileError(f"cannot convert the model from opset {version} to {TARGET_OPSET}: "
                               f"{error}") from error
        _restore_hidden_ops(converted, unchanged)
        graph = converted.graph
        moved = [i for i in graph.input if i.name in weights and i.name not in
                 {t.name for t in graph.initializer}]
        for info in moved:
            graph.input.remove(info)
            graph.initializer.append(weights[info.name])
        converted.ir_version = model.ir_version
        converted.producer_name, converted.producer_version = model.producer_name, model.producer_version
        converted.doc_string = model.doc_string
        converted.metadata_props.extend(model.metadata_props)
        model = converted
        if version > TARGET_OPSET:
            _drop_newer_default_attributes(model, version)
    if model.ir_version != TARGET_IR_VERSION:
        model.ir_version, changed = TARGET_IR_VERSION, True
    return model, changed


#: A domain the version converter leaves alone, for ops it has no down-conversion for although
#: the node means the same at TARGET_OPSET.
_HIDDEN_DOMAIN = "agf_onnx.unchanged"


def _means_the_same_at_target(node: onnx.NodeProto) -> bool:
    """Pad 18+ without ``axes`` and without the ``wrap`` mode (19) is Pad 13 (torch's dynamo
    exports write Pad at opset 18; ONNX's converter has no 18 → 17 step for it)."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx"):
        return False
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
    return (len(node.input) < 4 or not node.input[3]) and mode != b"wrap"


def _hide_unchanged_ops(model: onnx.ModelProto) -> bool:
    hidden = [node for node in model.graph.node if _means_the_same_at_target(node)]
    for node in hidden:
        node.domain = _HIDDEN_DOMAIN
    if hidden:
        model.opset_import.append(helper.make_opsetid(_HIDDEN_DOMAIN, 1))
    return bool(hidden)


def _restore_hidden_ops(model: onnx.ModelProto, hidden: bool) -> None:
    if not hidden:
        return
    for node in model.graph.node:
        if node.domain == _HIDDEN_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _HIDDEN_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _drop_newer_default_attributes(model: onnx.ModelProto, source: int) -> None:
    """The converter's downgrades keep attributes that newer op versions added (ReduceMean 18's
    ``noop_with_empty_axes``); one holding its default is dropped, any other value refused."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            known = onnx.defs.get_schema(node.op_type, TARGET_OPSET).attributes
            newer = onnx.defs.get_schema(node.op_type, source).attributes
        except onnx.defs.SchemaError:
            continue
        for attribute in list(node.attribute):
            if attribute.name in known:
                continue
            default = newer.get(attribute.name)
            if default is not None and default.default_value.ByteSize() and \
                    helper.get_attribute_value(default.default_value) == helper.get_attribute_value(attribute):
                node.attribute.remove(attribute)
            else:
                raise CompileError(f"{node.op_type} node '{node.name}': attribute '{attribute.name}' has no "
                                   f"equivalent at opset {TARGET_OPSET}")


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
        del graph.initializer[:]
        graph.initializer.extend(t for name, t in values.items() if name in used)
        changed = True
    return model, changed


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
    """After: no ``Reshape`` of input-dependent data hard-codes a batch of 1 (older exports write
    ``[1, -1]`` where they mean ``[0, -1]``); it copies the batch instead, so the model takes
    any batch size. Results for a batch of 1 are unchanged."""
    graph = model.graph
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    initializers = {t.name: t for t in graph.initializer}
    data, changed = set(inputs), False
    for node in graph.node:
        if not any(i in data for i in node.input):
            continue
        data.update(node.output)
        if node.op_type != "Reshape" or node.input[0] not in data or node.input[1] not in initializers:
            continue
        shape = numpy_helper.to_array(initializers[node.input[1]])
        if shape.ndim != 1 or len(shape) < 2 or shape[0] != 1:
            continue
        freed = shape.copy()
        freed[0] = 0
        name = f"{node.input[1]}/batch_free"
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(freed, name)
            graph.initializer.append(initializers[name])
        node.input[1] = name
        changed = True
    return model, changed


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
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model, True


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


def _explicit_target(target: np.ndarray, source: list[int] | None) -> np.ndarray:
    """A Reshape target with its ``0`` (copy) and ``-1`` (infer) entries resolved against the
    input's dims ``source``, where they are known."""
    if source is None:
        return target
    explicit = np.array([source[i] if d == 0 and i < len(source) else d for i, d in enumerate(target)], np.int64)
    if (explicit == -1).sum() == 1:
        known = int(np.prod(explicit[explicit != -1]))
        if known and np.prod(source) % known == 0:
            explicit[explicit == -1] = np.prod(source) // known
    return explicit


def _reshape_target(values: list[np.ndarray], source: onnx.ValueInfoProto | None) -> np.ndarray | None:
    """A constant Reshape target equivalent to ``values`` (the target at each probe batch), where
    at most one entry depends on the batch: ``0`` there when it copies the input's own dim (the
    same batch at the same axis), else ``-1``; None when no constant target says the same."""
    if values[0].ndim != 1 or values[0].shape != values[1].shape:
        return None
    small, large = (_explicit_target(value, _dims_at(source, batch)) for value, batch in zip(values, PROBE_BATCHES))
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
    if axis < len(source_dims) and source_dims[axis].dim_param == batch_dim(factor):
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
                value = _reshape_target(values, shape_values.infos.get(node.input[0]))
                if value is not None and _allows_zero(node):
                    if (values[0] == 0).any() or (values[1] == 0).any():
                        value = None  # a literal empty axis: left to the runtime
                    else:  # no literal 0 in the target: allowzero=0 means the same, and lets 0 copy the batch
                        _drop_attribute(node, "allowzero")
            else:
                value = values[0] if np.array_equal(values[0], values[1]) else None
            if value is None:
                rewritten.extend(_rewrite_batch_expression(shape_values, node, index, values))
                continue
            name = f"{node.name}/folded_shape" if node.op_type == "Reshape" else f"{tensor}/folded"
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


def _allows_zero(node: onnx.NodeProto) -> bool:
    """A Reshape whose target's 0 is a literal empty axis (opset 14's ``allowzero=1``, as dynamo writes)."""
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def _drop_attribute(node: onnx.NodeProto, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


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
    model, _ = expand_gelu(model)
    model, _ = convert_opset(model)
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
    """``infer_shapes`` of the model as given, where a failure is the input's, not the compiler's."""
    try:
        return infer_shapes(model)[0]
    except CompileError as error:
        raise CompileError(f"{error}; a model exported with a fixed batch size (a traced len(x) or x.shape[0]) "
                           "fails here: export it again with a dynamic batch") from error
