"""The files people deploy, made by the real converters from the test suite's ``torch.nn`` nets
(issue 26's first table): fixed-batch exports (TorchScript, dynamo), opsets 11/18/21, fp16
(``onnxconverter_common.float16``, both ``keep_io_types``), int8 (``onnxruntime.quantization``:
static QDQ, static QOperator, dynamic), and ONNX Runtime's own optimised files (level EXTENDED,
``onnxruntime.transformers.optimizer``). Nets: a ResNet-18-like, a MobileNetV2-like and a ViT-like
net at 32×32 (the ViT's 8×8 patches need that size)."""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from . import architectures, models, token_models

IMAGE = 32

NETS: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: models.seeded(models.ResNetish(), seed=26),
    "mobilenetv2": lambda: models.seeded(architectures.MobileNetV2ish(), seed=26),
    "vit": lambda: token_models.vit(26),
}


@functools.lru_cache(maxsize=None)
def net(name: str) -> nn.Module:
    return NETS[name]()


def images(batch: int, seed: int = 0, size: int = IMAGE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _torchscript(module: nn.Module, *, opset: int = 17, dynamic: bool = True) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1 if not dynamic else 2, 3, IMAGE, IMAGE),), buffer, dynamo=False,
                          input_names=["x"], output_names=["y"], opset_version=opset,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    return onnx.load_from_string(buffer.getvalue())


def _dynamo(module: nn.Module, *, opset: int | None = None, dynamic: bool = True) -> onnx.ModelProto:
    options = {} if opset is None else {"opset_version": opset}
    if dynamic:
        options["dynamic_shapes"] = {"x": {0: torch.export.Dim("N")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.randn(2 if dynamic else 1, 3, IMAGE, IMAGE),), dynamo=True,
                                    input_names=["x"], optimize=True, verbose=False, **options)
    return program.model_proto


@functools.lru_cache(maxsize=None)
def fp32(name: str) -> onnx.ModelProto:
    """The plain float32 export every other form is made from (TorchScript, opset 17, dynamic batch)."""
    return _torchscript(net(name))


class _Calibration:
    """``onnxruntime.quantization``'s calibration reader: four random images, one at a time."""

    def __init__(self, input_name: str, size: int = IMAGE) -> None:
        self.batches = iter([{input_name: images(1, seed, size)} for seed in range(4)])

    def get_next(self):
        return next(self.batches, None)


def _through_files(write: Callable[[str, str], None], model: onnx.ModelProto) -> onnx.ModelProto:
    """Run a converter that reads and writes files (ONNX Runtime's quantiser and optimisers)."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "model.onnx"), os.path.join(folder, "converted.onnx")
        onnx.save(model, source)
        logging.disable(logging.WARNING)  # the quantiser's advice to pre-process, once per call
        try:
            write(source, target)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(target)


def fp16(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=keep_io_types)


def quantize_static(model: onnx.ModelProto, operator_format: bool = False, size: int = IMAGE) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import quantize_static as quantize

    return _through_files(lambda source, target: quantize(
        source, target, _Calibration(model.graph.input[0].name, size),
        quant_format=QuantFormat.QOperator if operator_format else QuantFormat.QDQ), model)


def quantize_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_dynamic as quantize

    return _through_files(quantize, model)


def ort_optimised(model: onnx.ModelProto) -> onnx.ModelProto:
    """The file ONNX Runtime writes at level EXTENDED (``SessionOptions.optimized_model_filepath``)."""

    def write(source: str, target: str) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = target
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    return _through_files(write, model)


def transformer_optimised(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnxruntime.transformers.optimizer.optimize_model(model_type="vit")`` of the ViT."""
    from onnxruntime.transformers import optimizer

    vit = net("vit")
    heads, width = vit.blocks[0].attn.heads, vit.head.in_features

    def write(source: str, target: str) -> None:
        optimizer.optimize_model(source, model_type="vit", num_heads=heads, hidden_size=width,
                                 opt_level=0).save_model_to_file(target)

    return _through_files(write, model)


@dataclass(frozen=True)
class Form:
    """One deployed form: how users get it, and how to make it from a net's name."""

    key: str
    title: str
    make: Callable[[str], onnx.ModelProto]
    nets: tuple[str, ...] = tuple(NETS)


FORMS: list[Form] = [
    Form("torchscript-fixed", "TorchScript export with a fixed batch (`torch.onnx.export(m, torch.randn(1, 3, H, W))`)",
         lambda name: _torchscript(net(name), dynamic=False)),
    Form("dynamo-fixed", "dynamo export with a fixed batch (`torch.onnx.export(m, (x,), dynamo=True)`)",
         lambda name: _dynamo(net(name), dynamic=False)),
    Form("opset-11", "opset 11 (TorchScript, `opset_version=11`)", lambda name: _torchscript(net(name), opset=11)),
    Form("opset-18", "opset 18 (dynamo, `opset_version=18`)", lambda name: _dynamo(net(name), opset=18)),
    Form("opset-21", "opset 21 (dynamo, `opset_version=21`)", lambda name: _dynamo(net(name), opset=21)),
    Form("fp16-keep-io", "fp16, float32 inputs and outputs (`float16.convert_float_to_float16(m, keep_io_types=True)`)",
         lambda name: fp16(fp32(name), True)),
    Form("fp16", "fp16 with float16 inputs and outputs (`keep_io_types=False`)", lambda name: fp16(fp32(name), False)),
    Form("int8-qdq", "int8 QDQ (`quantize_static`, `QuantFormat.QDQ`)", lambda name: quantize_static(fp32(name))),
    Form("int8-dynamic", "int8 dynamic (`quantize_dynamic`: DynamicQuantizeLinear, ConvInteger, MatMulInteger)",
         lambda name: quantize_dynamic(fp32(name))),
    Form("int8-qoperator", "int8 QOperator (`quantize_static`, `QuantFormat.QOperator`: QLinearConv, QGemm…)",
         lambda name: quantize_static(fp32(name), operator_format=True)),
    Form("ort-extended", "ONNX Runtime's optimised file, level EXTENDED (`SessionOptions.optimized_model_filepath`)",
         lambda name: ort_optimised(fp32(name))),
    Form("ort-transformer", "`onnxruntime.transformers.optimizer.optimize_model(model_type=\"vit\")`",
         lambda name: transformer_optimised(fp32(name)), ("vit",)),
]


@functools.lru_cache(maxsize=None)
def build(key: str, name: str) -> onnx.ModelProto:
    """The form ``key`` of the net ``name`` (cached: each converter runs once per session)."""
    form = next(f for f in FORMS if f.key == key)
    return form.make(name)


def feeds(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images for ``model``'s image input, in its element type (float16 where it is)."""
    x = images(batch, seed)
    info = model.graph.input[0]
    return {info.name: x.astype(np.float16) if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else x}


# -- the "Deployed formats" table (docs/deployed-formats.md) -----------------------------------
METHODS = ("agf", "gradcam", "lrp")
TOKEN_METHODS = ("chefer",)  # for the token model only


def methods_for(name: str) -> tuple[str, ...]:
    return METHODS + (TOKEN_METHODS if name == "vit" else ())


def _batch(model: onnx.ModelProto) -> int:
    """The batch a fixed-batch file runs at, else 2."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 2


def check(model: onnx.ModelProto, method: str) -> str:
    """``"✓"`` when ``model`` compiles with ``method``, keeps its outputs bit-identical (ONNX Runtime
    optimisations off), and gives a finite ``[N, 1, H, W]`` heatmap that differs between the top
    and the bottom class; else what went wrong, in one line (the refusal's first line)."""
    import agf_onnx
    from agf_onnx.errors import CompileError, UnsupportedOpsError

    from .runtime import run

    try:
        compiled = agf_onnx.compile(model, method=method)
    except UnsupportedOpsError as error:
        return "refused (exit 2): unsupported " + ", ".join(f"{op} ({len(nodes)})" for op, nodes in
                                                            error.unsupported.items())
    except CompileError as error:
        return f"refused (exit {error.exit_code}): {str(error).splitlines()[0]}"
    except Exception as error:  # noqa: BLE001 - the table reports crashes rather than stopping at one
        return f"crash: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    batch = _batch(model)
    inputs = feeds(model, batch, seed=1)
    outputs = [o.name for o in model.graph.output]
    try:
        original = run(model, inputs, optimize=False)
        scores = original[outputs[0]].reshape(batch, -1).astype(np.float32)
        top = run(compiled, {**inputs, "target": scores.argmax(1)}, optimize=False)
        bottom = run(compiled, {**inputs, "target": scores.argmin(1)}, optimize=False)["heatmap"]
    except Exception as error:  # noqa: BLE001
        return f"does not run: {str(error).splitlines()[0]}"
    heatmap = top["heatmap"]
    if not all(np.array_equal(original[name], top[name]) for name in outputs):
        return "wrong: the original outputs changed"
    if heatmap.shape != (batch, 1, IMAGE, IMAGE) or heatmap.dtype != np.float32:
        return f"wrong: heatmap {heatmap.dtype} {list(heatmap.shape)}"
    if not np.isfinite(heatmap).all() or not np.isfinite(bottom).all():
        return "wrong: a non-finite heatmap"
    if np.allclose(heatmap, bottom):
        return "wrong: the same map for the top and the bottom class"
    return "✓"


@functools.lru_cache(maxsize=None)
def outcome(key: str, name: str, method: str) -> str:
    """``check`` of the form ``key`` of the net ``name`` (cached: the table and the tests share it)."""
    return check(build(key, name), method)


def _short(message: str, limit: int = 150) -> str:
    return message if len(message) <= limit else message[:limit - 1].rstrip() + "…"


def _cell(results: dict[str, str]) -> str:
    """Methods grouped by outcome: ``agf, lrp ✓<br>gradcam: refused …``."""
    grouped: dict[str, list[str]] = {}
    for method, outcome in results.items():
        grouped.setdefault(outcome, []).append(method)
    parts = [f"{', '.join(methods)} ✓" if outcome == "✓" else f"{', '.join(methods)}: {_short(outcome)}"
             for outcome, methods in grouped.items()]
    return "<br>".join(part.replace("|", "\\|") for part in parts)


#: How each form is explained (docs/deployed-formats.md tells the details).
HOW = {
    "torchscript-fixed": "the batch axis freed where the graph allows it (`passes.free_batch`)",
    "dynamo-fixed": "as TorchScript's",
    "opset-11": "opsets 11–16 upgraded to 17 by the project's own exact adapters; 17 and newer kept, the explanation written at the model's opset",
    "opset-18": "as opset 11",
    "opset-21": "as opset 11",
    "fp16-keep-io": "float32 view: fp16 weights widened at compile time; activations recomputed in float32",
    "fp16": "as fp16 with float32 I/O; the float16 image and scores cast to float32",
    "int8-qdq": "dequantized view: weights folded to float32, Q→DQ straight through; activations recomputed",
    "int8-dynamic": "ConvInteger/MatMulInteger chains as float Conv/MatMul on dequantized weights; activations recomputed",
    "int8-qoperator": "each QLinear op as its float op on the dequantized operands; activations recomputed",
    "ort-extended": "`contrib.decompose`: each fused op as its standard ops",
    "ort-transformer": "as EXTENDED (SkipLayerNormalization, BiasGelu, Attention…)",
}


def table() -> str:
    """The Markdown table: form, how it is explained, and per net each method's outcome."""
    rows = ["| form (how users get it) | how agf-onnx explains it | " + " | ".join(NETS) + " |",
            "|---|---|" + "---|" * len(NETS)]
    for form in FORMS:
        cells = []
        for name in NETS:
            if name not in form.nets:
                cells.append("—")
                continue
            try:
                build(form.key, name)  # cached: outcome() compiles the same file
            except Exception as error:  # noqa: BLE001 - a converter that fails is an outcome too
                cells.append(f"the converter fails: {type(error).__name__}")
                continue
            cells.append(_cell({method: outcome(form.key, name, method) for method in methods_for(name)}))
        rows.append(f"| {form.title} | {HOW[form.key]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
