"""Deployed forms (fp16, int8, ONNX Runtime's fused ops): explain the file a service runs.

A deployed file computes the same function as its float32 source up to rounding (spec "Deployed
forms"); the explanation is that of the function, computed in float32. The rules know float32
standard ops, so a deployed file is explained through its **explained view**: a float32
standard-op network that ``passes.canonicalise``, ``planning.plan`` and
``compiler.compile_canonical`` consume unchanged, plus a **splice** that puts the original graph
back under the explanation (docs/deployed-formats.md draws it)::

    deployed.onnx ─explained_view─▶ float32 view ─canonicalise, plan, emit─▶ view + explanation
         └──── original nodes, untouched ◀── splice: what the explanation reads ◀──┘

The view is built node by node from the original:

- **fp16** (``onnxconverter_common.float16``, either ``keep_io_types``): every float16 (or
  bfloat16) initializer, ``Constant``, input, output and ``Cast`` target becomes float32: the
  float32 network with the file's weights, exactly widened.
- **Quantised weights**: ``DequantizeLinear`` of a constant (per tensor or per channel) is
  folded to a float32 constant; so are the int8 weights and int32 biases of ``QLinearConv``,
  ``QLinearMatMul``, ``QGemm``, ``ConvInteger`` and ``MatMulInteger``.
- **Quantised activations**: each integer activation ``t`` has a float view tensor
  ``t/dequantized``. ``QuantizeLinear`` is the straight-through estimator: the identity, or
  ``Clip`` to the representable range where that range starts at exactly 0 after an op that can
  be negative (ORT's quantiser absorbed a ReLU/ReLU6 there; the clip keeps its mask);
  ``DynamicQuantizeLinear`` (whose range covers its input) and the image's quantisation are the
  identity. ``DequantizeLinear`` of an activation is the identity. A QLinear op is its float op on
  the dequantized operands, then the straight-through estimator of its output's quantisation;
  ``ConvInteger``/``MatMulInteger → Cast → Mul(s_a·s_b)`` (``quantize_dynamic``) is the float
  ``Conv``/``MatMul``. Ops that only move values (``MaxPool``, ``Reshape``, ``Transpose``…) act on
  the dequantized tensor, keeping its scale.
- **Contrib ops** (``com.microsoft``: FusedConv, SkipLayerNormalization, Attention…) are replaced by
  ``contrib.decompose``'s exact standard-op decompositions.

**Names carry the meaning.** A tensor name the view shares with the original denotes the same
quantity (in float32); what the view computes differently gets a new name (``t/dequantized``,
``y/float``). The splice keeps every original node as it is and satisfies each tensor the
explanation reads:

1. an initializer of the view (float32 weights, made at compile time) under its name, or a new
   one where the original holds another tensor by that name;
2. the original's tensor of that name, through a ``Cast`` to float32 where it is float16 — the
   image and the scores always (the target ``-1`` is the top class of the **original**'s scores),
   any other activation only where the view ``reads_activations``;
3. else the view node that computes it, kept and run in float32, its inputs satisfied the same way.

The view reads the original's activations only for a float32 file with fused ops (their outputs
are the same float32 quantities). For fp16 and quantised files it recomputes them, for two reasons
measured with ONNX Runtime 1.31.1: one extra reader of an fp16 activation moved an fp16 ResNet's
logits by 4e-4 (optimisations off: the CPU provider runs fp16 ops behind Casts it drops only
where nothing else reads the fp16 tensor), and a reader at a QDQ ViT's attention moved its logits
by 0.18 (optimisations on: ORT fuses ``DQ → op → Q`` into int8 kernels only where each keeps its
one reader). So the original outputs stay bit-identical, with optimisations off and on; and the
explanation of a quantised file is that of its dequantized network evaluated in float32, for every
method alike (``--top-k`` and the modifiers clone the view); a QDQ file and a QOperator file that
quantise the same ops give the same map.

Cost of the explained run beyond the explanation itself: fp16 and int8, one float32 forward pass
of the view; a float32 file with fused ops, the inner tensors of fused ops that rules read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..errors import CompileError, UnsupportedOpsError
from ..rules import label
from . import passes
from .spec import CompileSpec

#: Float types the view widens to float32.
NARROW_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_STANDARD = ("", "ai.onnx")
_MICROSOFT = "com.microsoft"
#: ONNX Runtime's contrib ops registered in the ai.onnx domain (no standard op has the name).
_CONTRIB_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}

#: Standard ops whose presence makes a file quantised.
QUANTISED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger"}

#: Ops that only move, pick or order values: on a quantised tensor they act on its dequantized
#: values the same way (``MaxPool`` is monotone), and their output keeps the input's scale.
_VALUE_MOVING = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity",
                 "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "GlobalMaxPool"}

#: Ops whose output is never negative: a range starting at 0 after them absorbed no ReLU.
_NONNEGATIVE_OPS = {"Relu", "Softmax", "Sigmoid", "Clip", "Abs", "Exp", "HardSigmoid", "Sqrt"}

#: Integer ranges of quantised types.
_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
           TensorProto.INT16: (-32768, 32767)}


def _narrow(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds float16 or bfloat16 tensors (an fp16 file)."""
    graph = model.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    return any(info.type.tensor_type.elem_type in NARROW_FLOATS for info in infos) or \
        any(t.data_type in NARROW_FLOATS for t in graph.initializer) or \
        any(n.op_type == "Cast" and _attribute(n, "to") in NARROW_FLOATS for n in graph.node)


def needs_view(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is a deployed form (fp16, quantised, or with non-standard-domain ops)
    that is explained through its float32 standard-op view."""
    return _narrow(model) or any(node.domain not in _STANDARD or node.op_type in QUANTISED_OPS |
                                 _CONTRIB_IN_ONNX_DOMAIN for node in model.graph.node)


@dataclass
class ExplainedView:
    """A float32 standard-op network with the original's inputs and outputs. ``reads_activations``:
    whether the explanation may read the original's activations (a float32 file with fused ops,
    whose fused outputs are the same float32 quantities), or recomputes them in the view (fp16 and
    quantised files: see the module docstring)."""

    model: onnx.ModelProto
    reads_activations: bool


def _attribute(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _copy_attributes(node: onnx.NodeProto, drop: Iterable[str] = ()) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in set(drop)}


class _Translator:
    """Builds the view of one model, node by node in topological order."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        self.constants = dict(self.initializers)  # also constant node outputs, as found
        self.nodes: list[onnx.NodeProto] = []
        self.dequantized: dict[str, str] = {}  # quantised activation → its float view tensor
        self.scales: dict[str, tuple[str, str]] = {}  # quantised activation → (scale, zero point) of the original
        self.consumed: set[int] = set()  # ids of nodes a pattern already translated
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.producers = {o: node for node in model.graph.node for o in node.output if o}
        self.outputs = {o.name for o in model.graph.output}
        self.aliases: dict[str, str] = {}  # a dequantized activation of the original → its view tensor
        self.quantised = False  # a quantised file: some op was translated

    # -- constants ------------------------------------------------------------------------
    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def add_constant(self, name: str, array: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.initializers[name] = self.constants[name] = tensor
        return name

    def fold_dequantize(self, quantised: str, scale: str, zero: str | None, axis: int | None, output: str,
                        where: onnx.NodeProto) -> str:
        """``(q − z)·s`` of a constant, per tensor or along ``axis``, as a float32 initializer ``output``."""
        q, s = self.value(quantised), self.value(scale)
        z = self.value(zero) if zero else None
        if q is None or s is None or (zero and z is None):
            raise CompileError(f"{where.op_type} node '{where.name}': the quantised weight '{quantised}' is not a "
                               "constant")
        shape = [1] * q.ndim
        if s.size > 1:
            axis = (axis if axis is not None else 1) % q.ndim
            shape[axis] = -1
        shifted = q.astype(np.int64) - (0 if z is None else z.astype(np.int64).reshape(shape if z.size > 1 else ()))
        return self.add_constant(output, (shifted.astype(np.float32) * s.astype(np.float32).reshape(
            shape if s.size > 1 else ())).astype(np.float32))

    # -- activations ----------------------------------------------------------------------
    def float_of(self, name: str, reader: onnx.NodeProto) -> str:
        """The float view tensor of a quantised activation ``name`` that ``reader`` reads."""
        if name in self.dequantized:
            return self.dequantized[name]
        raise CompileError(f"{reader.op_type} node '{reader.name}': its quantised input '{name}' comes from no "
                           "QuantizeLinear or QLinear op agf-onnx can follow")

    def operand(self, name: str, scale: str, zero: str, reader: onnx.NodeProto, axis: int | None = None) -> str:
        """A QLinear op's operand as a float view tensor: its dequantized activation, or a constant
        dequantized at compile time by the scale and zero point the op gives it (along ``axis``)."""
        if name in self.dequantized:
            return self.dequantized[name]
        if name in self.constants:
            return self.fold_dequantize(name, scale, zero or None, axis, f"{name}/dequantized", reader)
        return self.float_of(name, reader)

    def quantised_output(self, node: onnx.NodeProto, output: str, scale: str, zero: str, float_output: str,
                         producer: str | None) -> None:
        """Declare ``output`` (an integer tensor of the original) as the view tensor
        ``output/dequantized``: the straight-through estimator of the quantisation of
        ``float_output`` (computed by an op of type ``producer``; None: no clip). It is the identity,
        except where the range starts at exactly 0 after an op that can output negative values:
        there ORT's quantiser absorbed a ReLU (or ReLU6) into the range, and ``Clip`` to the range
        keeps its mask."""
        name = f"{output}/dequantized"
        bounds = self.range(scale, zero, node) if producer is not None else None
        if bounds is None or bounds[0] != 0.0 or producer in _NONNEGATIVE_OPS or self.nonnegative(float_output):
            self.emit("Identity", [float_output], [name], f"{output}/straight_through")
        else:
            low = self.add_constant(f"{output}/range_min", np.array(bounds[0], np.float32))
            high = self.add_constant(f"{output}/range_max", np.array(bounds[1], np.float32))
            self.emit("Clip", [float_output, low, high], [name], f"{output}/straight_through")
        self.dequantized[output] = name
        self.scales[output] = (scale, zero)

    def nonnegative(self, tensor: str) -> bool:
        """Whether the original's ``tensor`` is ``≥ 0`` by construction: a non-negative op's output,
        a pool or reshape of such tensors, or the dequantized value of a range that starts at 0."""
        node = self.producers.get(tensor)
        if node is None:
            return False
        if node.op_type in _NONNEGATIVE_OPS:
            return True
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and len(node.input) > 2:
            bounds = self.range(node.input[1], node.input[2], node)
            return bounds is not None and bounds[0] >= 0.0
        if node.op_type in _VALUE_MOVING | {"AveragePool", "GlobalAveragePool", "Concat"}:
            data = [i for i in node.input[:1 if node.op_type != "Concat" else None] if i]
            return all(self.nonnegative(i) for i in data)
        return False

    def range(self, scale: str, zero: str, node: onnx.NodeProto) -> tuple[float, float] | None:
        """``[(q_min − z)·s, (q_max − z)·s]``, or None where scale or zero point is not a constant."""
        s = self.value(scale)
        z = self.value(zero) if zero else np.array(0, np.uint8)
        if s is None or z is None or s.size != 1 or z.size != 1:
            return None
        dtype = numpy_helper.from_array(np.asarray(z)).data_type if zero else TensorProto.UINT8
        if dtype not in _RANGES:
            return None
        low, high = _RANGES[dtype]
        zero_value, step = float(z.reshape(-1)[0]), np.float32(s.reshape(-1)[0])
        return float(np.float32(low - zero_value) * step), float(np.float32(high - zero_value) * step)

    def emit(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attributes) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attributes))

    # -- the walk -------------------------------------------------------------------------
    def translate(self) -> None:
        for original in self.model.graph.node:
            if id(original) in self.consumed:
                continue
            node = original
            if any(i in self.aliases for i in node.input):
                node = onnx.NodeProto()
                node.CopyFrom(original)
                node.input[:] = [self.aliases.get(i, i) for i in node.input]
            if node.op_type == "Constant" and node.domain in _STANDARD and len(node.attribute) == 1:
                value = passes._constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.from_array(value, node.output[0])
            handler = _HANDLERS.get((_MICROSOFT if node.domain == _MICROSOFT else "", node.op_type))
            if handler is not None:
                self.quantised = True
                handler(self, node)
            elif node.domain in _STANDARD and any(i in self.dequantized for i in node.input):
                self.moving(node)
            else:
                self.nodes.append(node)

    def moving(self, node: onnx.NodeProto) -> None:
        """An op that only moves values, on a quantised tensor: the same op on its dequantized values."""
        data = [i for i in node.input if i in self.dequantized]
        if node.op_type not in _VALUE_MOVING or node.input[0] not in self.dequantized or len(data) != 1:
            # an op on integer values agf-onnx has no float form of: unsupported, like an op without rules
            raise UnsupportedOpsError({f"{node.op_type} (on the quantised '{data[0]}')": [node.name]})
        scale, zero = self.scales[node.input[0]]
        outputs = [o for o in node.output if o]
        floats = [f"{o}/float" for o in outputs]
        copy = helper.make_node(node.op_type, [self.dequantized.get(i, i) for i in node.input],
                                floats[:1] if node.op_type == "MaxPool" else floats, name=node.name,
                                **_copy_attributes(node))
        self.nodes.append(copy)
        for output, value in zip(outputs[:len(copy.output)], copy.output):
            self.quantised_output(node, output, scale, zero, value, None)


def _quantize_linear(t: _Translator, node: onnx.NodeProto) -> None:
    x, scale, zero = node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else ""
    if t.value(scale) is not None and t.value(scale).size > 1:
        raise CompileError(f"QuantizeLinear node '{node.name}': a per-channel activation scale")
    producer = t.producers.get(x)
    t.quantised_output(node, node.output[0], scale, zero, x, None if producer is None else producer.op_type)


def _dequantize_linear(t: _Translator, node: onnx.NodeProto) -> None:
    quantised, scale = node.input[0], node.input[1]
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if _attribute(node, "block_size", 0):
        raise CompileError(f"DequantizeLinear node '{node.name}': blocked quantisation (block_size) is not read")
    if quantised in t.constants:
        t.fold_dequantize(quantised, scale, zero, _attribute(node, "axis", 1), node.output[0], node)
    elif node.output[0] in t.outputs:
        t.emit("Identity", [t.float_of(quantised, node)], [node.output[0]], node.name)
    else:  # its readers read the float view tensor itself
        t.aliases[node.output[0]] = t.float_of(quantised, node)


def _dynamic_quantize_linear(t: _Translator, node: onnx.NodeProto) -> None:
    quantised, scale, zero = node.output
    t.quantised_output(node, quantised, scale, zero, node.input[0], None)


def _float_op(op_type: str, operands: Callable[[_Translator, onnx.NodeProto], list[str]],
              output_scale: tuple[int, int] | None, drop: Iterable[str] = (), **fixed) -> Callable:
    """A handler for a QLinear op: ``op_type`` on ``operands`` (the dequantized inputs and folded
    weights), then the straight-through clip to the output's range (inputs ``output_scale`` =
    (scale index, zero point index)); a float output (``QGemm`` without output scale) is the op itself."""

    def handle(t: _Translator, node: onnx.NodeProto) -> None:
        output = node.output[0]
        requantised = output_scale is not None and len(node.input) > output_scale[0] and node.input[output_scale[0]]
        result = f"{output}/float" if requantised else output
        t.emit(op_type, operands(t, node), [result], node.name, **{**_copy_attributes(node, drop), **fixed})
        if requantised:
            scale = node.input[output_scale[0]]
            zero = node.input[output_scale[1]] if len(node.input) > output_scale[1] else ""
            t.quantised_output(node, output, scale, zero, result, op_type)

    return handle


def _bias(t: _Translator, node: onnx.NodeProto, bias: str, input_scale: str, weight_scale: str) -> str:
    """An int32 bias with scale ``s_x · s_w`` (per channel where ``s_w`` is) as float32."""
    value, sx, sw = t.value(bias), t.value(input_scale), t.value(weight_scale)
    if value is None or sx is None or sw is None:
        raise CompileError(f"{node.op_type} node '{node.name}': the bias or a scale is not a constant")
    return t.add_constant(f"{bias}/dequantized", (value.astype(np.float32) * (sx.astype(np.float32) *
                                                                              sw.astype(np.float32)).reshape(-1)))


def _qlinear_conv_operands(t: _Translator, node: onnx.NodeProto) -> list[str]:
    i = list(node.input) + [""] * (9 - len(node.input))
    operands = [t.float_of(i[0], node), t.operand(i[3], i[4], i[5], node, axis=0)]
    return operands + ([_bias(t, node, i[8], i[1], i[4])] if i[8] else [])


def _qlinear_matmul_operands(t: _Translator, node: onnx.NodeProto) -> list[str]:
    i = node.input
    return [t.operand(i[0], i[1], i[2], node, axis=0), t.operand(i[3], i[4], i[5], node, axis=-1)]


def _qgemm_operands(t: _Translator, node: onnx.NodeProto) -> list[str]:
    i = list(node.input) + [""] * (9 - len(node.input))
    a_axis, b_axis = (1 if _attribute(node, "transA", 0) else 0), (0 if _attribute(node, "transB", 0) else 1)
    operands = [t.operand(i[0], i[1], i[2], node, a_axis), t.operand(i[3], i[4], i[5], node, b_axis)]
    return operands + ([_bias(t, node, i[6], i[1], i[4])] if i[6] else [])


def _binary_operands(t: _Translator, node: onnx.NodeProto) -> list[str]:
    i = node.input
    return [t.operand(i[0], i[1], i[2], node), t.operand(i[3], i[4], i[5], node)]


def _unary_operands(t: _Translator, node: onnx.NodeProto) -> list[str]:
    if _attribute(node, "channels_last", 0):
        raise CompileError(f"{node.op_type} node '{node.name}': channels_last=1 is not read")
    return [t.float_of(node.input[0], node)]


def _concat_operands(t: _Translator, node: onnx.NodeProto) -> list[str]:
    triples = node.input[2:]
    return [t.operand(triples[k], triples[k + 1], triples[k + 2], node) for k in range(0, len(triples), 3)]


def _softmax(t: _Translator, node: onnx.NodeProto) -> None:
    if _attribute(node, "opset", 13) < 13 and _attribute(node, "axis", -1) not in (-1,):
        raise CompileError(f"QLinearSoftmax node '{node.name}': a coerced-to-2-D softmax (opset < 13) over an axis "
                           "other than the last")
    _float_op("Softmax", _unary_operands, (3, 4), drop=("opset",))(t, node)


def _integer_product(op_type: str) -> Callable[[_Translator, onnx.NodeProto], None]:
    """``ConvInteger``/``MatMulInteger(a_q, b_q, a_z, b_z) → Cast(float) → Mul(s_a · s_b)``, as
    ``quantize_dynamic`` writes them: the float ``Conv``/``MatMul`` of the dequantized input and the
    dequantized weight, named as the ``Mul``'s output (the same quantity)."""

    def handle(t: _Translator, node: onnx.NodeProto) -> None:
        def refuse(why: str) -> CompileError:
            return CompileError(f"{node.op_type} node '{node.name}': {why}; agf-onnx reads the form "
                                "quantize_dynamic writes (→ Cast to float → Mul by the product of the two scales)")

        cast = t.readers.get(node.output[0], [])
        if len(cast) != 1 or cast[0].op_type != "Cast" or _attribute(cast[0], "to") != TensorProto.FLOAT:
            raise refuse("its int32 output is not cast to float once")
        mul = t.readers.get(cast[0].output[0], [])
        if len(mul) != 1 or mul[0].op_type != "Mul":
            raise refuse("the cast output is not rescaled by one Mul")
        product = next(i for i in mul[0].input if i != cast[0].output[0])
        inputs = list(node.input) + [""] * (4 - len(node.input))
        data_scale = t.scales.get(inputs[0], ("", ""))[0]
        factors = next((n for n in t.model.graph.node if product in n.output), None)
        if factors is None or factors.op_type != "Mul" or data_scale not in factors.input:
            raise refuse(f"the rescaling factor '{product}' is not the input's scale times the weight's")
        weight_scale = next(i for i in factors.input if i != data_scale)
        weight = t.fold_dequantize(inputs[1], weight_scale, inputs[3] or None, 0 if op_type == "Conv" else -1,
                                   f"{inputs[1]}/dequantized", node)
        t.emit(op_type, [t.float_of(inputs[0], node), weight], [mul[0].output[0]], node.name,
               **_copy_attributes(node))
        t.consumed.update({id(cast[0]), id(mul[0])})

    return handle


_HANDLERS: dict[tuple[str, str], Callable[[_Translator, onnx.NodeProto], None]] = {
    ("", "QuantizeLinear"): _quantize_linear,
    ("", "DequantizeLinear"): _dequantize_linear,
    ("", "DynamicQuantizeLinear"): _dynamic_quantize_linear,
    ("", "QLinearConv"): _float_op("Conv", _qlinear_conv_operands, (6, 7)),
    ("", "QLinearMatMul"): _float_op("MatMul", _qlinear_matmul_operands, (6, 7)),
    ("", "ConvInteger"): _integer_product("Conv"),
    ("", "MatMulInteger"): _integer_product("MatMul"),
    (_MICROSOFT, "QuantizeLinear"): _quantize_linear,
    (_MICROSOFT, "DequantizeLinear"): _dequantize_linear,
    (_MICROSOFT, "QGemm"): _float_op("Gemm", _qgemm_operands, (7, 8)),
    (_MICROSOFT, "QLinearAdd"): _float_op("Add", _binary_operands, (6, 7)),
    (_MICROSOFT, "QLinearMul"): _float_op("Mul", _binary_operands, (6, 7)),
    (_MICROSOFT, "QLinearGlobalAveragePool"): _float_op("GlobalAveragePool", _unary_operands, (3, 4),
                                                        drop=("channels_last",)),
    (_MICROSOFT, "QLinearAveragePool"): _float_op("AveragePool", _unary_operands, (3, 4), drop=("channels_last",)),
    (_MICROSOFT, "QLinearConcat"): _float_op("Concat", _concat_operands, (0, 1)),
    (_MICROSOFT, "QLinearSoftmax"): _softmax,
    (_MICROSOFT, "QLinearSigmoid"): _float_op("Sigmoid", _unary_operands, (3, 4)),
    (_MICROSOFT, "QLinearLeakyRelu"): _float_op("LeakyRelu", _unary_operands, (3, 4)),
}


# -- fp16 ------------------------------------------------------------------------------------
#: Ops whose ``to``/``dtype`` attribute names the element type they produce.
_TYPED_OPS = ("Cast", "EyeLike", "RandomNormal", "RandomUniform")


def _widen(model: onnx.ModelProto) -> None:
    """Every float16/bfloat16 initializer, input, output, Cast target and tensor attribute as float32."""
    graph = model.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in NARROW_FLOATS:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for info in [*graph.input, *graph.output]:
        if info.type.tensor_type.elem_type in NARROW_FLOATS:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type in _TYPED_OPS and attribute.name in ("to", "dtype") and attribute.i in NARROW_FLOATS:
                attribute.i = TensorProto.FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in NARROW_FLOATS:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name))


def _decompose_contrib(model: onnx.ModelProto) -> onnx.ModelProto:
    """``contrib.decompose`` (exact standard-op forms of ONNX Runtime's com.microsoft ops)."""
    if not any(n.domain not in _STANDARD or n.op_type in _CONTRIB_IN_ONNX_DOMAIN for n in model.graph.node):
        return model
    try:
        from . import contrib
    except ImportError:  # not in this build: the ops are refused by name, as unsupported
        missing: dict[str, list[str]] = {}
        for node in model.graph.node:
            if node.domain not in _STANDARD:
                missing.setdefault(label(node), []).append(node.name)
        raise UnsupportedOpsError(missing) from None
    return contrib.decompose(model)


def explained_view(model: onnx.ModelProto) -> ExplainedView:
    """The float32 standard-op network that explains ``model`` (see the module docstring)."""
    passes.name_nodes(model)  # names for error messages and for the view's nodes
    translator = _Translator(model)
    translator.translate()
    view = onnx.ModelProto()
    view.CopyFrom(model)
    del view.graph.node[:]
    view.graph.node.extend(translator.nodes)
    del view.graph.initializer[:]
    view.graph.initializer.extend(translator.initializers.values())
    view = _decompose_contrib(view)
    _widen(view)
    kept = [o for o in view.opset_import if o.domain in _STANDARD]
    del view.opset_import[:]
    view.opset_import.extend(kept)
    view, _ = passes.prune_dead_nodes(view)
    return ExplainedView(view, reads_activations=not (translator.quantised or _narrow(model)))


# -- the splice ------------------------------------------------------------------------------
def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of ``model``: ONNX's inference, and for ops it has no schema
    of (com.microsoft), the type of the node's first typed input."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model ONNX cannot infer still runs; fall back below
        inferred = model
    graph = inferred.graph
    types = {i.name: i.type.tensor_type.elem_type for i in [*graph.input, *graph.value_info, *graph.output]
             if i.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in model.graph.node:
        known = next((types[i] for i in node.input if i in types), None)
        for output in node.output:
            if output and output not in types and known is not None:
                types[output] = known
    return types


def _equal(first: onnx.TensorProto, second: onnx.TensorProto) -> bool:
    if first.data_type != second.data_type or list(first.dims) != list(second.dims):
        return False
    return np.array_equal(numpy_helper.to_array(first), numpy_helper.to_array(second))


def _original_tensors(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {o for n in graph.node for o in n.output if o}


def _fresh(name: str, taken: set[str]) -> str:
    candidate, n = f"{name}/float32", 0
    while candidate in taken:
        n += 1
        candidate = f"{name}/float32_{n}"
    taken.add(candidate)
    return candidate


def splice(original: onnx.ModelProto, view: ExplainedView, compiled: onnx.ModelProto) -> onnx.ModelProto:
    """The original model, untouched, plus the explanation that ``compile_canonical`` appended to
    the (canonical) view (``view.model``, as it was before; ``compiled`` may be the same object,
    extended), with every tensor the explanation reads taken from the original (see the
    module docstring for the order of preference)."""
    graph = compiled.graph
    view_nodes = {n.name for n in view.model.graph.node}
    emitted = [n for n in graph.node if n.name not in view_nodes]
    view_producer = {o: n for n in graph.node if n.name in view_nodes for o in n.output if o}
    view_initializers = {t.name: t for t in graph.initializer}
    original_initializers = {t.name: t for t in original.graph.initializer}
    original_names = _original_tensors(original.graph)
    types = _tensor_types(original)
    original_node_names = {n.name for n in original.graph.node}
    taken = original_names | {o for n in graph.node for o in n.output} | set(view_initializers) | \
        {n.name for n in original.graph.node} | {n.name for n in graph.node}
    # inputs the compiler added (``target``): fed by the user, read as they are
    extra_inputs = [i for i in graph.input if i.name not in {v.name for v in view.model.graph.input}]
    satisfied = {o for n in emitted for o in n.output if o} | {i.name for i in extra_inputs}
    boundary = {i.name for i in original.graph.input} | {o.name for o in original.graph.output}
    original_activations = {o for n in original.graph.node for o in n.output if o}
    renamed: dict[str, str] = {}
    added_nodes: list[onnx.NodeProto] = []
    recomputed: list[onnx.NodeProto] = []
    added_initializers: list[onnx.TensorProto] = []

    def satisfy(tensor: str) -> None:
        stack = [tensor]
        while stack:
            name = stack[-1]
            if not name or name in satisfied:
                stack.pop()
                continue
            if name in view_initializers:
                weight = view_initializers[name]
                same = original_initializers.get(name)
                if same is None or not _equal(same, weight):
                    copy = onnx.TensorProto()
                    copy.CopyFrom(weight)
                    if name in original_names:
                        copy.name = renamed[name] = _fresh(name, taken)
                    added_initializers.append(copy)
            elif name in original_names and (view.reads_activations or name in boundary
                                              or name not in original_activations):
                if types.get(name) in NARROW_FLOATS:
                    renamed[name] = _fresh(name, taken)
                    added_nodes.append(helper.make_node("Cast", [name], [renamed[name]], to=TensorProto.FLOAT,
                                                        name=f"{renamed[name]}/cast"))
            elif name in view_producer:
                node = view_producer[name]
                waiting = [i for i in node.input if i and i not in satisfied]
                if waiting:
                    stack.extend(waiting)
                    continue
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                for index, output in enumerate(copy.output):
                    if output in original_names:  # an activation of the original, computed again in float32
                        copy.output[index] = renamed[output] = _fresh(output, taken)
                if copy.name in original_node_names:
                    copy.name = _fresh(copy.name, taken)
                recomputed.append(copy)
                satisfied.update(o for o in node.output if o)
                stack.pop()
                continue
            else:
                raise CompileError(f"internal error: the explanation reads '{name}', which neither the original "
                                   "model nor its explained view computes")
            satisfied.add(name)
            stack.pop()

    for node in emitted:
        for name in node.input:
            satisfy(name)
    for node in [*recomputed, *emitted]:
        node.input[:] = [renamed.get(i, i) for i in node.input]

    result = onnx.ModelProto()
    result.CopyFrom(original)
    out = result.graph
    out.node.extend([*added_nodes, *recomputed, *emitted])
    out.initializer.extend(added_initializers)
    out.input.extend(extra_inputs)
    view_outputs = {o.name for o in view.model.graph.output}
    out.output.extend(o for o in graph.output if o.name not in view_outputs)
    _annotate(out, [*added_nodes, *recomputed, *emitted], compiled.graph.value_info, renamed)
    _merge_opsets(result, compiled)
    result.ir_version = max(original.ir_version, compiled.ir_version)
    del result.metadata_props[:]
    result.metadata_props.extend(compiled.metadata_props)
    result.doc_string = compiled.doc_string
    return result


def _annotate(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], inferred: Iterable[onnx.ValueInfoProto],
              renamed: Mapping[str, str]) -> None:
    """The view's inferred types and shapes (batch axis named) for the tensors the splice added:
    ONNX cannot infer them through the original's com.microsoft ops, and ONNX Runtime's memory
    planner needs the named batch axis (``passes.infer_shapes``)."""
    infos = {info.name: info for info in inferred}
    source = {new: old for old, new in renamed.items()}
    present = {info.name for info in graph.value_info}
    for node in nodes:
        for output in node.output:
            info = infos.get(source.get(output, output))
            if info is not None and output not in present:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(info)
                copy.name = output
                graph.value_info.append(copy)
                present.add(output)


def _merge_opsets(result: onnx.ModelProto, compiled: onnx.ModelProto) -> None:
    versions = {o.domain: o.version for o in result.opset_import}
    for opset in compiled.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del result.opset_import[:]
    result.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in sorted(versions.items()))


def compile_deployed(model: onnx.ModelProto, spec: CompileSpec, compile_canonical: Callable) -> onnx.ModelProto:
    """``compiler.compile`` of a deployed form: the view canonicalised, planned and explained by
    ``compile_canonical`` (the float32 path, unchanged), then spliced under the original."""
    original = onnx.ModelProto()
    original.CopyFrom(model)
    imported = {o.domain for o in original.opset_import}
    for domain in sorted({n.domain for n in original.graph.node} - imported - set(_STANDARD)):
        # ONNX Runtime's transformer optimiser writes com.microsoft nodes without importing the
        # domain (its loader does not ask; ONNX's checker does): the import changes no node
        original.opset_import.append(helper.make_opsetid(domain, 1))
    opset = next((o.version for o in original.opset_import if o.domain in _STANDARD), None)
    if opset is not None and opset < passes.TARGET_OPSET:
        # opsets below 17 are upgraded by the project's exact adapters, as on the float32 path
        # (passes.upgrade_opset); newer ones are kept and the explanation is written at them
        original, _ = passes.upgrade_opset(original)
    passes.drop_initializer_inputs(original)
    view = explained_view(original)
    canonical = passes.canonicalise(view.model, spec.input_shapes)
    before = ExplainedView(onnx.ModelProto(), view.reads_activations)
    before.model.CopyFrom(canonical)
    compiled = compile_canonical(canonical, spec.replace(check=False), reserved=_names(original))
    result = splice(original, before, compiled)
    if spec.check:
        try:
            onnx.checker.check_model(passes.weightless(result), full_check=True)
        except Exception as error:  # a compiler bug, never the user's
            raise CompileError(f"internal error: the compiled model fails the ONNX checker: {error}") from error
    return result


def _names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = _original_tensors(graph) | {o.name for o in graph.output}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
    return names
