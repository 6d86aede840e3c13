"""What keeps the explanation graph lean, checked on the graph itself: identical nodes emitted once,
small constant arithmetic done at compile time, dead nodes dropped, the non-negativity the cheaper
sdiv forms rely on, and the node counts of VGG-11 and ResNet-18 layouts (issue: at most half of
the 1,749 and 2,477 nodes they compiled to before)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import agf_onnx
from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import GraphView

from . import models
from .runtime import run

VGG11 = (8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M")


def test_identical_nodes_are_emitted_once_and_random_ones_always():
    b = GraphBuilder()
    assert b.Mul("x", "y") == b.Mul("x", "y") != b.Mul("y", "x")
    assert b.Cast("x", to=9) != b.Cast("x", to=1)
    assert b.RandomNormalLike("x") != b.RandomNormalLike("x")
    assert [n.op_type for n in b.nodes] == ["Mul", "Mul", "Cast", "Cast", "RandomNormalLike", "RandomNormalLike"]


def test_removed_nodes_are_emitted_again_when_asked_for():
    b = GraphBuilder()
    first = b.Abs("x")
    b.remove(list(b.nodes))
    assert b.Abs("x") != first and len(b.nodes) == 1


def test_small_constant_arithmetic_is_done_at_compile_time_as_onnx_runtime_does_it():
    gamma = np.random.default_rng(0).uniform(0.5, 2, 64).astype(np.float32)
    variance = np.random.default_rng(1).uniform(0, 3, 64).astype(np.float32)
    known = {"gamma": gamma, "variance": variance}
    b = GraphBuilder(constant=known.get)
    scale = b.Reshape(b.Div("gamma", b.Sqrt(b.Add("variance", b.const(1e-5)))), b.ints([1, -1, 1, 1]))
    assert not b.nodes  # folded into one initializer
    folded = numpy_helper.to_array(next(t for t in b.initializers if t.name == scale))
    graph = helper.make_graph(
        [helper.make_node("Add", ["variance", "eps"], ["s"]), helper.make_node("Sqrt", ["s"], ["r"]),
         helper.make_node("Div", ["gamma", "r"], ["out"])], "bn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64]) for n in ("gamma", "variance")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(1e-5, np.float32), "eps")])
    ours = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), known)["out"]
    np.testing.assert_array_equal(folded.reshape(-1), ours)  # bit for bit
    assert b.Abs(b.const(np.ones(5000, np.float32))) and b.nodes  # large constants stay for ONNX Runtime


def _graph(nodes, inputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1, 4, 6, 6])
                                           for i in inputs], [],
                              [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
                               {"zero": 0.0, "six": 6.0, "minus": -1.0, "two": 2.0}.items()])
    return GraphView(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("tensor, nonnegative", [
    ("relu", True), ("pooled", True), ("relu6", True), ("clipped", False), ("open_clip", False), ("scaled", True),
    ("shifted", False), ("x", False), ("sum", True), ("difference", False)])
def test_nonnegative_tensors_are_those_built_so(tensor, nonnegative):
    view = _graph([
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pooled"], kernel_shape=[2, 2]),
        helper.make_node("Clip", ["x", "zero", "six"], ["relu6"]),
        helper.make_node("Clip", ["x", "minus", "six"], ["clipped"]),
        helper.make_node("Clip", ["x", "", "six"], ["open_clip"]),
        helper.make_node("Mul", ["pooled", "two"], ["scaled"]),
        helper.make_node("Add", ["relu", "minus"], ["shifted"]),
        helper.make_node("Add", ["relu", "relu6"], ["sum"]),
        helper.make_node("Sub", ["relu", "relu6"], ["difference"]),
    ], ["x"])
    assert view.nonnegative(tensor) is nonnegative


def test_nodes_no_output_needs_are_dropped():
    net = models.seeded(models.ResNetish())
    compiled = agf_onnx.compile(models.export(net, fold=False))
    needed = {o.name for o in compiled.graph.output}
    for node in reversed(compiled.graph.node):
        assert needed.intersection(node.output) or not node.name.startswith("agf/"), node.name
        needed.update(node.input)
    # the stem's gradient (the image's) is never read by AGF's rules
    assert not any(n.name.startswith("agf/conv1/") and "/vjp/" in n.name for n in compiled.graph.node)


@pytest.mark.parametrize("build, ceiling", [
    (lambda: models.VGGish(widths=VGG11, image=32), 1749 // 2),
    (lambda: models.ResNetish(models.BasicBlock, (2, 2, 2, 2), (8, 8, 16, 16), stem=8, stem_kernel=7), 2477 // 2),
], ids=["vgg11", "resnet18"])
def test_node_counts_are_at_most_half_of_what_they_were(build, ceiling):
    compiled = agf_onnx.compile(models.export(models.seeded(build()), fold=False))
    assert len(compiled.graph.node) <= ceiling
    onnx.checker.check_model(compiled)
