"""Input graphs as they come: older opsets and IR versions, weights in Constant nodes or behind
weight-only subgraphs, external data, dynamic image sizes, models with unsupported ops."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import agf_onnx
from agf_onnx import CompileError, UnsupportedOpsError

from . import models
from .runtime import run
from .test_parity import assert_matches_oracle

VGG = models.seeded(models.VGGish(), seed=11)
RESNET = models.seeded(models.ResNetish(), seed=12)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def legacy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same network as an IR 3 file: initializers listed as inputs, the first conv's weight
    in a Constant node, the classifier's last weight stored transposed behind a Transpose node."""
    graph = proto.graph
    proto.ir_version = 3
    conv = next(n for n in graph.node if n.op_type == "Conv")
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1]
    weights = {t.name: t for t in graph.initializer}
    conv_weight = weights[conv.input[1]]
    graph.initializer.remove(conv_weight)
    graph.node.insert(0, helper.make_node("Constant", [], [conv.input[1]], value=conv_weight))
    gemm_weight = weights[gemm.input[1]]
    transposed = numpy_helper.from_array(numpy_helper.to_array(gemm_weight).T.copy(), gemm_weight.name + "_t")
    graph.initializer.remove(gemm_weight)
    graph.initializer.append(transposed)
    graph.node.insert(0, helper.make_node("Transpose", [transposed.name], [gemm_weight.name], perm=[1, 0]))
    for tensor in graph.initializer:
        graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return proto


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_older_opsets_and_ir3_files(opset):
    proto = legacy(models.export(VGG, opset=opset))
    assert [o.version for o in proto.opset_import] == [opset]
    compiled = agf_onnx.compile(proto)
    assert [o.version for o in compiled.opset_import if o.domain == ""] == [17]
    assert_matches_oracle(VGG, compiled, X)


def test_external_data(tmp_path):
    path = tmp_path / "vgg.onnx"
    onnx.save(models.export(VGG), path, save_as_external_data=True, location="vgg.weights", size_threshold=0)
    assert (tmp_path / "vgg.weights").exists()
    assert_matches_oracle(VGG, agf_onnx.compile(path), X)
    unloaded = onnx.load(path, load_external_data=False)
    with pytest.raises(CompileError, match="external data"):
        agf_onnx.compile(unloaded)


def dynamic_size_export() -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(RESNET, (X,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def test_dynamic_image_size_needs_and_takes_an_input_shape():
    proto = dynamic_size_export()
    with pytest.raises(CompileError, match="--input-shape"):
        agf_onnx.compile(proto)
    compiled = agf_onnx.compile(proto, input_shapes={"x": [1, 3, 32, 32]})
    assert_matches_oracle(RESNET, compiled, X)  # the batch stays dynamic despite the 1 given


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.sin(self.conv(x))
        h = torch.cos(h) + torch.sin(h)
        return self.fc(h.mean((2, 3)))


def test_unsupported_ops_are_all_listed_with_their_nodes():
    with pytest.raises(UnsupportedOpsError) as caught:
        agf_onnx.compile(models.export(WithUnsupported()))
    assert set(caught.value.unsupported) == {"Sin", "Cos"}
    assert len(caught.value.unsupported["Sin"]) == 2
    message = str(caught.value)
    for names in caught.value.unsupported.values():
        assert all(name in message for name in names)
    assert caught.value.exit_code == 2


def test_logits_are_found_before_a_trailing_softmax_and_can_be_named():
    with_softmax = agf_onnx.compile(models.export(VGG, softmax=True))
    plain = agf_onnx.compile(models.export(VGG))
    np.testing.assert_allclose(run(with_softmax, {"x": X.numpy()})["heatmap"],
                               run(plain, {"x": X.numpy()})["heatmap"], atol=1e-6)
    with pytest.raises(CompileError, match="no tensor 'nope'"):
        agf_onnx.compile(models.export(VGG), logits="nope")


def test_two_candidate_outputs_need_logits():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = models.seeded(models.VGGish(), seed=1)

        def forward(self, x):
            y = self.body(x)
            return y, torch.softmax(y, 1)

    buffer = io.BytesIO()
    torch.onnx.export(TwoHeads().eval(), (X,), buffer, dynamo=False, input_names=["x"], output_names=["a", "b"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17)
    proto = onnx.load_from_string(buffer.getvalue())
    with pytest.raises(CompileError, match=r"several \[N, classes\] float outputs \(a, b\).*--logits"):
        agf_onnx.compile(proto)
    compiled = agf_onnx.compile(proto, logits="a")
    outputs = run(compiled, {"x": X.numpy()})
    assert set(outputs) == {"a", "b", "heatmap"} and np.isfinite(outputs["heatmap"]).all()


def test_file_size_stays_within_a_tenth_of_the_input():
    # weights dominate real classifiers: |W|, W⁺, W⁻ and conv(1, |W|) must be computed in the graph
    net = models.VGGish(widths=(64, "M", 128, 128, "M", 256, "M"), hidden=256)
    proto = models.export(models.seeded(net, seed=2))
    compiled = agf_onnx.compile(proto)
    assert compiled.ByteSize() <= 1.1 * proto.ByteSize()


def as_matmul_add(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every ``Gemm(x, W, b, transB=1)`` rewritten as ``MatMul(x, Wᵀ) + b`` (how exporters write
    linear layers on N-D inputs)."""
    graph = proto.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]]).T.copy()
        graph.initializer.append(numpy_helper.from_array(weight, node.input[1] + "_kn"))
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1] + "_kn"], [node.output[0] + "_mm"],
                                      name=node.name + "_matmul"))
        nodes.append(helper.make_node("Add", [node.output[0] + "_mm", node.input[2]], [node.output[0]],
                                      name=node.name + "_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def test_matmul_plus_add_is_a_linear_layer():
    proto = as_matmul_add(models.export(VGG))
    assert {"MatMul", "Add"} <= {n.op_type for n in proto.graph.node} and "Gemm" not in {n.op_type for n in proto.graph.node}
    assert_matches_oracle(VGG, agf_onnx.compile(proto), X)


class ChannelsLast(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2))


def test_channels_last_image_gives_an_n1hw_map():
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ChannelsLast(RESNET).eval(), (X.permute(0, 2, 3, 1),), buffer, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}}, opset_version=17)
    proto = onnx.load_from_string(buffer.getvalue())
    maps = run(agf_onnx.compile(proto), {"x": X.permute(0, 2, 3, 1).numpy()})["heatmap"]
    assert maps.shape == (2, 1, 32, 32)
    expected = run(agf_onnx.compile(models.export(RESNET)), {"x": X.numpy()})["heatmap"]
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_explanation_graph_has_no_shape_arithmetic():
    compiled = agf_onnx.compile(models.export(RESNET, fold=False))
    shapes = {o for n in compiled.graph.node if n.op_type in ("Shape", "Size") for o in n.output}
    emitted = {n.op_type for n in compiled.graph.node if n.name.startswith("agf/")
               if n.op_type in ("Shape", "Size") or n.op_type == "Gather" and n.input[0] in shapes}
    assert not emitted  # ONNX Runtime would run those on the CPU (a Gather of float data, as MaxPool's VJP has, is not)
