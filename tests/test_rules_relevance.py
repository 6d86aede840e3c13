"""The relevance rules of token models (spec "Beyond the paper"), each against a slow, obvious
reference written from its definition (explicit contributions ``z_ij`` of each input to each
output, or ``torch.autograd`` for the adjoint of a move), plus conservation where the rule conserves.

A rule runs on a one-node graph (``relevance_of``): the node's incoming relevance and gradient are
graph inputs, its rules are emitted with the same builder and views as the compiler's walk, and
ONNX Runtime runs the result in float32; references run in float64.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from agf_onnx.rules import REGISTRY
from onnx import TensorProto, helper, numpy_helper

from agf_onnx import modelfile
from agf_onnx.compiler import passes
from agf_onnx.compiler.builder import GraphBuilder
from agf_onnx.compiler.graph import GraphView, NodeView
from agf_onnx.errors import CompileError

from . import oracle
from .runtime import run
from .test_gradients import Case, input_shape, one_node_model, split_operands

RNG = np.random.default_rng(7)


def _info(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N" if d is None else d for d in shape])


def relevance_of(model: onnx.ModelProto, node_name: str, kind: str, x: np.ndarray, relevance: np.ndarray,
                 gradient: np.ndarray | None = None) -> dict:
    """Run the ``kind`` relevance rule of node ``node_name`` (after its gradient rule) with ``relevance``
    and ``gradient`` at its first output; returns ``{input name: Φ}`` and ``{input name: value}``."""
    canonical = passes.canonicalise(modelfile.load(model))
    graph = GraphView(canonical)
    data = graph.data_flow("x")[1]
    proto = next(n for n in graph.nodes if n.name == node_name)
    taken = {n.name for n in canonical.graph.node} | {t for n in canonical.graph.node for t in [*n.input, *n.output]}
    b = GraphBuilder(reserved=taken | {"relevance_in", "gradient_in", "x"})
    extra = [None] * (len(proto.output) - 1)
    node = NodeView(proto, graph, frozenset(i for i in proto.input if i in data),
                    gradient=["gradient_in", *extra], relevance=["relevance_in", *extra])
    entry = REGISTRY[proto.op_type]
    with b.scope(f"{proto.name}/vjp"):
        node.input_gradients = entry.gradient(b, node)
    with b.scope(f"{proto.name}/rel"):
        results = entry.relevance[kind](b, node)
    assert len(results) == len(proto.input)
    out_shape = graph.shape(proto.output[0])
    canonical.graph.input.extend([_info("relevance_in", out_shape), _info("gradient_in", out_shape)])
    canonical.graph.node.extend(b.nodes)
    canonical.graph.initializer.extend(b.initializers)
    names = {}
    for i, (name, result) in enumerate(zip(proto.input, results)):
        if result is not None:
            names[name] = f"relevance_{i}"
            canonical.graph.node.append(helper.make_node("Identity", [result], [f"relevance_{i}"]))
    del canonical.graph.output[:]
    wanted = [*names.values(), *(i for i in proto.input if i in data), proto.output[0]]
    canonical.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in wanted)
    feeds = {"x": x, "relevance_in": relevance.astype(np.float32),
             "gradient_in": (gradient if gradient is not None else relevance).astype(np.float32)}
    got = run(canonical, feeds)
    return {name: got[out] for name, out in names.items()}, got


def _case_run(case: Case, kind: str, positive: bool = False):
    """The rule of ``case``'s node on random data and relevance: (Φ per input, values, x, Φ_out)."""
    x = RNG.standard_normal(input_shape(case)).astype(np.float32)
    if positive or case.positive:
        x = np.abs(x) + 0.5
    model = one_node_model(case)
    forward = run(model, {"x": x})["y"]
    relevance = RNG.standard_normal(forward.shape).astype(np.float32)
    relevance[..., 0] = 0.0  # some zeros, as a real relevance map has (the mask 1[Φ≠0])
    shares, values = relevance_of(model, f"{case.op}_under_test", kind, x, relevance)
    return shares, values, x, relevance


def _double(*arrays):
    return [torch.from_numpy(np.asarray(a)).double() for a in arrays]


def sdiv(a, b):
    return np.where(b != 0, a / (b + 1e-9), 0.0)


# -- pass-through and element-wise -------------------------------------------------------------------

PASS_THROUGH = [
    (Case("LayerNormalization", (2, 5, 8), None, constants=[RNG.standard_normal(8).astype(np.float32)] * 2), "pass"),
    (Case("InstanceNormalization", (2, 3, 4, 5), None, constants=[RNG.standard_normal(3).astype(np.float32)] * 2),
     "pass"),
    (Case("Neg", (2, 3, 4), None), "pass"),
    (Case("LpNormalization", (2, 3, 5), None, attrs=dict(axis=-1, p=2)), "pass"),
]


@pytest.mark.parametrize("case,kind", PASS_THROUGH, ids=[c.op for c, _ in PASS_THROUGH])
def test_normalisations_and_neg_pass_relevance_through(case, kind):
    shares, _, _, relevance = _case_run(case, kind)
    np.testing.assert_array_equal(shares["x"], relevance)


ACTIVE = [Case("Erf", (2, 3, 4), None), Case("Gelu", (2, 3, 4), None, opset=20), Case("Exp", (2, 3, 4), None), Case("Sqrt", (2, 3, 4), None),
          Case("Reciprocal", (2, 3, 4), None), Case("Softplus", (2, 3, 4), None),
          Case("Pow", (2, 3, 4), None, constants=[np.float32(2)]),
          Case("Max", (2, 3, 4), None, constants=[np.float32(0.0)]),
          Case("Min", (2, 3, 4), None, constants=[np.float32(0.0)])]


@pytest.mark.parametrize("case", ACTIVE, ids=[c.op for c in ACTIVE])
def test_element_wise_functions_pass_relevance_where_active(case):
    shares, values, x, relevance = _case_run(case, "active", positive=case.op in ("Sqrt", "Reciprocal"))
    expected = relevance * (values["y"] != 0)
    if case.op in ("Max", "Min"):  # a clamp at 0: the zeros block relevance
        assert (values["y"] == 0).sum() > 0
    np.testing.assert_array_equal(shares["x"], expected)
    assert "c0" not in shares


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_input_gets_no_relevance(op):
    model = one_node_model(Case(op, (2, 3, 5), None))
    shares, _ = relevance_of(model, f"{op}_under_test", "none", RNG.standard_normal((2, 3, 5)).astype(np.float32),
                             RNG.standard_normal((2, 3, 5)).astype(np.float32))
    assert shares == {}
    assert "none" in REGISTRY[op].relevance and len(REGISTRY[op].relevance) == 1


# -- products ---------------------------------------------------------------------------------------

def _attention_model(swap: bool = False) -> onnx.ModelProto:
    """scores [N, h, T, T] → Softmax → A; O = A·V (or Vᵀ·Aᵀ with ``swap``), V [N, h, T, d] from x."""
    n, h, t, d = 2, 2, 4, 3
    case = Case("Softmax", (), None, operands=[(n, h, t, t), (n, h, t, d)], order="x")
    model = one_node_model(case)  # x → operand0 (scores), operand1 (V); Softmax(operand0) = y
    graph = model.graph
    graph.node[-1].output[0] = "attention"
    graph.node.append(helper.make_node("Transpose", ["attention"], ["attention_moved"], perm=[0, 1, 2, 3]))
    if swap:
        graph.node.extend([helper.make_node("Transpose", ["operand1"], ["values_t"], perm=[0, 1, 3, 2]),
                           helper.make_node("Transpose", ["attention_moved"], ["attention_t"], perm=[0, 1, 3, 2]),
                           helper.make_node("MatMul", ["values_t", "attention_t"], ["y"], name="product")])
    else:
        graph.node.append(helper.make_node("MatMul", ["attention_moved", "operand1"], ["y"], name="product"))
    return model


@pytest.mark.parametrize("swap", [False, True], ids=["A-V", "Vt-At"])
def test_attention_product_gives_all_relevance_to_the_values(swap):
    model = _attention_model(swap)
    x = RNG.standard_normal((2, 2 * 4 * 4 + 2 * 4 * 3)).astype(np.float32)
    output = run(model, {"x": x})["y"]
    relevance = RNG.standard_normal(output.shape).astype(np.float32)
    relevance[..., 0, :] = 0.0
    shares, values = relevance_of(model, "product", "agf", x, relevance)
    attention_name, values_name = ("attention_t", "values_t") if swap else ("attention_moved", "operand1")
    assert set(shares) == {values_name}
    scores, v = split_operands(Case("", (), None, operands=[(2, 2, 4, 4), (2, 2, 4, 3)]), torch.from_numpy(x).double())
    attention, v = torch.softmax(scores, -1).numpy(), v.numpy()
    phi = relevance.astype(np.float64)
    if swap:  # O = Vᵀ Aᵀ: the same products, transposed
        phi = phi.transpose(0, 1, 3, 2)
    out = attention @ v
    expected = np.zeros_like(v)
    for i in range(4):  # z_ij = A_ij V_jd, each output's relevance shared in proportion
        for j in range(4):
            expected[:, :, j, :] += attention[:, :, i, j, None] * v[:, :, j, :] * sdiv(phi[:, :, i, :], out[:, :, i, :])
    got = shares[values_name].transpose(0, 1, 3, 2) if swap else shares[values_name]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.sum((1, 2, 3)), phi.sum((1, 2, 3)), rtol=1e-4)  # conserved


def _product_contributions(a, c):
    """z[n, i, k, j] = a[n, i, k] c[n, k, j] for a batched matrix product."""
    return a[:, :, :, None] * c[:, None, :, :]


@pytest.mark.parametrize("op,equation", [("MatMul", None), ("Einsum", "bik,bkj->bij")])
def test_product_of_two_data_tensors_splits_relevance_half_and_half(op, equation):
    case = Case(op, (), None, operands=[(2, 3, 4), (2, 4, 5)], attrs=dict(equation=equation) if equation else {})
    shares, values, x, relevance = _case_run(case, "agf" if op == "MatMul" else "product")
    a, c = values["operand0"].astype(np.float64), values["operand1"].astype(np.float64)
    z = _product_contributions(a, c)
    ratio = sdiv(relevance, a @ c)[:, :, None, :]
    np.testing.assert_allclose(shares["operand0"], 0.5 * (z * ratio).sum(3), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shares["operand1"], 0.5 * (z * ratio).sum(1), rtol=1e-4, atol=1e-5)
    total = shares["operand0"].sum((1, 2)) + shares["operand1"].sum((1, 2))
    np.testing.assert_allclose(total, relevance.sum((1, 2)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["alpha1beta0", "rap", "zB"])
def test_every_matmul_kind_uses_the_product_rule_for_two_data_tensors(kind):
    case = Case("MatMul", (), None, operands=[(2, 3, 4), (2, 4, 5)])
    shares, _, _, relevance = _case_run(case, kind)
    assert set(shares) == {"operand0", "operand1"}
    total = shares["operand0"].sum((1, 2)) + shares["operand1"].sum((1, 2))
    np.testing.assert_allclose(total, relevance.sum((1, 2)), rtol=1e-4, atol=1e-5)


def test_einsum_with_a_constant_gives_the_data_operand_all_by_the_z_rule():
    weight = RNG.standard_normal((4, 6)).astype(np.float32)
    case = Case("Einsum", (2, 3, 4), None, constants=[weight], attrs=dict(equation="bij,jk->bik"))
    shares, values, x, relevance = _case_run(case, "product")
    z = x.astype(np.float64)[:, :, :, None] * weight[None, None]  # [n, i, j, k]
    expected = (z * sdiv(relevance, x @ weight)[:, :, None, :]).sum(3)
    np.testing.assert_allclose(shares["x"], expected, rtol=1e-4, atol=1e-5)


def test_mul_of_independent_data_tensors_splits_half_and_half():
    case = Case("Mul", (), None, operands=[(2, 3, 4), (2, 1, 4)])
    shares, values, _, relevance = _case_run(case, "gate")
    nonzero = values["y"] != 0
    np.testing.assert_allclose(shares["operand0"], 0.5 * relevance * nonzero, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shares["operand1"], 0.5 * (relevance * nonzero).sum(1, keepdims=True), rtol=1e-5,
                               atol=1e-6)


def _rms_norm_model() -> onnx.ModelProto:
    """y = x / sqrt(mean(x², -1) + ε): the divisor is computed from the numerator."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["square"]),
             helper.make_node("ReduceMean", ["square"], ["mean"], axes=[-1]),
             helper.make_node("Add", ["mean", "eps"], ["shifted"]),
             helper.make_node("Sqrt", ["shifted"], ["norm"]),
             helper.make_node("Div", ["x", "norm"], ["y"], name="normalise")]
    graph = helper.make_graph(nodes, "rms", [_info("x", (None, 3, 4))], [_info("y", (None, 3, 4))],
                              [numpy_helper.from_array(np.float32(2), "two"),
                               numpy_helper.from_array(np.float32(1e-6), "eps")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_division_by_a_normaliser_gives_the_numerator_everything():
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    relevance = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    shares, _ = relevance_of(_rms_norm_model(), "normalise", "pass", x, relevance)
    assert set(shares) == {"x"}
    np.testing.assert_array_equal(shares["x"], relevance)


def test_division_by_an_independent_data_tensor_splits_half_and_half():
    case = Case("Div", (), None, operands=[(2, 3, 4), (2, 3, 1)])
    shares, _, _, relevance = _case_run(case, "pass", positive=True)
    np.testing.assert_allclose(shares["operand0"], 0.5 * relevance, rtol=1e-5)
    np.testing.assert_allclose(shares["operand1"], 0.5 * relevance.sum(2, keepdims=True), rtol=1e-5)


# -- moves: the adjoint ------------------------------------------------------------------------------

MOVES = [
    Case("Gather", (2, 5, 4), lambda x: x[:, 0], constants=[np.array(0, np.int64)], attrs=dict(axis=1), id="cls"),
    Case("Gather", (2, 5, 3), lambda x: x[:, [3, 3, 0]], constants=[np.array([3, -2, -5], np.int64)],
         attrs=dict(axis=1), id="repeated"),
    Case("GatherElements", (2, 3, 4), lambda x: torch.gather(x, 2, torch.tensor([[[0, 3]] * 3] * 2)),
         constants=[np.array([[[0, -1]] * 3] * 2, np.int64)], attrs=dict(axis=2)),
    Case("Slice", (2, 6, 7), lambda x: x[:, 0::2, 1::3], constants=[np.array([0, 1], np.int64),
         np.array([100, 100], np.int64), np.array([1, 2], np.int64), np.array([2, 3], np.int64)]),
    Case("Expand", (2, 1, 4), lambda x: x.expand(-1, 3, 4), constants=[np.array([1, 3, 4], np.int64)]),
    Case("Pad", (2, 3, 4, 5), lambda x: F.pad(x, (1, 2, 0, 3), mode="replicate"), attrs=dict(mode="edge"),
         constants=[np.array([0, 0, 0, 1, 0, 0, 3, 2], np.int64)], id="edge"),
    Case("Pad", (2, 3, 4, 5), lambda x: F.pad(x, (1, 3, 2, 1), mode="reflect"), attrs=dict(mode="reflect"),
         constants=[np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64)], id="reflect"),
    Case("Pad", (2, 3, 4, 5), lambda x: F.pad(x, (1, 2, 0, 3), mode="circular"), attrs=dict(mode="wrap"),
         constants=[np.array([0, 0, 0, 1, 0, 0, 3, 2], np.int64)], opset=19, id="wrap"),
    Case("Tile", (2, 3, 4), lambda x: x.repeat(1, 2, 3), constants=[np.array([1, 2, 3], np.int64)]),
    Case("Where", (2, 3, 4), lambda x: torch.where(torch.from_numpy(_CONDITION), x, torch.zeros(())),
         constants=[_CONDITION := RNG.random((3, 4)) > 0.5, np.float32(1.0)], order="cxc"),
]


@pytest.mark.parametrize("case", MOVES, ids=[f"{c.op}-{c.id}" if c.id else c.op for c in MOVES])
def test_moves_move_relevance_as_they_move_data(case):
    shares, _, x, relevance = _case_run(case, "adjoint")
    x_torch = torch.from_numpy(x).double().requires_grad_(True)
    (expected,) = torch.autograd.grad(case.reference(x_torch), x_torch, torch.from_numpy(relevance).double())
    np.testing.assert_allclose(shares["x"], expected.numpy(), rtol=1e-5, atol=1e-6)
    kept = expected.numpy().sum()
    if case.op == "Where":  # the constant branch's share is dropped
        kept = (relevance * _CONDITION).sum()
    np.testing.assert_allclose(shares["x"].sum(), kept, rtol=1e-4, atol=1e-5)
    assert not [name for name in shares if name != "x"]


# -- reductions: the z-rule --------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_reductions_follow_the_z_rule(op):
    case = Case(op, (2, 3, 4, 5), None, constants=[np.array([1, -1], np.int64)], attrs=dict(keepdims=0))
    if op == "ReduceMean":
        case = Case(op, (2, 3, 4, 5), None, attrs=dict(axes=[1, -1], keepdims=0))
    shares, _, x, relevance = _case_run(case, "z")
    x64 = x.astype(np.float64)
    total = x64.sum((1, 3), keepdims=True)
    expected = x64 / np.where(total != 0, total + 1e-9, 1) * relevance[:, None, :, None]  # Φ shared ∝ x_i
    np.testing.assert_allclose(shares["x"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shares["x"].sum((1, 2, 3)), relevance.sum(1), rtol=1e-4, atol=1e-5)


NORM_REDUCTIONS = {  # op → (contribution c of each element, Σ c from the reduced value Y)
    "ReduceL2": (lambda x, y: x * x, lambda y: y * y),
    "ReduceL1": (lambda x, y: np.abs(x), lambda y: y),
    "ReduceLogSumExp": (lambda x, y: np.exp(x - y), lambda y: np.ones_like(y)),
}


@pytest.mark.parametrize("op", list(NORM_REDUCTIONS))
def test_norm_reductions_share_relevance_by_contribution(op):
    """ΦX = c ⊙ Φ / Σ c, c the element's share of the reduced value; relevance is conserved."""
    case = Case(op, (2, 3, 4, 5), None, attrs=dict(axes=[1, -1], keepdims=1))
    shares, values, x, relevance = _case_run(case, "z")
    contribution, total = NORM_REDUCTIONS[op]
    x64, y64 = x.astype(np.float64), values["y"].astype(np.float64)
    expected = contribution(x64, y64) * sdiv(relevance, total(y64))
    np.testing.assert_allclose(shares["x"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shares["x"].sum((1, 3), keepdims=True), relevance, rtol=1e-4, atol=1e-5)


# -- refused: what would mix samples or is not covered -------------------------------------------------

REFUSED = [
    (Case("Softmax", (2, 3), None, attrs=dict(axis=0)), "normalises along axis 0"),
    (Case("ReduceMean", (2, 3), None, attrs=dict(axes=[0, 1])), "reduces along axis 0"),
    (Case("Gather", (2, 3), None, constants=[np.array([0], np.int64)], attrs=dict(axis=0)), "gathers along axis 0"),
    (Case("Einsum", (), None, operands=[(2, 3, 3), (2, 3, 4)], attrs=dict(equation="bii,bij->bj")),
     "repeated inside the operand"),
    (Case("Einsum", (), None, operands=[(2, 3), (2, 3)], attrs=dict(equation="bi,bi->i")), "carries the batch"),
    (Case("Slice", (4, 3), None, constants=[np.array([0], np.int64), np.array([2], np.int64),
                                            np.array([0], np.int64)]), "slices along axis 0"),
    (Case("Tile", (2, 3), None, constants=[np.array([2, 1], np.int64)]), "tiles along axis 0"),
    (Case("Pad", (2, 3), None, constants=[np.array([1, 0, 0, 0], np.int64)]), "pads along axis 0"),
    (Case("LayerNormalization", (2, 3), None, constants=[np.ones((2, 3), np.float32)], attrs=dict(axis=0)),
     "normalises along axis 0"),
]


@pytest.mark.parametrize("case,message", REFUSED, ids=[f"{c.op}-{m.split()[0]}" for c, m in REFUSED])
def test_ops_that_mix_samples_are_refused_by_name(case, message):
    from agf_onnx.compiler.emit import gradient_model

    with pytest.raises(CompileError, match=f"{case.op} node '{case.op}_under_test'.*{message}"):
        gradient_model(one_node_model(case), output="y", source="x")


# -- attention inside a small model: conservation through the whole block ----------------------------

def test_attention_block_relevance_with_the_rules_oracle():
    """Softmax(Q Kᵀ) V with Q, K, V from one input: V gets all (z-rule), Q and K none."""
    model = _attention_model()
    x = RNG.standard_normal((2, 2 * 4 * 4 + 2 * 4 * 3)).astype(np.float32)
    relevance = RNG.standard_normal((2, 2, 4, 3)).astype(np.float32)
    shares, values = relevance_of(model, "product", "alpha1beta0", x, relevance)
    attention = values["attention_moved"].astype(np.float64)
    v = torch.from_numpy(values["operand1"]).double().requires_grad_(True)
    expected = oracle.z_rule(lambda t: torch.from_numpy(attention) @ t, v, torch.from_numpy(relevance).double())
    np.testing.assert_allclose(shares["operand1"], expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert set(shares) == {"operand1"}


# -- the token form of AGF's linear rule ---------------------------------------------------------------

def _as_conv(weight: np.ndarray) -> torch.nn.Conv2d:
    """The 1×1 conv that a per-token linear layer ``x @ W`` is."""
    conv = torch.nn.Conv2d(weight.shape[0], weight.shape[1], 1, bias=False).double()
    conv.weight.data = torch.from_numpy(weight.T.copy()).double()[:, :, None, None]
    return conv


def _channel_first(t: np.ndarray, samples: int) -> torch.Tensor:
    """``[N(·P), T…, C]`` → ``[N, C, P·T, 1]``: the sample's tokens as the pixels of a 1×1 conv's map."""
    t = torch.from_numpy(np.asarray(t, np.float64))
    return t.reshape(samples, -1, t.shape[-1]).transpose(1, 2)[..., None]


def _token_model(shape: tuple, weight: np.ndarray, merged: int = 1) -> onnx.ModelProto:
    """x → MatMul(x, W), x of ``shape``; with ``merged`` > 1 the batch is first merged with ``merged``
    groups of tokens, ``[N, P·T, C]`` → ``[N·P, T, C]`` (MobileViT)."""
    nodes, initializers, tokens = [], [numpy_helper.from_array(weight, "w")], "x"
    if merged > 1:
        initializers.append(numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), "merged_shape"))
        nodes.append(helper.make_node("Reshape", ["x", "merged_shape"], ["tokens"], name="merge"))
        tokens = "tokens"
    nodes.append(helper.make_node("MatMul", [tokens, "w"], ["y"], name="linear"))
    outer = (None, merged * shape[1], *shape[2:])
    graph = helper.make_graph(nodes, "token_linear", [_info("x", outer)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


TOKEN_CASES = [((2, 6, 5), 1, "tokens"), ((2, 3, 4, 5), 1, "NHWC"), ((2, 3, 5), 2, "merged-batch"),
               ((2, 5), 3, "merged-2d")]


@pytest.mark.parametrize("shape,merged,name", TOKEN_CASES, ids=[name for *_, name in TOKEN_CASES])
def test_token_linear_layer_gets_the_full_conv_rule(shape, merged, name):
    samples = shape[0]
    weight = RNG.standard_normal((shape[-1], 4)).astype(np.float32)
    model = _token_model(shape, weight, merged)
    x = RNG.standard_normal((samples, merged * shape[1], *shape[2:])).astype(np.float32)
    out_shape = (samples * merged, *shape[1:-1], 4)
    relevance = RNG.standard_normal(out_shape).astype(np.float32)
    relevance[..., 1::3, :] = 0.0  # whole tokens without relevance, as after a class-token Gather
    relevance[..., 0] = 0.0
    gradient = RNG.standard_normal(out_shape).astype(np.float32)
    shares, values = relevance_of(model, "linear", "agf", x, relevance, gradient)
    tokens = values["tokens" if merged > 1 else "x"]
    expected = oracle.conv_full(_as_conv(weight), _channel_first(tokens, samples), _channel_first(gradient, samples),
                                _channel_first(relevance, samples))
    expected = expected[..., 0].transpose(1, 2).reshape(tokens.shape).numpy()
    got = shares["tokens" if merged > 1 else "x"]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99999


def test_token_linear_layer_flat_is_the_absolute_influence():
    weight = RNG.standard_normal((5, 4)).astype(np.float32)
    x = RNG.standard_normal((2, 6, 5)).astype(np.float32)
    relevance = RNG.standard_normal((2, 6, 4)).astype(np.float32)
    shares, _ = relevance_of(_token_model((2, 6, 5), weight), "linear", "flat", x, relevance)
    expected = oracle.absolute_influence(lambda t, w: t @ w, torch.from_numpy(x).double(),
                                         torch.from_numpy(weight).double(), torch.from_numpy(relevance).double())
    np.testing.assert_allclose(shares["x"], expected.numpy(), rtol=1e-4, atol=1e-5)


def _moved_batch_model(node: onnx.NodeProto, constants: dict | None = None) -> onnx.ModelProto:
    """x [N, 4, 3] → Transpose → [4, N, 3] → ``node`` (reads 'moved', writes 'y')."""
    nodes = [helper.make_node("Transpose", ["x"], ["moved"], perm=[1, 0, 2]), node]
    graph = helper.make_graph(nodes, "moved", [_info("x", (None, 4, 3))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (constants or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MOVED_REFUSED = [
    (helper.make_node("Softmax", ["moved"], ["y"], name="mix", axis=1), {}, "normalises along axis 1"),
    (helper.make_node("ReduceSum", ["moved", "axes"], ["y"], name="mix"), {"axes": np.array([1], np.int64)},
     "reduces along axis 1"),
    (helper.make_node("Gather", ["moved", "index"], ["y"], name="mix", axis=1), {"index": np.array(0, np.int64)},
     "gathers along axis 1"),
    (helper.make_node("Concat", ["moved", "moved"], ["y"], name="mix", axis=1), {}, "concatenates along axis 1"),
    (helper.make_node("MatMul", ["moved", "weight"], ["y"], name="mix"), {"weight": np.ones((3, 2), np.float32)},
     None),
]


@pytest.mark.parametrize("node,constants,message", MOVED_REFUSED, ids=["Softmax", "ReduceSum", "Gather", "Concat",
                                                                         "MatMul-token-form"])
def test_ops_along_a_moved_batch_axis_are_refused_and_others_work(node, constants, message):
    from agf_onnx.compiler.emit import gradient_model

    model = _moved_batch_model(node, constants)
    if message is not None:
        with pytest.raises(CompileError, match=f"{node.op_type} node 'mix'.*{message}.*carries the batch"):
            gradient_model(model, output="y", source="x")
        return
    # a linear layer on [T, N, C] (nn.MultiheadAttention's layout): the token form of AGF moves the
    # batch to the front and back, and RAP's shift sums over every axis but the batch's, so each
    # equals the rule on [N, T, C] transposed
    x = RNG.standard_normal((2, 4, 3)).astype(np.float32)
    relevance = RNG.standard_normal((4, 2, 2)).astype(np.float32)
    gradient = RNG.standard_normal((4, 2, 2)).astype(np.float32)
    batch_first = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"], name="mix")], "first",
                                    [_info("x", (None, 4, 3))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                    [numpy_helper.from_array(np.asarray(constants["weight"]), "weight")])
    batch_first = helper.make_model(batch_first, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for kind in ("agf", "flat", "rap"):
        moved, _ = relevance_of(model, "mix", kind, x, relevance, gradient)
        expected, _ = relevance_of(batch_first, "mix", kind, x, relevance.transpose(1, 0, 2), gradient.transpose(1, 0, 2))
        assert moved["moved"].shape == (4, 2, 3)
        np.testing.assert_allclose(moved["moved"].transpose(1, 0, 2), expected["x"], rtol=1e-5, atol=1e-6)


def test_ops_along_other_axes_work_where_the_batch_is_moved():
    """Gather on axis 0 of [4, N, 3] (the token axis, as timm's qkv[0]) is fine."""
    model = _moved_batch_model(helper.make_node("Gather", ["moved", "index"], ["y"], name="pick", axis=0),
                               {"index": np.array(2, np.int64)})
    x = RNG.standard_normal((2, 4, 3)).astype(np.float32)
    relevance = RNG.standard_normal((2, 3)).astype(np.float32)
    shares, _ = relevance_of(model, "pick", "adjoint", x, relevance)
    expected = np.zeros((4, 2, 3), np.float32)
    expected[2] = relevance
    np.testing.assert_array_equal(shares["moved"], expected)


def _merged_model(token_major: bool, weight: np.ndarray) -> onnx.ModelProto:
    """x [N, 4, 3] → [4·N, 3] (``token_major``: through [4, N, 3], as nn.MultiheadAttention merges its
    tokens before ``out_proj``) or [N·4, 3] → MatMul 'mix' → y."""
    nodes = [helper.make_node("Transpose", ["x"], ["moved"], perm=[1, 0, 2])] if token_major else []
    nodes += [helper.make_node("Reshape", ["moved" if token_major else "x", "rows"], ["merged"]),
              helper.make_node("MatMul", ["merged", "weight"], ["y"], name="mix")]
    graph = helper.make_graph(nodes, "merged", [_info("x", (None, 4, 3))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1, 3], np.int64), "rows"),
                               numpy_helper.from_array(weight, "weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_order_of_a_merged_batch_is_followed():
    """[T·N, C] and [N·T, C] have the same sizes; only the reshape chain tells which one holds each
    sample's tokens together."""
    for token_major, outer in ((True, 4), (False, 1)):
        graph = GraphView(passes.canonicalise(modelfile.load(_merged_model(token_major, np.ones((3, 2), np.float32)))))
        assert graph.batch("merged") == (0, 4)
        assert graph.merged_outer("merged") == outer
        assert graph.merged_outer("y") == outer  # a MatMul keeps the order
        assert graph.merged_outer("x") == 1


@pytest.mark.parametrize("kind", ["agf", "flat", "rap"])
def test_a_batch_merged_after_the_tokens_keeps_samples_apart(kind):
    """A linear layer on [T·N, C] (nn.MultiheadAttention's out_proj): AGF's token form splits the
    axis into [T, N] before moving the batch to the front; the maps equal the rule on [N·T, C] with
    the rows reordered, so no sample's relevance reaches another."""
    weight = RNG.standard_normal((3, 2)).astype(np.float32)
    x = RNG.standard_normal((2, 4, 3)).astype(np.float32)
    relevance = RNG.standard_normal((2, 4, 2)).astype(np.float32)  # [N, T, 2]
    gradient = RNG.standard_normal((2, 4, 2)).astype(np.float32)
    token_rows = lambda a: a.transpose(1, 0, 2).reshape(8, -1)  # noqa: E731 - [N, T, c] → [T·N, c]
    merged, _ = relevance_of(_merged_model(True, weight), "mix", kind, x, token_rows(relevance), token_rows(gradient))
    expected, _ = relevance_of(_merged_model(False, weight), "mix", kind, x, relevance.reshape(8, 2),
                               gradient.reshape(8, 2))
    np.testing.assert_allclose(merged["merged"].reshape(4, 2, 3).transpose(1, 0, 2),
                               expected["merged"].reshape(2, 4, 3), rtol=1e-5, atol=1e-6)


def _layer_norm_written_out(variance_from_input: bool) -> onnx.ModelProto:
    """(x − mean x) / sqrt(var + ε), var = mean((x − mean x)²) or mean(x²) − (mean x)² (as decompositions write it)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
             helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre")]
    if variance_from_input:
        nodes += [helper.make_node("Mul", ["x", "x"], ["square"]),
                  helper.make_node("ReduceMean", ["square"], ["mean_square"], axes=[-1]),
                  helper.make_node("Mul", ["mean", "mean"], ["square_mean"]),
                  helper.make_node("Sub", ["mean_square", "square_mean"], ["variance"])]
    else:
        nodes += [helper.make_node("Mul", ["centred", "centred"], ["square"]),
                  helper.make_node("ReduceMean", ["square"], ["variance"], axes=[-1])]
    nodes += [helper.make_node("Add", ["variance", "eps"], ["shifted"]),
              helper.make_node("Sqrt", ["shifted"], ["deviation"]),
              helper.make_node("Div", ["centred", "deviation"], ["y"], name="normalise")]
    graph = helper.make_graph(nodes, "layer_norm", [_info("x", (None, 3, 4))], [_info("y", (None, 3, 4))],
                              [numpy_helper.from_array(np.float32(1e-5), "eps")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("variance_from_input", [False, True], ids=["centred-variance", "input-variance"])
def test_layer_norm_written_out_passes_relevance_to_its_input(variance_from_input):
    """Centring and scaling are statistics of the forward pass (spec "Normalisations"): Φ reaches x whole."""
    model = _layer_norm_written_out(variance_from_input)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    relevance = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    shares, _ = relevance_of(model, "normalise", "pass", x, relevance)
    assert set(shares) == {"centred"}
    np.testing.assert_array_equal(shares["centred"], relevance)
    shares, _ = relevance_of(model, "centre", "merge", x, relevance)
    assert set(shares) == {"x"}
    np.testing.assert_array_equal(shares["x"], relevance)
