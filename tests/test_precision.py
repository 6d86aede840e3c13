"""``tools/precision.py``'s TF32 emulation: the rounding graph, run by ONNX Runtime, against NumPy bit
manipulation on every class of float32 value, and the rewritten conv/GEMM against its definition."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.runtime.sessions import create_session
from tools import precision


def run_rounding(values: np.ndarray, bits: int = 10) -> np.ndarray:
    b = GraphBuilder(["x"])
    y = b.Identity(precision.emit_rounding(b, "x", bits))
    graph = helper.make_graph(b.nodes, "round", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None])], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return create_session(model, "cpu").run(None, {"x": values})[0]


def float32_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(200_000) * np.exp(rng.uniform(-80, 80, 200_000))
    raw = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (raw & ~np.uint32(0x1FFF)) | np.uint32(0x1000)  # exactly halfway between two TF32 values
    subnormal = rng.integers(1, 2 ** 23, 20_000, dtype=np.uint64).astype(np.uint32)  # exponent field 0
    huge = (np.uint32(0x7E000000) + rng.integers(0, 2 ** 24, 20_000, dtype=np.uint64).astype(np.uint32))
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, 2.0 ** -149], np.float32)
    bits = np.concatenate([ties, subnormal, subnormal | np.uint32(0x80000000), huge, huge | np.uint32(0x80000000)])
    return np.concatenate([normal.astype(np.float32), bits.view(np.float32), special])


def test_numpy_rounding_on_known_values():
    eps = 2.0 ** -10  # TF32's spacing at 1
    cases = {1 + eps / 2: 1.0,  # a tie: to the even neighbour, 1
             1 + 3 * eps / 2: 1 + 2 * eps,  # a tie: to the even neighbour, 1 + 2ε
             1 + eps / 2 + 2.0 ** -23: 1 + eps,  # just above the tie: up
             1 + eps: 1 + eps, -(1 + eps / 2): -1.0, 2 - eps / 2: 2.0,  # a carry into the exponent
             2.0 ** -149 * 0x1000: 0.0, 2.0 ** -149 * 0x3000: 2.0 ** -149 * 0x4000}  # subnormal ties
    values = np.array(list(cases), np.float32)
    np.testing.assert_array_equal(precision.round_mantissa(values), np.array(list(cases.values()), np.float32))


def test_the_rounding_graph_equals_bit_manipulation_everywhere():
    values = float32_values()
    got, expected = run_rounding(values), precision.round_mantissa(values)
    # bit for bit, except that a zero may lose its sign (ONNX Runtime's CPU Where turns −0 into +0)
    bitwise = ~np.isnan(expected) & (expected != 0)
    np.testing.assert_array_equal(got.view(np.uint32)[bitwise], expected.view(np.uint32)[bitwise])
    assert (got[expected == 0] == 0).all() and np.isnan(got[np.isnan(expected)]).all()
    assert np.count_nonzero(expected == 0) > 20  # subnormals that round to zero were among the values
    assert np.count_nonzero(got != values) > len(values) // 2  # it did round


@pytest.mark.parametrize("bits", [7, 12])
def test_other_mantissa_widths(bits):
    values = float32_values()[:200_000]  # normal values
    np.testing.assert_array_equal(run_rounding(values, bits), precision.round_mantissa(values, bits))


def test_emulated_conv_and_gemm_use_rounded_operands():
    """Conv → Flatten → Gemm whose weights are read twice: the rewritten graph computes exactly the
    float64 conv/GEMM of the rounded operands (up to float32 accumulation), each tensor rounded once."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    dense = rng.standard_normal((4 * 6 * 6, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "d"], ["y"]),
             helper.make_node("MatMul", ["f", "d"], ["z"])]  # reads f and d again: no second rounding
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5]) for n in ("y", "z")],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(dense, "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    emulated, count = precision.emulate_tf32(model)
    onnx.checker.check_model(emulated, full_check=True)
    assert count == 4  # x, w, f, d
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    y, z = create_session(emulated, "cpu").run(None, {"x": x})

    def r(a):
        return torch.from_numpy(precision.round_mantissa(np.asarray(a, np.float32))).double()

    conv = torch.nn.functional.conv2d(r(x), r(weight), padding=1).flatten(1)
    expected = r(conv.float().numpy()) @ r(dense)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(y, z)
    exact = create_session(model, "cpu").run(["y"], {"x": x})[0]
    assert np.abs(exact - y).max() > 1e-3  # the rounding is visible in the result
