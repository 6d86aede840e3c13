"""The compiled model's contract: names, shapes, targets, batching, untouched original outputs,
finite maps in degenerate cases."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import agf_onnx

from . import models, oracle
from .runtime import run, session

NET = models.seeded(models.VGGish(), seed=3)
PROTO = models.export(NET, softmax=True)
COMPILED = agf_onnx.compile(PROTO)
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7)).numpy()


def heatmap(model=COMPILED, x=X, target=None):
    feeds = {"x": x} if target is None else {"x": x, "target": np.asarray(target, np.int64)}
    return run(model, feeds)["heatmap"]


def test_interface_names_types_and_shapes():
    sess = session(COMPILED)
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    # a real input (no initializer behind it): every runtime lists it, none can ignore it
    assert list(inputs) == ["x", "target"] and inputs["target"].type == "tensor(int64)"
    assert sess.get_overridable_initializers() == []
    assert [i.name for i in COMPILED.graph.input] == ["x", "target"]
    assert "target" not in {t.name for t in COMPILED.graph.initializer}
    assert list(outputs) == ["y", "heatmap"]
    assert outputs["heatmap"].type == "tensor(float)" and outputs["heatmap"].shape[1:] == [1, 32, 32]
    assert isinstance(outputs["heatmap"].shape[0], str)  # the batch stays dynamic
    assert [o.version for o in COMPILED.opset_import if o.domain in ("", "ai.onnx")] == [17]
    onnx.checker.check_model(COMPILED, full_check=True)


def test_original_outputs_are_bit_identical():
    original = run(PROTO, {"x": X})["y"]
    compiled = run(COMPILED, {"x": X})["y"]
    assert np.array_equal(original, compiled)
    np.testing.assert_allclose(compiled, torch.softmax(NET(torch.from_numpy(X)), 1).detach().numpy(), atol=1e-5)


def test_target_must_be_fed():
    """No silent default: a run that names no class fails rather than explain one the caller did not ask for."""
    with pytest.raises(Exception, match="target"):
        session(COMPILED).run(["heatmap"], {"x": X})


def test_target_minus_one_is_each_samples_top_class():
    logits = NET(torch.from_numpy(X)).argmax(1).numpy()
    default = heatmap()
    np.testing.assert_array_equal(default, heatmap(target=[-1]))
    np.testing.assert_array_equal(default, heatmap(target=[-1, -1, -1, -1]))
    np.testing.assert_allclose(default, heatmap(target=logits), atol=1e-6)


def test_a_single_target_is_broadcast_over_the_batch():
    np.testing.assert_allclose(heatmap(target=[2]), heatmap(target=[2, 2, 2, 2]), atol=1e-6)
    assert not np.allclose(heatmap(target=[2]), heatmap(target=[5]))


def test_a_batch_gives_its_samples_heatmaps():
    targets = [4, -1, 0, 8]
    batch = heatmap(target=targets)
    for i, t in enumerate(targets):
        np.testing.assert_allclose(batch[i:i + 1], heatmap(x=X[i:i + 1], target=[t]), atol=1e-5)


def test_saturated_softmax_gives_a_finite_map():
    saturated = models.seeded(models.VGGish(), seed=3)
    saturated.classifier[-1].bias.data[0] = 1e4  # p_t = 1 exactly in float32: zero gradient
    compiled = agf_onnx.compile(models.export(saturated))
    maps = heatmap(compiled)
    assert np.isfinite(maps).all()
    np.testing.assert_array_equal(maps, 0.0)
    assert np.isfinite(heatmap(compiled, target=[3])).all()


def test_all_zero_image_gives_a_finite_map():
    maps = heatmap(x=np.zeros_like(X))
    assert np.isfinite(maps).all() and maps.shape == (4, 1, 32, 32)


def linear_model():
    """Flatten → Gemm with three classes: class 1's relevance is negative everywhere."""
    weight = np.array([[1.0] * 48, [-1.0] * 48, [0.5] * 48], np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), weight


@pytest.mark.parametrize("target", [0, 1])
def test_all_negative_relevance_is_scaled_by_its_largest_magnitude(target):
    model, weight = linear_model()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).double() + 0.5
    xx = x.clone().requires_grad_(True)
    oracle.target_score(xx.flatten(1) @ torch.from_numpy(weight).double().T, torch.tensor([target] * 2)).backward()
    relevance = (xx * xx.grad).detach()
    assert (relevance.amax((1, 2, 3)) > 0).all() == (target == 0)  # target 1: all negative
    got = heatmap(agf_onnx.compile(model), x.float().numpy(), [target])
    np.testing.assert_allclose(got, oracle.heatmap(relevance).numpy(), rtol=1e-4, atol=1e-6)
    assert np.isfinite(got).all() and np.abs(got).max() <= 3.0 + 1e-5
