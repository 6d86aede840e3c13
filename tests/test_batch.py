"""Files exported with a fixed batch (issue 26, "Any batch").

``torch.onnx.export(m, torch.randn(1, 3, H, W), f)`` is the most common export there is: the
TorchScript exporter folds every batch-dependent shape into a constant (``[1, 17, 3, 2, 8]``
reshapes, the class token folded from ``expand(B, -1, -1)`` to ``[1, 1, C]``), the dynamo
exporter writes ``Reshape [1, 128]`` with ``allowzero=1``. ``passes.free_batch`` rewrites those
shapes so that the compiled model takes any batch. Checked here, for each net, exporter and
method: the original outputs of the compiled model equal the file's at its own batch
(bit-identical, ORT optimisations off); the compiled model runs at batch 3, each sample's map
equal to its map alone; the maps equal those of the same net exported with a dynamic batch
(r ≥ 0.9999); top and lowest class give different maps. Also the same nets simplified by
onnxsim and onnxslim (dynamic batch), and the ``allowzero`` semantics of the rewritten targets.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import agf_onnx
from agf_onnx.compiler import passes

from . import models
from . import token_models as tm
from .runtime import run, session

NETS = {"cnn": lambda: models.seeded(models.ResNetish()), "vit": lambda: tm.vit(0),
        "vit-mha": lambda: tm.vit(2, attention="torch"), "vit-mean": lambda: tm.vit(1, pool="mean")}
IMAGE = 32


def export_fixed(name: str, exporter: str, batch: int = 1) -> onnx.ModelProto:
    """The net exported the way most users do: an example input of ``batch`` images, no dynamic axes."""
    net = NETS[name]().eval()
    example = torch.randn(batch, 3, IMAGE, IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(net, (example,), dynamo=True, input_names=["x"], optimize=True,
                                     verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def export_dynamic(name: str) -> onnx.ModelProto:
    net = NETS[name]()
    return tm.export(net) if name != "cnn" else models.export(net)


def images(batch: int, seed: int = 0) -> np.ndarray:
    return tm.images(batch, seed).numpy()


def heatmaps(model: onnx.ModelProto, x: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    return run(model, {"x": x, "target": target}, optimize=False)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def check_fixed_batch(name: str, exporter: str, method: str, batch: int = 1) -> None:
    original = export_fixed(name, exporter, batch)
    assert original.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    compiled = agf_onnx.compile(original, method=method)
    x = images(batch)
    top = np.full(batch, -1, np.int64)
    explained = heatmaps(compiled, x, top)
    for output, value in run(original, {"x": x}, optimize=False).items():
        assert np.array_equal(explained[output], value), f"original output {output} changed"
    maps = explained["heatmap"]
    assert maps.shape == (batch, 1, IMAGE, IMAGE) and np.isfinite(maps).all()
    lowest = explained[original.graph.output[0].name].argmin(axis=1)
    assert np.abs(heatmaps(compiled, x, lowest)["heatmap"] - maps).max() > 1e-4, "top and lowest class agree"
    # the compiled model takes any batch: batch 3, each sample explained as if alone
    three = images(3, seed=1)
    together = heatmaps(compiled, three, np.full(3, -1, np.int64))["heatmap"]
    alone = np.concatenate([heatmaps(compiled, three[i:i + 1], np.array([-1]))["heatmap"] for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())
    # the same map as the same net exported with a dynamic batch
    reference = heatmaps(agf_onnx.compile(export_dynamic(name), method=method), three, np.full(3, -1, np.int64))
    for sample in range(3):
        assert pearson(together[sample], reference["heatmap"][sample]) >= 0.9999


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_a_fixed_batch_file_explains_any_batch(name, exporter):
    check_fixed_batch(name, exporter, "agf")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["agf", "gradcam", "lrp", "chefer"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(NETS))
def test_every_method_on_fixed_batch_files(name, exporter, method):
    if method == "chefer" and name == "cnn":
        pytest.skip("chefer needs attention")
    check_fixed_batch(name, exporter, method)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_a_file_exported_at_batch_two(name):
    check_fixed_batch(name, "torchscript", "agf", batch=2)


@pytest.mark.parametrize("tool", ["onnxsim", "onnxslim"])
def test_simplified_files(tool):
    """The dynamic-batch ViT with torch's MultiheadAttention ([T·N, C] reshapes), simplified: the
    simplifier folds its shape computations to constants such as ``[17, -1, 8]``."""
    original = tm.export(NETS["vit-mha"]())
    if tool == "onnxsim":
        onnxsim = pytest.importorskip("onnxsim")
        simplified, ok = onnxsim.simplify(original)
        assert ok
    else:
        onnxslim = pytest.importorskip("onnxslim")
        simplified = onnxslim.slim(original)
    assert not any(n.op_type == "Shape" for n in simplified.graph.node if "attn" in n.name and "Reshape" in n.name)
    compiled = agf_onnx.compile(simplified, method="agf")
    x = images(2)
    explained = heatmaps(compiled, x, np.full(2, -1, np.int64))
    for output, value in run(simplified, {"x": x}, optimize=False).items():
        assert np.array_equal(explained[output], value)
    reference = heatmaps(agf_onnx.compile(original, method="agf"), x, np.full(2, -1, np.int64))["heatmap"]
    for sample in range(2):
        assert pearson(explained["heatmap"][sample], reference[sample]) >= 0.9999


def _reshape_model(target: list[int], allowzero: int, shape: list[int]) -> onnx.ModelProto:
    """x [1, *shape] → Reshape(target, allowzero) → Flatten → MatMul: a one-reshape classifier."""
    features = int(np.prod(shape))
    weights = np.random.default_rng(0).standard_normal((features, 4)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape", allowzero=allowzero),
             helper.make_node("Flatten", ["r"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, *shape])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(target, np.int64), "target"),
                               numpy_helper.from_array(weights, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("target, allowzero, freed", [
    ([1, 16], 1, [-1, 16]),        # dynamo's fixed-batch flatten: a 0 there would be a literal zero
    ([1, 16], 0, [0, 16]),         # older exports' [1, -1] spelled out: copies the batch
    ([1, -1], 0, [0, 16]),
    ([0, 4, 4], 0, [0, 4, 4]),     # already free: kept
    ([-1, 4, 4], 1, [-1, 4, 4]),
])
def test_reshape_targets_are_freed_respecting_allowzero(target, allowzero, freed):
    model = _reshape_model(target, allowzero, [16, 1, 1])
    model, _ = passes.free_batch(model)
    node = next(n for n in model.graph.node if n.op_type == "Reshape")
    value = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))
    assert value.tolist() == freed
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    x = np.random.default_rng(1).standard_normal((3, 16, 1, 1)).astype(np.float32)
    y = session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.reshape(3, 16) @ _weights(model), rtol=1e-5)


def _weights(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
