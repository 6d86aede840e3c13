"""Every opset the exporters write (issue 26): TorchScript at ``opset_version`` 11 … 20, dynamo at its
default and at 21, for a small CNN and a small ViT.

No ``onnx.version_converter``: a model at opset 17 or newer keeps its opset and nodes, the
explanation is emitted at that opset; 11–16 are upgraded to 17 by the project's own adapters
(``passes.upgrade_opset``). For each export and method: the compiled model's original outputs are
bit-identical to the exported file's (ONNX Runtime optimisations off), the heatmap is finite, and
it equals the map of the same net exported at opset 17 (r ≥ 0.9999).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

import agf_onnx
from agf_onnx import modelfile
from agf_onnx.compiler.graph import ai_onnx_opset

from . import models
from . import token_models as tm
from .runtime import run

NETS = {"cnn": lambda: models.seeded(models.ResNetish()), "vit": lambda: tm.vit(0)}
METHODS = {"cnn": ("agf", "gradcam", "lrp"), "vit": ("agf", "gradcam", "lrp", "chefer")}
_CACHE: dict[tuple, onnx.ModelProto] = {}


def export(name: str, exporter: str, opset: int | None) -> onnx.ModelProto:
    key = (name, exporter, opset)
    if key not in _CACHE:
        net = NETS[name]()
        if exporter == "dynamo":
            _CACHE[key] = tm.export(net, dynamo=True, opset=opset)
        else:
            _CACHE[key] = _torchscript(net, opset)
    return _CACHE[key]


def _torchscript(net: torch.nn.Module, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(2, 3, 32, 32),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=opset)
    return onnx.load_from_string(buffer.getvalue())


def check_opset(name: str, exporter: str, opset: int | None, method: str) -> None:
    original = export(name, exporter, opset)
    compiled = agf_onnx.compile(original, method=method)
    written = ai_onnx_opset(original)
    assert ai_onnx_opset(compiled) == max(written, 17)
    x = tm.images(2, seed=3).numpy()
    top = np.full(2, -1, np.int64)
    explained = run(compiled, {"x": x, "target": top}, optimize=False)
    for output, value in run(original, {"x": x}, optimize=False).items():
        assert np.array_equal(explained[output], value), f"opset {written}: original output {output} changed"
    maps = explained["heatmap"]
    assert maps.shape == (2, 1, 32, 32) and np.isfinite(maps).all()
    reference = agf_onnx.compile(export(name, "torchscript", 17), method=method)
    expected = run(reference, {"x": x, "target": top}, optimize=False)["heatmap"]
    for sample in range(2):
        r = np.corrcoef(maps[sample].reshape(-1), expected[sample].reshape(-1))[0, 1]
        assert r >= 0.9999, f"opset {written}, sample {sample}: r = {r:.6f} against the opset-17 export"


# CI: the oldest and newest TorchScript opsets, and dynamo's default (20, one Gelu node per MLP)
@pytest.mark.parametrize("name, exporter, opset", [("cnn", "torchscript", 11), ("vit", "torchscript", 11),
                                                   ("vit", "torchscript", 20), ("vit", "dynamo", None)])
def test_opsets_in_ci(name, exporter, opset):
    check_opset(name, exporter, opset, "agf")


@pytest.mark.slow
@pytest.mark.parametrize("opset", range(11, 21))
@pytest.mark.parametrize("name", list(NETS))
def test_every_torchscript_opset(name, opset):
    for method in METHODS[name]:
        check_opset(name, "torchscript", opset, method)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [None, 18, 21])
@pytest.mark.parametrize("name", list(NETS))
def test_dynamo_opsets(name, opset):
    for method in METHODS[name]:
        check_opset(name, "dynamo", opset, method)


def test_opset_12_softmax_over_a_middle_axis_is_the_flattened_softmax():
    """Before opset 13 Softmax normalises over every axis from ``axis`` on: upgraded, it computes the
    same values, bit for bit."""
    from onnx import TensorProto, helper

    from agf_onnx.compiler import passes

    nodes = [helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    upgraded, changed = passes.upgrade_opset(modelfile.load(model))
    assert changed and ai_onnx_opset(upgraded) == 17
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    assert np.array_equal(run(upgraded, {"x": x}, optimize=False)["y"], run(model, {"x": x}, optimize=False)["y"])
    flat = np.exp(x.reshape(2, 12) - x.reshape(2, 12).max(1, keepdims=True))
    np.testing.assert_allclose(run(upgraded, {"x": x})["y"], (flat / flat.sum(1, keepdims=True)).reshape(2, 3, 4),
                               rtol=1e-6)
