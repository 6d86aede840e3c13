"""``contrib.decompose`` against ONNX Runtime itself: each ``com.microsoft`` node's outputs, computed
by ONNX Runtime's contrib kernel, equal those of its standard-op decomposition.

The contrib nodes come from ONNX Runtime's own optimisers, run here on the project's test nets
(``SessionOptions.optimized_model_filepath`` at ORT_ENABLE_EXTENDED, and
``onnxruntime.transformers.optimizer.optimize_model`` with ``use_gpu=False``), so the attribute and
input forms are the ones it writes. Every contrib node's outputs (optional ones included: the
residual sum of SkipLayerNormalization, EmbedLayerNormalization's mask index) are made graph outputs
of both files and compared, both run by ONNX Runtime on the CPU with its optimisations off.

Where ONNX Runtime's CPU optimisers do not write an op or a form (FusedConv's Z input, BiasAdd,
FusedMatMul's transA/transB, FusedGemm with HardSigmoid, Attention with a raw 2-D mask, a custom
scale or unequal Q/K/V sizes, the mean/1/σ outputs of SkipLayerNormalization), the node is built
from ONNX Runtime's schema (``schema_built`` below, labelled so) and ONNX Runtime's kernel is the
reference all the same.

Tolerance: |Δ| ≤ 2e-6 · max(1, max|reference|), i.e. float32 round-off of a few operations (the
fused kernels sum in another order: FusedMatMul scales inside the GEMM, the layer norms
accumulate differently); measured worst 7.1e-7 over the nets here.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from agf_onnx.compiler import contrib
from agf_onnx.errors import CompileError, UnsupportedOpsError

from . import architectures, models, token_models

TOLERANCE = 2e-6


# -- files written by ONNX Runtime -------------------------------------------------------------------
def ort_optimised(model: onnx.ModelProto, level: str = "EXTENDED") -> onnx.ModelProto:
    """The file ONNX Runtime writes for ``model`` at ``ORT_ENABLE_<level>`` on the CPU."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "model.onnx"), os.path.join(folder, "optimised.onnx")
        onnx.save(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
        options.optimized_model_filepath = target
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(target)


def transformer_optimised(model: onnx.ModelProto, model_type: str, heads: int, hidden: int,
                          opt_level: int = 2) -> onnx.ModelProto:
    """The file ``onnxruntime.transformers.optimizer.optimize_model`` writes (CPU fusions)."""
    from onnxruntime.transformers.optimizer import optimize_model
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "model.onnx")
        onnx.save(model, source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimize_model(source, model_type=model_type, num_heads=heads, hidden_size=hidden,
                                  opt_level=opt_level, use_gpu=False).model


def run_plain(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of ``model``, ONNX Runtime on the CPU with every graph optimisation off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _with_outputs(model: onnx.ModelProto, outputs: list[tuple[str, int]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_tensor_value_info(name, elem_type, None)
                             for name, elem_type in outputs if name not in present)
    return copy


def contrib_outputs(model: onnx.ModelProto) -> list[tuple[str, int, str]]:
    """(tensor, element type, op type) of every output of every contrib node."""
    found = []
    for node in model.graph.node:
        if contrib._is_contrib(node):
            for index, name in enumerate(node.output):
                integer = node.op_type == "EmbedLayerNormalization" and index == 1
                if name:
                    found.append((name, TensorProto.INT32 if integer else TensorProto.FLOAT, node.op_type))
    return found


def assert_decomposition_matches(optimised: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> collections.Counter:
    """Every contrib node's outputs equal the decomposition's (``TOLERANCE``); returns the op types
    compared (with their count of outputs)."""
    outputs = contrib_outputs(optimised)
    decomposed = contrib.decompose(optimised)
    assert not any(contrib._is_contrib(n) for n in decomposed.graph.node)
    assert not any(n.domain for n in decomposed.graph.node), "only ai.onnx ops are left"
    onnx.checker.check_model(decomposed)
    typed = [(name, elem_type) for name, elem_type, _ in outputs]
    reference = run_plain(_with_outputs(optimised, typed), feeds)
    got = run_plain(_with_outputs(decomposed, typed), feeds)
    for name, _, op_type in outputs:
        want = reference[name]
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, (op_type, name)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got[name], want, rtol=0, atol=TOLERANCE * scale, err_msg=f"{op_type} '{name}'")
    for name in {o.name for o in optimised.graph.output}:  # the model's own outputs too
        np.testing.assert_allclose(got[name], reference[name], rtol=0,
                                   atol=TOLERANCE * max(1.0, float(np.abs(reference[name]).max())))
    return collections.Counter(op_type for _, _, op_type in outputs)


# -- nets -----------------------------------------------------------------------------------------------
class Fusable(nn.Module):
    """A CNN with every activation ONNX Runtime fuses on the CPU: conv → ReLU, ReLU6, HardSwish,
    sigmoid, tanh, leaky ReLU, GELU, SiLU, x·σ(1.702x); pool; Linear → ReLU, Linear → leaky ReLU."""

    ACTIVATIONS = (F.relu, F.relu6, F.hardswish, torch.sigmoid, torch.tanh, lambda x: F.leaky_relu(x, 0.1),
                   F.gelu, F.silu, lambda x: x * torch.sigmoid(1.702 * x))

    def __init__(self, width: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1)
                                   for i in range(len(self.ACTIVATIONS)))
        self.fc1, self.fc2, self.head = nn.Linear(width, 16), nn.Linear(16, 16), nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, activation in zip(self.convs, self.ACTIVATIONS):
            x = activation(conv(x))
        x = x.mean((2, 3))
        return self.head(F.leaky_relu(self.fc2(torch.relu(self.fc1(x))), 0.1))


class RMSNormNet(nn.Module):
    """Patch tokens, two pre-norm residual MLP blocks with nn.RMSNorm (tanh GELU, then CLIP's
    quick GELU), a final RMSNorm, mean pooling, head."""

    def __init__(self, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.norm1, self.norm2, self.norm = nn.RMSNorm(dim), nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.fc3, self.fc4 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.norm1(t)), approximate="tanh"))
        h = self.fc3(self.norm2(t))
        t = t + self.fc4(h * torch.sigmoid(1.702 * h))
        return self.head(self.norm(t).mean(1))


def tanh_vit(seed: int = 0) -> nn.Module:
    vit = token_models.vit(seed)
    for block in vit.blocks:
        block.mlp.act = nn.GELU(approximate="tanh")
    return vit


def bert_export() -> onnx.ModelProto:
    """A tiny Hugging Face BERT classifier (random weights, eager attention), TorchScript, opset 17."""
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).logits

    buffer = io.BytesIO()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), (ids, mask), buffer, dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["y"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"}, "y": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def images(batch: int = 2, size: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}


def token_feeds() -> dict[str, np.ndarray]:
    """Two sequences of 8 token ids, the second right-padded after 5 tokens (mask 0)."""
    ids = np.random.default_rng(0).integers(0, 100, (2, 8)).astype(np.int64)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _cnn(net: nn.Module, dynamo: bool = False) -> onnx.ModelProto:
    return models.export(models.seeded(net), dynamo=dynamo)


#: id → (the file ONNX Runtime writes, feeds, the contrib op types it must contain)
REAL = {
    "fusable-extended": (lambda: ort_optimised(_cnn(Fusable())), images,
                         {"FusedConv", "FusedGemm", "Gelu", "QuickGelu"}),
    "fusable-dynamo-extended": (lambda: ort_optimised(_cnn(Fusable(), dynamo=True)), images,
                                {"FusedConv", "FusedGemm", "QuickGelu"}),
    "mobilenetv3-extended": (lambda: ort_optimised(_cnn(architectures.MobileNetV3ish())), images, {"FusedConv"}),
    "vit-extended": (lambda: ort_optimised(token_models.export(token_models.vit(0))), images,
                     {"FusedMatMul", "BiasGelu"}),
    "vit-dynamo-extended": (lambda: ort_optimised(token_models.export(token_models.vit(0), dynamo=True)), images,
                            {"FusedMatMul", "BiasGelu", "SkipLayerNormalization"}),
    "vit-transformer-optimiser": (lambda: transformer_optimised(token_models.export(token_models.vit(0)), "vit", 2, 16),
                                  images, {"BiasGelu", "SkipLayerNormalization"}),
    "vit-tanh-transformer-optimiser": (lambda: transformer_optimised(token_models.export(tanh_vit()), "vit", 2, 16),
                                       images, {"FastGelu", "SkipLayerNormalization"}),
    "rmsnorm-transformer-optimiser": (lambda: transformer_optimised(models.export(RMSNormNet().eval(), dynamo=True),
                                                                    "vit", 2, 16),
                                      images, {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                                               "FastGelu", "QuickGelu"}),
    "bert-transformer-optimiser": (lambda: transformer_optimised(bert_export(), "bert", 2, 32), token_feeds,
                                   {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"}),
}


@pytest.mark.parametrize("case", REAL)
def test_decomposition_equals_onnxruntime_on_its_own_files(case):
    build, feeds, expected = REAL[case]
    optimised = build()
    found = {n.op_type for n in optimised.graph.node if contrib._is_contrib(n)}
    assert expected <= found, f"ONNX Runtime no longer writes {expected - found} here"
    compared = assert_decomposition_matches(optimised, feeds())
    assert expected <= set(compared)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["vgg", "resnet", "mobilenetv2", "mobilenetv3"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_decomposition_equals_onnxruntime_on_cnns(net, dynamo):
    builders = {"vgg": models.VGGish, "resnet": models.ResNetish, "mobilenetv2": architectures.MobileNetV2ish,
                "mobilenetv3": architectures.MobileNetV3ish}
    compared = assert_decomposition_matches(ort_optimised(_cnn(builders[net](), dynamo)), images())
    assert "FusedConv" in compared


# -- nodes built from ONNX Runtime's schema (forms its CPU optimisers do not write) --------------------
def one_node_model(node: onnx.NodeProto, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                   outputs: list[str], opset: int = 17,
                   shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """SCHEMA-BUILT: a model of the single contrib ``node`` (per ONNX Runtime's schema), its
    output shapes ``shapes``, else as ONNX Runtime computes them on ``inputs``."""

    def build(shapes: dict[str, list[int] | None]) -> onnx.ModelProto:
        graph = helper.make_graph(
            [node], "schema_built",
            [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
             for k, v in inputs.items()],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in outputs],
            [numpy_helper.from_array(v, k) for k, v in weights.items()])
        return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset),
                                                       helper.make_opsetid("com.microsoft", 1)])

    if shapes is None:
        computed = run_plain(build(dict.fromkeys(outputs)), inputs)
        shapes = {name: list(computed[name].shape) for name in outputs}
    return build(shapes)


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _attention_case(mask: np.ndarray | None, attention_bias: bool = False, **attributes) -> tuple[onnx.ModelProto, dict]:
    hidden_sizes = attributes.get("qkv_hidden_sizes", [16, 16, 16])
    inputs = {"x": _rand(2, 5, 16)}
    names = ["x", "w", "b", "mask" if mask is not None else ""]
    if mask is not None:
        inputs["mask"] = mask
    if attention_bias:
        inputs["attention_bias"] = _rand(2, 1, 5, 5, seed=4)
        names += ["", "attention_bias"]
    node = helper.make_node("Attention", names, ["y"], domain="com.microsoft", name="attention", num_heads=2,
                            **attributes)
    weights = {"w": _rand(16, sum(hidden_sizes), seed=1) * 0.3, "b": _rand(sum(hidden_sizes), seed=2) * 0.1}
    return one_node_model(node, inputs, weights, ["y"]), inputs


def _mha_case(mask: np.ndarray | None = None, attention_bias: bool = False, bias: bool = True,
              **attributes) -> tuple[onnx.ModelProto, dict]:
    """MultiHeadAttention with separate query [2, 5, 16], key and value [2, 5, 16] / [2, 5, 12]."""
    inputs = {"q": _rand(2, 5, 16), "k": _rand(2, 5, 16, seed=1), "v": _rand(2, 5, 12, seed=2)}
    names = ["q", "k", "v", "bias" if bias else ""]
    weights = {"bias": _rand(44, seed=3) * 0.1} if bias else {}
    if mask is not None:
        inputs["mask"] = mask
    names.append("mask" if mask is not None else "")
    if attention_bias:
        inputs["attention_bias"] = _rand(1, 2, 5, 5, seed=4)
        names.append("attention_bias")
    node = helper.make_node("MultiHeadAttention", names, ["y"], domain="com.microsoft", name="mha", num_heads=2,
                            **attributes)
    return one_node_model(node, inputs, weights, ["y"]), inputs


def _padding_mask(rank: int) -> np.ndarray:
    if rank == 1:
        return np.array([5, 3], np.int32)
    mask = np.ones((2, 5), np.int32)
    mask[1, 3:] = 0
    mask[0, 1] = 0  # not a right padding: the raw mask form masks any key
    return mask if rank == 2 else np.repeat(mask[:, None, :], 5, axis=1)


SCHEMA_BUILT = {
    "FusedConv-Z-LeakyRelu": lambda: (one_node_model(
        helper.make_node("FusedConv", ["x", "w", "b", "z"], ["y"], domain="com.microsoft", name="conv",
                         activation="LeakyRelu", activation_params=[0.2], pads=[1, 1, 1, 1], strides=[2, 2]),
        {"x": _rand(2, 3, 8, 8), "z": _rand(2, 4, 4, 4, seed=3)}, {"w": _rand(4, 3, 3, 3, seed=1),
                                                                   "b": _rand(4, seed=2)}, ["y"]),
        {"x": _rand(2, 3, 8, 8), "z": _rand(2, 4, 4, 4, seed=3)}),
    "FusedConv-HardSigmoid-no-bias": lambda: (one_node_model(
        helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", name="conv",
                         activation="HardSigmoid", activation_params=[0.3, 0.4], group=3),
        {"x": _rand(2, 3, 6, 6)}, {"w": _rand(3, 1, 3, 3, seed=1)}, ["y"]), {"x": _rand(2, 3, 6, 6)}),
    "FusedGemm-HardSigmoid-transA": lambda: (one_node_model(
        helper.make_node("FusedGemm", ["a", "w", "c"], ["y"], domain="com.microsoft", name="gemm", transA=1,
                         alpha=0.5, beta=2.0, activation="HardSigmoid", activation_alpha=0.25, activation_beta=0.4),
        {"a": _rand(6, 2)}, {"w": _rand(6, 4, seed=1), "c": _rand(4, seed=2)}, ["y"]), {"a": _rand(6, 2)}),
    "FusedMatMul-transA-transB": lambda: (one_node_model(
        helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft", name="matmul", transA=1,
                         transB=1, alpha=0.125),
        {"a": _rand(2, 3, 4, 5), "b": _rand(2, 3, 6, 4, seed=1)}, {}, ["y"]),
        {"a": _rand(2, 3, 4, 5), "b": _rand(2, 3, 6, 4, seed=1)}),
    "FusedMatMul-transB-weight": lambda: (one_node_model(
        helper.make_node("FusedMatMul", ["a", "w"], ["y"], domain="com.microsoft", name="matmul", transB=1),
        {"a": _rand(2, 5, 4)}, {"w": _rand(6, 4, seed=1)}, ["y"]), {"a": _rand(2, 5, 4)}),
    "SkipLayerNormalization-all-outputs": lambda: (one_node_model(
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                         ["y", "mean", "inv_std", "sum"], domain="com.microsoft", name="skip_ln", epsilon=1e-5),
        {"x": _rand(2, 5, 8), "skip": _rand(2, 5, 8, seed=1)},
        {"gamma": _rand(8, seed=2), "beta": _rand(8, seed=3), "bias": _rand(8, seed=4)},
        ["y", "mean", "inv_std", "sum"]), {"x": _rand(2, 5, 8), "skip": _rand(2, 5, 8, seed=1)}),
    "Attention-no-mask": lambda: _attention_case(None),
    "Attention-lengths": lambda: _attention_case(_padding_mask(1)),
    "Attention-raw-mask-2d": lambda: _attention_case(_padding_mask(2), scale=0.3, mask_filter_value=-1000.0),
    "Attention-raw-mask-3d": lambda: _attention_case(_padding_mask(3)),
    "Attention-qkv-sizes": lambda: _attention_case(None, qkv_hidden_sizes=[8, 8, 12]),
    "Attention-attention-bias": lambda: _attention_case(_padding_mask(2), attention_bias=True),
    "MultiHeadAttention-bias": lambda: _mha_case(),
    "MultiHeadAttention-no-bias-scale": lambda: _mha_case(bias=False, scale=0.2),
    "MultiHeadAttention-lengths": lambda: _mha_case(_padding_mask(1)),
    "MultiHeadAttention-raw-mask-2d": lambda: _mha_case(_padding_mask(2), mask_filter_value=-500.0),
    "MultiHeadAttention-attention-bias": lambda: _mha_case(attention_bias=True),
}


@pytest.mark.parametrize("case", SCHEMA_BUILT)
def test_decomposition_equals_onnxruntime_on_schema_built_nodes(case):
    """SCHEMA-BUILT nodes: forms ONNX Runtime's CPU optimisers do not write for the test nets."""
    model, feeds = SCHEMA_BUILT[case]()
    assert_decomposition_matches(model, feeds)


def test_bias_add_is_the_schemas_sum():
    """SCHEMA-BUILT, and ONNX Runtime has no CPU kernel for BiasAdd (CUDA only; its optimiser
    writes it for diffusion UNets on GPU): the decomposition run by ONNX Runtime against the
    schema's formula, Y = X + bias + skip, in NumPy (the same additions in the same order)."""
    x, skip, bias = _rand(2, 9, 8), _rand(2, 9, 8, seed=1), _rand(8, seed=2)
    node = helper.make_node("BiasAdd", ["x", "bias", "skip"], ["y"], domain="com.microsoft", name="bias_add")
    graph = helper.make_graph([node], "schema_built", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9, 8]),
                                                       helper.make_tensor_value_info("skip", TensorProto.FLOAT, [2, 9, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 9, 8])],
                              [numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    got = run_plain(contrib.decompose(model), {"x": x, "skip": skip})["y"]
    np.testing.assert_array_equal(got, (x + bias) + skip)


def test_every_decomposer_is_checked_against_onnxruntime():
    """The registry and the cases above agree: no decomposer without an equivalence check."""
    checked = set().union(*(expected for _, _, expected in REAL.values()))
    checked |= {case.split("-")[0] for case in SCHEMA_BUILT} | {"BiasAdd"}
    assert set(contrib.DECOMPOSERS) | {"SimplifiedLayerNormalization"} == checked


# -- refusals -------------------------------------------------------------------------------------------------
def test_contrib_op_without_decomposition_is_refused_by_name():
    nodes = [helper.make_node("Rfft", ["x"], ["f"], domain="com.microsoft", name="spectrum", signal_ndim=1),
             helper.make_node("QuickGelu", ["x"], ["g"], domain="com.microsoft", name="gate"),
             helper.make_node("Rfft", ["x"], ["h"], domain="com.microsoft", name="spectrum_2", signal_ndim=1)]
    graph = helper.make_graph(nodes, "unsupported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "fgh"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpsError) as error:
        contrib.decompose(model)
    assert error.value.unsupported == {"com.microsoft.Rfft": ["spectrum", "spectrum_2"]}
    assert error.value.exit_code == 2


def test_packed_qkv_multi_head_attention_is_refused_naming_the_node():
    """SCHEMA-BUILT: MultiHeadAttention's packed-QKV form (query [B, S, heads, 3, d]; ONNX Runtime
    has no CPU kernel for it)."""
    node = helper.make_node("MultiHeadAttention", ["qkv"], ["y"], domain="com.microsoft", name="packed_mha",
                            num_heads=2)
    model = one_node_model(node, {"qkv": _rand(1, 4, 2, 3, 4)}, {}, ["y"], shapes={"y": [1, 4, 8]})
    with pytest.raises(CompileError, match="packed_mha.*ranks \\[5, 0, 0\\]"):
        contrib.decompose(model)


def test_level_all_nchwc_file_is_refused_with_the_advice_to_save_at_extended():
    optimised = ort_optimised(_cnn(models.VGGish()), "ALL")
    assert any(n.domain == "com.microsoft.nchwc" for n in optimised.graph.node)
    with pytest.raises(contrib.LayoutSpecificOpsError, match="ORT_ENABLE_EXTENDED") as error:
        contrib.decompose(optimised)
    assert "com.microsoft.nchwc.Conv" in error.value.unsupported
    assert error.value.exit_code == 2


def test_unwritten_attribute_form_is_refused_naming_the_node():
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", name="gpt_attention",
                            num_heads=2, unidirectional=1)
    model = one_node_model(node, {"x": _rand(1, 4, 16)}, {"w": _rand(16, 48), "b": _rand(48)}, ["y"])
    with pytest.raises(CompileError, match="gpt_attention.*unidirectional"):
        contrib.decompose(model)


def test_model_without_contrib_ops_is_unchanged():
    model = _cnn(models.VGGish())
    assert contrib.decompose(model).SerializeToString() == model.SerializeToString()
