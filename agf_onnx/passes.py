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
from .graph import evaluator

#: IR version written with TARGET_OPSET (opset 17 came with IR 8).
TARGET_IR_VERSION = 8
BATCH_DIM = "N"

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
        try:  # converted without its large weights: the converter serialises what it gets
            converted = version_converter.convert_version(weightless(model), TARGET_OPSET)
        except Exception as error:
            raise CompileError(f"cannot convert the model from opset {version} to {TARGET_OPSET}: "
                               f"{error}") from error
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


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: no node computes only from initializers unless it expands data (``_EXPANDING_OPS``),
    so rules see weights as initializers; initializers nothing reads are gone."""
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep, changed = [], False
    for node in graph.node:
        foldable = (not node.domain and node.op_type not in _EXPANDING_OPS and node.op_type != "Constant"
                    and all(not i or i in values for i in node.input)
                    and not any(o in outputs for o in node.output) and len(node.input) > 0
                    and not node.op_type.startswith("Random"))
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
    """After: the named inputs have the given dims, and every float input of rank ≥ 2 has a
    symbolic batch dimension ``N`` (the compiled model takes any batch size)."""
    inputs = {i.name: i for i in model.graph.input}
    for name in shapes:
        if name not in inputs:
            raise CompileError(f"--input-shape: the model has no input '{name}' "
                               f"(inputs: {', '.join(inputs) or 'none'})")
    changed = False
    for name, info in inputs.items():
        tensor = info.type.tensor_type
        if name in shapes:
            dims = list(shapes[name])
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
        if tensor.elem_type in _IMAGE_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) >= 2:
            batch = tensor.shape.dim[0]
            if batch.dim_param != BATCH_DIM:
                batch.Clear()
                batch.dim_param = BATCH_DIM
                changed = True
    return model, changed


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


#: A batch size no real model uses, to tell the batch axis apart in inferred shapes.
_BATCH_SENTINEL = 1_000_003
_OTHER_SENTINEL = 1_000_033


def _infer_with_named_batch(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """Shape inference with the batch axis named ``N`` in every result.

    Inferring with a symbolic batch loses it through broadcasts and reshapes (``[N, -1]`` of an
    ``[N, C, H, W]`` tensor has an unknown second axis). Inferring with a sentinel batch size and
    renaming it afterwards (``N``, or ``N*k`` for a flattened batch) keeps every axis known.
    """
    skeleton = weightless(model)
    del skeleton.graph.value_info[:]
    for info in skeleton.graph.output:  # re-inferred: stale batch sizes would clash
        info.type.tensor_type.ClearField("shape")
    for info in skeleton.graph.input:
        dims = info.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param == BATCH_DIM:
            dims[0].Clear()
            dims[0].dim_value = _BATCH_SENTINEL
    inferred = shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=strict, data_prop=True)
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value % _BATCH_SENTINEL == 0:
                multiple = dim.dim_value // _BATCH_SENTINEL
                dim.Clear()
                dim.dim_param = BATCH_DIM if multiple == 1 else f"{BATCH_DIM}*{multiple}"
    return inferred


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: ``graph.value_info`` and the outputs hold the inferred type and shape of every tensor,
    the batch axis named ``N``. Also run on the compiled model: ONNX Runtime's memory planner
    cannot match buffers whose batch axis it lost, and took 20 s instead of 2 to load a
    ResNet-50 sized explanation graph without these annotations."""
    try:
        inferred = _infer_with_named_batch(model, strict=True)
    except Exception as error:
        raise CompileError(f"shape inference failed: {error}") from error
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model, True


def _sentinel_dims(info: onnx.ValueInfoProto) -> list[int] | None:
    """Inferred dims with the batch symbol back as the sentinel; None if any dim is unknown."""
    dims = []
    for dim in info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.dim_param == BATCH_DIM:
            dims.append(_BATCH_SENTINEL)
        elif dim.dim_param.startswith(f"{BATCH_DIM}*") and dim.dim_param[2:].isdigit():
            dims.append(_BATCH_SENTINEL * int(dim.dim_param[2:]))
        else:
            return None
    return dims


def fold_shape_arithmetic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """After: a ``Reshape`` whose target shape is computed from ``Shape`` outputs (TorchScript's
    ``x.reshape(n, g, c // g, h, w)``) reads a constant shape instead, with ``0`` copying the
    batch. Shape inference cannot divide symbolic sizes; here the computation is evaluated with
    the known sizes and a sentinel batch, which must end up alone in the batch position."""
    graph = model.graph
    shapes = {info.name: info for info in [*graph.input, *graph.value_info]}
    initializers = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    changed = False
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in initializers:
            continue
        needed, stack, feeds, ok = [], [node.input[1]], {}, True
        while stack and ok:
            tensor = stack.pop()
            if tensor in initializers or tensor in feeds or not tensor:
                continue
            source = producer.get(tensor)
            if source is None or source.op_type in _EXPANDING_OPS or source.op_type.startswith("Random"):
                ok = False
            elif source.op_type == "Shape":
                dims = _sentinel_dims(shapes[source.input[0]]) if source.input[0] in shapes else None
                ok = dims is not None
                if ok:
                    start = next((a.i for a in source.attribute if a.name == "start"), 0)
                    end = next((a.i for a in source.attribute if a.name == "end"), len(dims))
                    feeds[tensor] = np.array(dims[start:end], np.int64)
            elif source not in needed:
                needed.append(source)
                stack.extend(source.input)
        if not ok:
            continue
        order = [n for n in graph.node if n in needed]
        shape_computation = evaluator(order, [node.input[1]], initializers, model.opset_import,
                                      [helper.make_tensor_value_info(k, onnx.TensorProto.INT64, v.shape)
                                       for k, v in feeds.items()]) if order else None
        values = []
        for batch in (_BATCH_SENTINEL, _OTHER_SENTINEL):  # two batch sizes tell what depends on the batch
            batch_feeds = {k: np.where(v % _BATCH_SENTINEL == 0, v // _BATCH_SENTINEL * batch, v)
                           for k, v in feeds.items()}
            try:
                values.append(np.asarray(shape_computation.run(None, batch_feeds)[0] if shape_computation else
                                         batch_feeds[node.input[1]]).astype(np.int64))
            except Exception:  # not evaluable here: left to shape inference
                break
        if len(values) != 2 or values[0].ndim != 1:
            continue
        varying = np.flatnonzero(values[0] != values[1]).tolist()
        if varying not in ([], [0]) or (varying == [0] and (values[0][0], values[1][0]) !=
                                        (_BATCH_SENTINEL, _OTHER_SENTINEL)):
            continue  # the batch enters the shape otherwise than as axis 0: leave it computed
        value = values[0]
        if varying == [0]:
            value[0] = 0
        name = f"{node.name}/folded_shape"
        graph.initializer.append(numpy_helper.from_array(value, name))
        initializers[name] = graph.initializer[-1]
        node.input[1] = name
        changed = True
    return model, changed


def canonicalise(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int | str]] | None = None) -> onnx.ModelProto:
    """Run every pass in order; see each pass for what it guarantees."""
    model, _ = drop_initializer_inputs(model)
    model, _ = constants_to_initializers(model)
    model, _ = convert_opset(model)
    model, _ = name_nodes(model)
    model, _ = fold_constants(model)
    model, _ = free_batch(model)
    model, _ = set_input_shapes(model, input_shapes or {})
    model, _ = infer_shapes(model)
    for _ in range(8):  # each fold can make the next reshape's input shape known
        model, folded = fold_shape_arithmetic(model)
        if not folded:
            break
        model, _ = infer_shapes(model)
    return model
