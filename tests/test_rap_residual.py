"""RAP at a residual sum ``Y = X1 + X2`` (spec "RAP at a residual sum"): the default split by
magnitude ``Φ|Xi| / (|X1| + |X2| + 1e-9)`` and the authors' signed ratio ``Φ·Xi/Y`` (option
``residual="signed"``), each against NumPy in float64 on one Add node, then which rule each
method's plan gives a residual Add of a ResNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agf_onnx
from agf_onnx import CompileError
from agf_onnx.compiler import passes
from agf_onnx.compiler.methods import METHODS, get_method, with_options
from agf_onnx.compiler.planning import plan

from . import models
from .runtime import run
from .test_gradients import Case, one_node_model
from .test_rules_relevance import relevance_of

#: Y = X1 + X2 with X2 broadcast over the spatial axes (a bias-like branch) and without
CASES = [Case("Add", (2, 40), torch.add, operands=[(2, 4, 5), (2, 4, 5)], id="same-shape"),
         Case("Add", (2, 24), torch.add, operands=[(2, 4, 5), (2, 4, 1)], id="broadcast")]


def _branches(case: Case, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = [int(np.prod(shape[1:])) for shape in case.operands]
    first, second = np.split(x.astype(np.float64), [sizes[0]], axis=1)
    return first.reshape(-1, *case.operands[0][1:]), second.reshape(-1, *case.operands[1][1:])


def _rule(case: Case, kind: str, x: np.ndarray, relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shares, _ = relevance_of(one_node_model(case), "Add_under_test", kind, x, relevance)
    return shares["operand0"].astype(np.float64), shares["operand1"].astype(np.float64)


def _inputs(case: Case, seed: int, cancelling: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape).astype(np.float32)
    if cancelling:  # the branches nearly cancel: X2 = −X1 + tiny where shapes allow
        first, _ = _branches(case, x)
        if case.operands[1] == case.operands[0]:
            second = -first + 1e-6 * rng.standard_normal(first.shape)
            x = np.concatenate([first.reshape(len(x), -1), second.reshape(len(x), -1)], 1).astype(np.float32)
    relevance = rng.standard_normal((case.shape[0], *case.operands[0][1:])).astype(np.float32)
    return x, relevance


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_magnitude_split_against_numpy(case):
    x, relevance = _inputs(case, seed=1)
    first, second = _branches(case, x)
    shares = _rule(case, "magnitude", x, relevance)
    magnitude = np.abs(first) + np.abs(second)
    expected = [relevance * np.abs(first) / (magnitude + 1e-9), relevance * np.abs(second) / (magnitude + 1e-9)]
    expected[1] = expected[1].sum(axis=tuple(a for a, d in enumerate(case.operands[1]) if d == 1 and a > 0),
                                  keepdims=True)  # un-broadcast: summed over the axes X2 was spread on
    for got, want in zip(shares, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # conservation: the shares add up to Φ per sample
    np.testing.assert_allclose(shares[0].sum((1, 2)) + shares[1].sum((1, 2)), relevance.sum((1, 2)), rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_authors_signed_ratio_against_numpy(case):
    x, relevance = _inputs(case, seed=2)
    first, second = _branches(case, x)
    total = first + second
    ratio = np.where(total != 0, relevance / np.where(total >= 0, total + 1e-9, total - 1e-9), 0.0)
    expected = [first * ratio, (second * ratio).sum(
        axis=tuple(a for a, d in enumerate(case.operands[1]) if d == 1 and a > 0), keepdims=True)]
    for got, want in zip(_rule(case, "merge", x, relevance), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_where_the_branches_cancel_the_split_stays_within_phi_and_the_ratio_does_not():
    case = CASES[0]
    x, relevance = _inputs(case, seed=3, cancelling=True)
    magnitude = _rule(case, "magnitude", x, relevance)
    assert max(np.abs(share).max() for share in magnitude) <= np.abs(relevance).max() * (1 + 1e-6)
    signed = _rule(case, "merge", x, relevance)
    assert max(np.abs(share).max() for share in signed) > 1e3 * np.abs(relevance).max()


@pytest.fixture(scope="module")
def resnet():
    return passes.canonicalise(models.export(models.seeded(models.ResNetish(), seed=3), 32))


def _residual_kinds(canonical, method) -> set[str]:
    found = plan(canonical, method=method)
    residual = [n.name for n in found.path if n.op_type == "Add" and len([i for i in n.input if i in found.data]) == 2]
    assert residual, "the ResNet has residual Adds"
    return {found.kinds[name] for name in residual}


def test_rap_splits_residual_sums_by_magnitude_unless_told_signed(resnet):
    rap = get_method("rap")
    assert _residual_kinds(resnet, rap) == {"magnitude"}
    assert _residual_kinds(resnet, with_options(rap, {"residual": "signed"})) == {"merge"}
    for name in ("agf", "lrp", "clrp"):  # the split is RAP's alone
        assert _residual_kinds(resnet, METHODS[name]) == {"merge"}


def test_the_option_changes_the_map_and_is_refused_elsewhere(resnet):
    model = models.export(models.seeded(models.ResNetish(), seed=3), 32)
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    feeds = {"x": x, "target": np.array([-1, -1], np.int64)}
    default = run(agf_onnx.compile(model, method="rap"), feeds)["heatmap"]
    magnitude = run(agf_onnx.compile(model, method="rap", options={"residual": "magnitude"}), feeds)["heatmap"]
    signed = run(agf_onnx.compile(model, method="rap", options={"residual": "signed"}), feeds)["heatmap"]
    np.testing.assert_array_equal(default, magnitude)
    assert np.isfinite(signed).all() and np.abs(default - signed).max() > 0.1
    with pytest.raises(CompileError, match="--residual signed: only RAP"):
        agf_onnx.compile(model, method="agf", options={"residual": "signed"})
    with pytest.raises(CompileError, match="--residual exact: expected one of magnitude, signed"):
        agf_onnx.compile(model, method="rap", options={"residual": "exact"})
