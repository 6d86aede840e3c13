"""The spec's numerical helpers as emitted graph fragments, against the oracle's torch versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from agf_onnx.compiler import maths
from agf_onnx.compiler.builder import TARGET_OPSET, GraphBuilder

from . import oracle
from .runtime import run

RNG = np.random.default_rng(1)


def evaluate(fragment, *arrays):
    """Build ``fragment(b, *input_names)`` into a model and run it on ``arrays``."""
    b = GraphBuilder()
    names = [f"in{i}" for i in range(len(arrays))]
    out = fragment(b, *names)
    b.nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(b.nodes, "fragment",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in zip(names, arrays)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET)], ir_version=8)
    return run(model, dict(zip(names, arrays)))["out"]


def sparse(*shape, zeros=0.3):
    x = RNG.standard_normal(shape).astype(np.float32)
    x[RNG.random(shape) < zeros] = 0
    return x


def test_safe_divide_is_zero_where_the_denominator_is():
    a, b = sparse(2, 3, 4, 4), sparse(2, 3, 4, 4)
    got = evaluate(maths.safe_divide, a, b)
    want = oracle.sdiv(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[b == 0] == 0).all()


def test_safe_divide_stays_finite_where_the_shifted_denominator_vanishes():
    a = np.ones((1, 2), np.float32)
    b = np.array([[-1e-9, 0.0]], np.float32)
    assert np.isfinite(evaluate(maths.safe_divide, a, b)).all()


def test_normalise_by_max():
    x = sparse(3, 2, 5, 5)
    got = evaluate(lambda b, x: maths.normalise_by_max(b, x, 4), x)
    np.testing.assert_allclose(got, oracle.nmax(torch.from_numpy(x).double()).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zeros", [0.3, 1.0], ids=["sparse", "all-zero"])
def test_delta_shift_conserves_the_total_of_c(zeros):
    c, r = sparse(3, 4, 6, 6, zeros=zeros), RNG.standard_normal((3, 4, 6, 6)).astype(np.float32)
    got = evaluate(lambda b, c, r: maths.delta_shift(b, c, r, 4), c, r)
    want = oracle.delta_shift(torch.from_numpy(c).double(), torch.from_numpy(r).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if zeros < 1:  # the shift moves r's total out: the sum stays that of C
        np.testing.assert_allclose(got.sum((1, 2, 3)), c.sum((1, 2, 3)), rtol=1e-4, atol=1e-3)
        assert (got[c == 0] == r[c == 0]).all() or np.allclose(got[c == 0], (c + r)[c == 0])
    else:  # nothing to shift against: C + r, finite
        np.testing.assert_allclose(got, c + r, rtol=1e-6)


@pytest.mark.parametrize("partition", ["mixed", "only-positive", "empty"])
def test_factorisation_matches_the_least_squares_solve(partition):
    y = RNG.standard_normal((2, 5, 6, 7)).astype(np.float32)
    phi = RNG.standard_normal((2, 1, 6, 7)).astype(np.float32)
    if partition == "only-positive":
        phi = np.abs(phi)
    elif partition == "empty":
        phi = np.zeros_like(phi)
    got = evaluate(lambda b, y, p: maths.factorise(b, y, p, (5, 6, 7)), y, phi)
    want = oracle.factorise(torch.from_numpy(y).double(), torch.from_numpy(phi).double()).numpy()
    assert got.shape == (2, 1, 6, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("once", [False, True], ids=["full-size", "once"])
def test_safe_divide_of_a_nonnegative_denominator(once):
    a, b = sparse(2, 3, 4, 4), np.abs(sparse(2, 3, 4, 4))
    b[0, 0, 0, :2] = [1e-38, 1e-45]  # tiny and subnormal denominators divide, they are not 0
    got = evaluate(lambda g, a, b: maths.safe_divide(g, a, b, nonnegative=True, once=once), a, b)
    want = oracle.sdiv(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[b == 0] == 0).all() and np.isfinite(got).all()


def test_retained_is_x_times_the_safe_ratio():
    phi, x = sparse(2, 3, 5, 5), np.abs(sparse(2, 3, 5, 5))
    got = evaluate(maths.retained, phi, x)
    x64 = torch.from_numpy(x).double()
    np.testing.assert_allclose(got, (x64 * oracle.sdiv(torch.from_numpy(phi).double(), x64)).numpy(), rtol=1e-6,
                               atol=1e-7)
    assert (got[x == 0] == 0).all()


def test_scaled_normalise_by_max():
    x = sparse(3, 2, 5, 5)
    got = evaluate(lambda b, x: maths.normalise_by_max(b, x, 4, scale=10.0), x)
    np.testing.assert_allclose(got, 10 * oracle.nmax(torch.from_numpy(x).double()).numpy(), rtol=1e-5, atol=1e-5)


def test_nonzero_is_the_test_x_not_0():
    x = np.array([[0.0, -0.0, 1e-45, -3.0, np.inf]], np.float32)
    np.testing.assert_array_equal(evaluate(maths.nonzero, x), [[0, 0, 1, 1, 1]])
