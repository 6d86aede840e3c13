"""Shapes without sentinels: where the batch lives in every tensor (after a Transpose, merged
with the tokens), shape computations folded when only the batch is dynamic (TensorFlow
converters' SAME padding, TorchScript reshapes of a merged batch), and resizes that reach their
target size exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import agf_onnx
from agf_onnx.compiler import maths, passes
from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.emit import gradient_model
from agf_onnx.compiler.graph import GraphView

from . import models
from .runtime import run

RNG = np.random.default_rng(5)


def _canonical(model: onnx.ModelProto) -> GraphView:
    return GraphView(passes.canonicalise(model))


def _int64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def test_probe_batches_are_small():
    # the two batch sizes shapes are inferred at: small, so Range(0, N) and the like stay small
    assert len(passes.PROBE_BATCHES) == 2 and max(passes.PROBE_BATCHES) <= 16


def test_batch_axis_follows_transposes_and_merges():
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["heads"]),  # [N, 2, 3, 4]
        helper.make_node("Transpose", ["heads"], ["moved"], perm=[1, 0, 2, 3]),  # [2, N, 3, 4]
        helper.make_node("Reshape", ["x", "merge"], ["merged"]),  # [N·6, 4]
    ]
    graph = helper.make_graph(
        nodes, "layout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("moved", "merged")],
        [_int64("split", [0, 2, 3, 4]), _int64("merge", [-1, 4])])
    view = _canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert view.shape("moved") == (2, None, 3, 4) and view.batch("moved") == (1, 1)
    assert view.shape("merged") == (None, 4) and view.batch("merged") == (0, 6)
    assert view.batch("x") == (0, 1)


def _same_padding_model(computed: bool) -> onnx.ModelProto:
    """A channels-last classifier as TensorFlow converters write it: SAME padding computed from
    ``Shape → Gather → Sub → Concat → Pad`` (``computed``) or given as a constant."""
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    dense = rng.standard_normal((4, 5)).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(dense, "d"),
                    _int64("perm_axis", 2), _int64("fifteen", 15), _int64("zeros", [0, 0])]
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2])]
    if computed:
        nodes += [helper.make_node("Shape", ["nchw"], ["shape"]),
                  helper.make_node("Gather", ["shape", "perm_axis"], ["height"], axis=0),
                  helper.make_node("Sub", ["height", "fifteen"], ["one"]),
                  helper.make_node("Unsqueeze", ["one", "axis0"], ["one_1d"]),
                  helper.make_node("Concat", ["zeros", "one_1d", "one_1d", "zeros", "one_1d", "one_1d"], ["pads"],
                                   axis=0)]
        initializers.append(_int64("axis0", [0]))
    else:
        initializers.append(_int64("pads", [0, 0, 1, 1, 0, 0, 1, 1]))
    nodes += [helper.make_node("Pad", ["nchw", "pads"], ["padded"]),
              helper.make_node("Conv", ["padded", "w"], ["conv"], kernel_shape=[3, 3]),
              helper.make_node("Relu", ["conv"], ["relu"]),
              helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "d"], ["logits"])]
    graph = helper.make_graph(nodes, "same_padding",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 16, 16, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_padding_computed_from_shape_folds():
    computed = agf_onnx.compile(_same_padding_model(computed=True))
    constant = agf_onnx.compile(_same_padding_model(computed=False))
    image = RNG.random((3, 16, 16, 3)).astype(np.float32)
    a, b = run(computed, {"image": image}), run(constant, {"image": image})
    np.testing.assert_array_equal(a["logits"], b["logits"])
    np.testing.assert_allclose(a["heatmap"], b["heatmap"], atol=1e-6)
    assert np.ptp(a["heatmap"]) > 0


class MergedBatch(nn.Module):
    """LeViT's pattern: tokens flattened into the batch for a BatchNorm1d, then split back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # [N, T, C]
        tokens = self.norm(tokens.reshape(-1, c)).reshape(n, -1, c)  # through [N·T, C]
        return self.head(torch.relu(tokens).mean(1))


def test_reshape_of_a_merged_batch_folds_to_minus_one():
    net = models.seeded(MergedBatch(), seed=3, image=16)
    proto = models.export(net, image=16)
    view = _canonical(proto)
    splits = [n for n in view.nodes if n.op_type == "Reshape" and view.batch(n.input[0]) == (0, 64)]
    assert splits, "the export should split the merged batch back"
    for node in splits:  # 0 would copy N·64 into the batch position
        assert view.is_constant(node.input[1]) and view.value(node.input[1])[0] == -1
    compiled = agf_onnx.compile(proto)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = run(compiled, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out["y"], net(x).numpy(), atol=1e-5)
    assert np.isfinite(out["heatmap"]).all() and out["heatmap"].shape == (3, 1, 16, 16)


def test_gradient_through_a_merged_batch_matches_autograd():
    net = models.seeded(MergedBatch(), seed=4, image=16).double()
    proto = models.export(net.float(), image=16)
    model = gradient_model(proto)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    upstream = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = run(model, {"x": x.detach().float().numpy(), "gradient_in": upstream.float().numpy()})
    (net.double()(x) * upstream).sum().backward()
    np.testing.assert_allclose(out["gradient_out"], x.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("source", "target"), [(46, 48), (21, 48), (3, 64), (7, 224), (14, 224), (10, 48), (4, 48)])
def test_resize_scales_reach_the_target_size(source, target):
    b = GraphBuilder()
    resized = maths.resize(b, "x", (source, source), (target, target))
    scales = numpy_helper.to_array(b.initializers[-1])
    for scale in scales[2:]:  # ONNX shape inference (float64) and ONNX Runtime (float32) both truncate
        assert target <= float(scale) * source < target + 1
        assert target <= np.float32(scale * np.float32(source)) < target + 1
    graph = helper.make_graph(b.nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, source, source])],
                              [helper.make_tensor_value_info(resized, TensorProto.FLOAT, None)], b.initializers)
    out = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              {"x": RNG.random((1, 1, source, source)).astype(np.float32)})
    assert next(iter(out.values())).shape == (1, 1, target, target)


def test_fullgrad_on_mtcnn_onet():
    from .test_real_graphs import export_onet

    proto, _ = export_onet()
    compiled = agf_onnx.compile(proto, method="fullgrad", logits="prob")
    out = run(compiled, {compiled.graph.input[0].name: RNG.random((2, 3, 48, 48)).astype(np.float32)})
    assert out["heatmap"].shape == (2, 1, 48, 48) and np.isfinite(out["heatmap"]).all()
    assert np.ptp(out["heatmap"]) > 0


def test_opset_18_pad_keeps_its_opset():
    # torch's dynamo exporter writes opset 18; the model keeps it (ONNX's converter has no 18 → 17
    # step for Pad), the explanation is written at 18
    model = _same_padding_model(computed=False)
    model.opset_import[0].version = 18
    compiled = agf_onnx.compile(model)
    assert [o.version for o in compiled.opset_import if o.domain == ""] == [18]
    assert {o.domain for o in compiled.opset_import} == {""}
    reference = agf_onnx.compile(_same_padding_model(computed=False))
    image = RNG.random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(run(compiled, {"image": image})["heatmap"], run(reference, {"image": image})["heatmap"],
                               atol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opset_20_gelu_keeps_its_node(approximate):
    # torch's dynamo exporter writes GELU as one Gelu node at its default opset: the node stays (the
    # original outputs bit-identical), its rule gives the map of GELU written out in opset-17 ops
    rng = np.random.default_rng(9)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    d = rng.standard_normal((4, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], kernel_shape=[3, 3]),
             helper.make_node("Gelu", ["conv"], ["gelu"], approximate=approximate),
             helper.make_node("GlobalAveragePool", ["gelu"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "d"], ["logits"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(d, "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    compiled = agf_onnx.compile(model)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = run(compiled, {"x": x})
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w))
    expected = torch.nn.functional.gelu(conv, approximate=approximate).mean((2, 3)) @ torch.from_numpy(d)
    np.testing.assert_allclose(out["logits"], expected.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(run(model, {"x": x}, optimize=False)["logits"],
                          run(compiled, {"x": x}, optimize=False)["logits"])
    assert np.isfinite(out["heatmap"]).all() and np.ptp(out["heatmap"]) > 0
    written_out = _gelu_written_out(model, approximate)
    reference = run(agf_onnx.compile(written_out), {"x": x})["heatmap"]
    np.testing.assert_allclose(out["heatmap"], reference, rtol=1e-4, atol=1e-5)


def _gelu_written_out(model: onnx.ModelProto, approximate: str) -> onnx.ModelProto:
    """The model at opset 17 with its Gelu in the form TorchScript exports."""
    nodes, constants = [], {"half": 0.5, "one": 1.0, "root2": float(np.sqrt(2.0)), "c": 0.044715,
                            "root2pi": float(np.sqrt(2 / np.pi))}
    for node in model.graph.node:
        if node.op_type != "Gelu":
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        if approximate == "tanh":
            nodes += [helper.make_node("Mul", [x, x], ["sq"]), helper.make_node("Mul", [x, "sq"], ["cube"]),
                      helper.make_node("Mul", ["cube", "c"], ["cc"]), helper.make_node("Add", [x, "cc"], ["inner"]),
                      helper.make_node("Mul", ["inner", "root2pi"], ["u"]), helper.make_node("Tanh", ["u"], ["gate0"])]
        else:
            nodes += [helper.make_node("Div", [x, "root2"], ["u"]), helper.make_node("Erf", ["u"], ["gate0"])]
        nodes += [helper.make_node("Add", ["gate0", "one"], ["gate"]), helper.make_node("Mul", [x, "gate"], ["xg"]),
                  helper.make_node("Mul", ["xg", "half"], [y])]
    graph = helper.make_graph(nodes, "gelu17", list(model.graph.input), list(model.graph.output),
                              [*model.graph.initializer,
                               *(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in constants.items())])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
