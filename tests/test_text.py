"""Text classifiers (issue 24): BERT, DistilBERT, RoBERTa and ALBERT-style classifiers built from
``transformers`` Config classes (``text_models.py``, tiny, seeded), exported with TorchScript and
dynamo, compiled with every applicable method.

- Every method: the original logits bit-identical (ONNX Runtime optimisations off), ``heatmap``
  finite ``[N, T]``, exactly 0 at padding tokens, different for two classes; top-K equal to the
  single-class runs.
- gradient and gradient × input at E against torch.autograd in float64; Integrated Gradients
  (zero baseline) against Captum's ``IntegratedGradients`` (Gauss–Legendre, as compiled);
  chefer against its definition on the eager attention probabilities (``output_attentions``).
- AGF and LRP: the TorchScript and dynamo exports give the same maps (two graphs of one function).
- Refusals: FullGrad by name, Grad-CAM without ``--layer``, a dynamic sequence length, token
  inputs with no embedding table.
"""

from __future__ import annotations

import copy
import functools
import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import agf_onnx
from agf_onnx.errors import CompileError

from . import text_models as txt
from .runtime import run

MIN_PEARSON, MAX_MEAN_ABS = 0.9999, 1e-3
EXPORTS = {"torchscript": False, "dynamo": True}
#: CI keeps each architecture and each exporter once; the rest is ``-m slow``.
CI_PAIRS = {("bert", "torchscript"), ("distilbert", "dynamo"), ("roberta", "torchscript"), ("albert", "dynamo")}
PAIRS = [pytest.param(a, e, marks=() if (a, e) in CI_PAIRS else pytest.mark.slow) for a in txt.ARCHS for e in EXPORTS]
METHODS = [("agf", {}), ("agf", {"flat_policy": "none"}), ("gradient", {}), ("gradient-x-input", {}),
           ("integrated-gradients", {"options": {"steps": 4}}), ("smoothgrad", {"options": {"samples": 3}}),
           ("lrp", {}), ("lrp-ab", {}), ("clrp", {}), ("sglrp", {}), ("rap", {}), ("chefer", {}), ("gradcam", {})]


@functools.lru_cache(maxsize=None)
def net(arch: str) -> nn.Module:
    return txt.build(arch)


@functools.lru_cache(maxsize=None)
def exported(arch: str, exporter: str) -> onnx.ModelProto:
    return txt.export(net(arch), arch, EXPORTS[exporter])


def _last_block_output(model: onnx.ModelProto) -> str:
    """A node whose output is a [N, T, C] token tensor: the last LayerNormalization of the encoder."""
    norms = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]
    return norms[-1]


@functools.lru_cache(maxsize=None)
def compiled(arch: str, exporter: str, method: str = "agf", **options) -> onnx.ModelProto:
    model = exported(arch, exporter)
    options = {k: (dict(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    if method == "gradcam":
        canonical = agf_onnx.compiler.passes.canonicalise(agf_onnx.modelfile.load(model), {"input_ids": [1, txt.LENGTH]})  # a copy
        options["layer"] = _last_block_output(canonical)
    return agf_onnx.compile(model, method=method, input_shapes={"input_ids": [1, txt.LENGTH]}, **options)


def _hashable(options: dict) -> dict:
    return {k: (tuple(v.items()) if isinstance(v, dict) else v) for k, v in options.items()}


def feeds(arch: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in txt.batch(arch).items()}


def explain(model: onnx.ModelProto, arch: str, target) -> dict[str, np.ndarray]:
    return run(model, {**feeds(arch), "target": np.asarray(target, np.int64)}, optimize=False)


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def token_heatmap(values: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The spec's "Output" at E: ``Σ_c A / max A`` (``/ max |A|`` where ``max A ≤ 0``), padding 0."""
    values = values * mask[..., None].to(values.dtype)
    flat = values.flatten(1)
    peak = flat.amax(1)
    scale = torch.where(peak > 0, peak, flat.abs().amax(1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values.sum(2) / scale[:, None]).numpy()


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    for a, e in zip(actual, expected):
        assert pearson(a, e) >= MIN_PEARSON, pearson(a, e)
        assert np.abs(a - e).mean() <= MAX_MEAN_ABS, np.abs(a - e).mean()


# -- every method on every architecture and exporter -------------------------------------------------
@pytest.mark.parametrize("arch,exporter", PAIRS)
@pytest.mark.parametrize("method,options", METHODS, ids=[m + ("-none" if o.get("flat_policy") else "")
                                                          for m, o in METHODS])
def test_every_method_gives_a_token_map(arch, exporter, method, options):
    model = compiled(arch, exporter, method, **_hashable(options))
    original = run(exported(arch, exporter), feeds(arch), optimize=False)["logits"]
    mask = feeds(arch)["attention_mask"]
    outputs = explain(model, arch, [0, 0])
    other = explain(model, arch, [2, 2])["heatmap"]
    assert np.array_equal(outputs["logits"], original)  # the forward is untouched
    heatmap = outputs["heatmap"]
    assert heatmap.shape == mask.shape and heatmap.dtype == np.float32 and np.isfinite(heatmap).all()
    assert np.all(heatmap[mask == 0] == 0)  # padding: exactly 0
    assert np.abs(heatmap[mask == 1]).max() > 0
    assert not np.allclose(heatmap, other)  # two classes, two maps


def test_top_k_equals_the_single_class_runs():
    model = compiled("bert", "torchscript", "agf", top_k=2)
    outputs = explain(model, "bert", [-1, -1])
    assert outputs["heatmaps"].shape == (2, 2, txt.LENGTH)
    for k in range(2):
        single = explain(compiled("bert", "torchscript"), "bert", outputs["classes"][:, k])["heatmap"]
        np.testing.assert_allclose(outputs["heatmaps"][:, k], single, atol=1e-6)
    assert np.all(outputs["heatmaps"][1, :, -4:] == 0)


def test_modifiers_keep_padding_at_zero():
    from agf_onnx.compiler.modifiers import Modifiers

    model = agf_onnx.compile(exported("bert", "torchscript"), input_shapes={"input_ids": [1, txt.LENGTH]},
                             modifiers=Modifiers(smooth=3, contrast="others"))
    heatmap = explain(model, "bert", [0, -1])["heatmap"]
    assert np.isfinite(heatmap).all() and np.all(heatmap[1, -4:] == 0)


# -- oracles -----------------------------------------------------------------------------------------
def _target(logits: torch.Tensor, target) -> torch.Tensor:
    target = torch.as_tensor(target)
    return torch.where(target < 0, logits.argmax(1), target)


@pytest.mark.parametrize("arch,exporter", [("bert", "torchscript"), ("distilbert", "dynamo"),
                                           pytest.param("roberta", "dynamo", marks=pytest.mark.slow),
                                           pytest.param("albert", "torchscript", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["gradient", "gradient-x-input"])
def test_gradient_methods_against_autograd(arch, exporter, method):
    batch = txt.batch(arch)
    embedding, logits_of = txt.at_embeddings(net(arch), batch)
    leaf = embedding.clone().requires_grad_(True)
    logits = logits_of(leaf)
    target = _target(logits.detach(), [1, -1])
    logits.gather(1, target[:, None]).sum().backward()
    values = leaf.grad.abs() if method == "gradient" else leaf.detach() * leaf.grad
    expected = token_heatmap(values, batch["attention_mask"])
    close(explain(compiled(arch, exporter, method), arch, [1, -1])["heatmap"], expected)


@pytest.mark.parametrize("arch,exporter", [("bert", "dynamo"), pytest.param("albert", "torchscript",
                                                                            marks=pytest.mark.slow)])
def test_integrated_gradients_against_captum(arch, exporter):
    """Zero baseline at E, 8 Gauss–Legendre steps (Captum's ``gausslegendre``), one sample at a time."""
    from captum.attr import IntegratedGradients

    batch = txt.batch(arch)
    rows = []
    for i in range(len(batch["input_ids"])):
        embedding, logits_of = txt.at_embeddings(net(arch), {k: v[i:i + 1] for k, v in batch.items()})
        target = int(_target(logits_of(embedding).detach(), [2, -1][i])[0])
        rows.append(IntegratedGradients(logits_of).attribute(embedding, baselines=torch.zeros_like(embedding),
                                                             target=target, n_steps=8, method="gausslegendre"))
    expected = token_heatmap(torch.cat(rows).detach(), batch["attention_mask"])
    model = compiled(arch, exporter, "integrated-gradients", options=(("steps", 8),))
    close(explain(model, arch, [2, -1])["heatmap"], expected)


@pytest.mark.parametrize("arch,exporter", [("bert", "torchscript"), pytest.param("distilbert", "dynamo",
                                                                                 marks=pytest.mark.slow)])
def test_chefer_against_its_definition(arch, exporter):
    """Ā = mean_h relu(∇A ⊙ A), R = I, R = R + Ā R; the [CLS] row of R − I (docs/text.md)."""
    batch = txt.batch(arch)
    model = txt.build(arch).double()
    output = model(**batch, output_attentions=True)
    attentions = output.attentions
    for attention in attentions:
        attention.retain_grad()
    target = _target(output.logits.detach(), [0, -1])
    output.logits.gather(1, target[:, None]).sum().backward()
    tokens = batch["input_ids"].shape[1]
    rollout = torch.eye(tokens, dtype=torch.float64).expand(len(target), tokens, tokens)
    for attention in attentions:
        weights = (attention.grad * attention).clamp(min=0).mean(1)
        rollout = rollout + weights @ rollout
    row = (rollout - torch.eye(tokens, dtype=torch.float64))[:, 0].detach()
    expected = token_heatmap(row[..., None], batch["attention_mask"])
    close(explain(compiled(arch, exporter, "chefer"), arch, [0, -1])["heatmap"], expected)


@pytest.mark.parametrize("method", ["agf", "lrp"])
def test_the_two_exports_give_the_same_map(method):
    """One function, two graphs (TorchScript's and dynamo's): the same relevance stream."""
    maps = [explain(compiled("bert", exporter, method), "bert", [1, -1])["heatmap"] for exporter in EXPORTS]
    close(maps[0], maps[1])


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,message", [("fullgrad", "needs an image"), ("gradcam", "pass --layer")])
def test_methods_that_do_not_apply_are_refused_by_name(method, message):
    with pytest.raises(CompileError, match=message):
        agf_onnx.compile(exported("bert", "torchscript"), method=method, input_shapes={"input_ids": [1, txt.LENGTH]})


def test_a_dynamic_sequence_length_names_the_option():
    with pytest.raises(CompileError, match=r"--input-shape input_ids=N,T"):
        agf_onnx.compile(exported("bert", "torchscript"))


class NoEmbedding(nn.Module):
    """Token ids used as numbers: no embedding table to explain at."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(txt.LENGTH, txt.CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.linear(input_ids.float())


def test_token_inputs_without_an_embedding_say_what_was_looked_for():
    import io

    buffer = io.BytesIO()
    torch.onnx.export(NoEmbedding(), (torch.zeros(1, txt.LENGTH, dtype=torch.long),), buffer, dynamo=False,
                      input_names=["input_ids"], output_names=["logits"], dynamic_axes={"input_ids": {0: "batch"}})
    with pytest.raises(CompileError, match="index no embedding table: looked for a Gather"):
        agf_onnx.compile(onnx.load_from_string(buffer.getvalue()))


# -- ONNX Runtime's transformer optimiser (the deployed form) ----------------------------------------
@functools.lru_cache(maxsize=None)
def ort_optimised(arch: str) -> onnx.ModelProto:
    """``onnxruntime.transformers.optimizer.optimize_model(model_type='bert')`` of the TorchScript export:
    EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu/FastGelu."""
    import tempfile

    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/{arch}.onnx"
        onnx.save(exported(arch, "torchscript"), path)
        return optimize_model(path, model_type="bert", num_heads=4, hidden_size=32, opt_level=0).model


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_embed_layer_normalization_decomposes_into_standard_ops(arch):
    """The decomposition computes what ONNX Runtime's fused op computes (the other fused ops run as
    they are), and the compiler then finds the ids and E through it."""
    from agf_onnx.compiler.text import decompose_embed_layer_normalization

    optimised = ort_optimised(arch)
    assert any(n.op_type == "EmbedLayerNormalization" for n in optimised.graph.node)
    inputs = {i.name for i in optimised.graph.input}
    batch = {k: v for k, v in feeds(arch).items() if k in inputs}
    fused = run(optimised, batch, optimize=False)["logits"]
    decomposed = decompose_embed_layer_normalization(onnx.ModelProto.FromString(optimised.SerializeToString()))
    assert not any(n.domain == "com.microsoft" and n.op_type == "EmbedLayerNormalization" for n in decomposed.graph.node)
    np.testing.assert_allclose(run(decomposed, batch, optimize=False)["logits"], fused, rtol=1e-5, atol=1e-7)
    # the compiler's embedding search then sees the unfused form: a Gather of the word table by the ids
    # (through ONNX Runtime's int32 Cast), summed and normalised (canonicalise needs contrib.py for the rest)
    fused = next(n for n in optimised.graph.node if n.op_type == "EmbedLayerNormalization")
    word = next(n for n in decomposed.graph.node if n.op_type == "Gather" and n.input[0] == fused.input[2]
                and n.name.startswith(f"{fused.name}/"))
    assert any(n.op_type == "Cast" and n.input[0] == "input_ids" and n.output[0] == word.input[1]
               for n in decomposed.graph.node)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_the_ort_optimised_form_explains_like_the_export(arch):
    """The file ONNX Runtime's transformer optimiser writes (Attention, EmbedLayerNormalization,
    SkipLayerNormalization…), compiled as it is (its original nodes kept, ``deployed.py``) and after
    an explicit decomposition, explains like the plain export; its own outputs stay bit-identical."""
    from agf_onnx.compiler import contrib
    from agf_onnx.compiler.text import decompose_embed_layer_normalization

    optimised = ort_optimised(arch)
    inputs = {i.name for i in optimised.graph.input}
    batch = {k: v for k, v in feeds(arch).items() if k in inputs}
    expected = explain(compiled(arch, "torchscript"), arch, [1, -1])["heatmap"]
    decomposed = contrib.decompose(decompose_embed_layer_normalization(
        onnx.ModelProto.FromString(optimised.SerializeToString())))
    model = agf_onnx.compile(decomposed, input_shapes={"input_ids": [1, txt.LENGTH]})
    outputs = run(model, {**batch, "target": np.array([1, -1])}, optimize=False)
    close(outputs["heatmap"], expected)
    kept = agf_onnx.compile(optimised, input_shapes={"input_ids": ["N", txt.LENGTH]})
    outputs = run(kept, {**batch, "target": np.array([1, -1])}, optimize=False)
    scale = np.abs(expected).max(axis=1, keepdims=True)  # token maps are not scaled: compare relative to the peak
    close(outputs["heatmap"] / scale, expected / scale)
    original = run(optimised, batch, optimize=False)
    for name, value in original.items():
        assert np.array_equal(outputs[name], value), f"original output {name} changed"


# -- AGF against the float64 spec oracle ---------------------------------------------------------------
@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("flat_policy", ["authors", "none"])
def test_agf_against_the_float64_oracle(exporter, flat_policy):
    """AGF on the BERT classifier against ``oracle_tokens.bert_relevance`` (the spec's rules in float64)."""
    from . import oracle_tokens

    batch = txt.batch("bert")
    relevance = oracle_tokens.bert_relevance(net("bert"), batch, torch.tensor([1, -1]), flat_policy=flat_policy)
    expected = token_heatmap(relevance, batch["attention_mask"])
    model = compiled("bert", exporter, "agf", flat_policy=flat_policy)
    close(explain(model, "bert", [1, -1])["heatmap"], expected)


# -- LRP against LXT's rules -----------------------------------------------------------------------------
def lxt_lrp_bert(model: nn.Module, batch: dict, targets, dtype=torch.float64) -> torch.Tensor:
    """LRP relevance at E from LXT's Gradient×Input framework with zennit's α1β0 (no bias, the spec's
    stabiliser 1e-9) on every Linear, configured to the spec's rules as ``test_tokens.lxt_lrp`` is for the ViT: CP-LRP attention
    (q and k detached in ``transformers``' eager attention), LXT's identity rule on LayerNorm, GELU and
    the pooler's Tanh. LXT's own BERT model map (``lxt.efficient.models.bert``) imports helpers that
    ``transformers`` 5 removed (``find_pruneable_heads_and_indices``), so its rule modules are used
    directly on the ``transformers`` model, as for the ViT."""
    txt.import_transformers()
    from transformers.activations import GELUActivation
    from transformers.models.bert import modeling_bert

    from .test_tokens import _lxt_modules

    rules, patches, zennit_patches = _lxt_modules()  # first: it stands in for torchvision, which zennit imports
    from zennit.composites import LayerMapComposite
    from zennit.core import BasicHook
    from zennit.rules import AlphaBeta
    model = copy.deepcopy(model).to(dtype).eval()
    for module in model.modules():
        if isinstance(module, (GELUActivation, nn.Tanh)):
            module.original_forward = module.forward
            module.forward = types.MethodType(patches.non_linear_forward, module)
        elif isinstance(module, nn.LayerNorm):
            module.forward = functools.partial(rules.identity_rule_implicit, module.forward)
    embedding, logits_of = txt.at_embeddings(model, batch, dtype, copied=False)
    leaf = embedding.clone().requires_grad_(True)
    attention = modeling_bert.eager_attention_forward
    # the spec's stabiliser (1e-9) instead of zennit's 1e-6, which shifts this small-weighted model's map by ~1e-4
    rule = AlphaBeta(1.0, 0.0, stabilizer=1e-9, zero_params=["bias"])
    composite = LayerMapComposite(layer_map=[(nn.Linear, rule)])
    saved = BasicHook.forward, BasicHook.backward
    try:
        modeling_bert.eager_attention_forward = lambda module, q, k, *args, **kw: attention(
            module, rules.stop_gradient(q), rules.stop_gradient(k), *args, **kw)
        zennit_patches.monkey_patch_zennit()
        composite.register(model)
        output = logits_of(leaf)
        one_hot = torch.zeros_like(output)
        one_hot[torch.arange(len(leaf)), torch.as_tensor(targets)] = 1
        output.backward(one_hot)  # relevance at the logits: y ⊙ onehot(t)
    finally:
        composite.remove()
        modeling_bert.eager_attention_forward = attention
        BasicHook.forward, BasicHook.backward = saved
    return (leaf * leaf.grad).detach()


def test_lrp_matches_lxt_on_bert():
    batch = txt.batch("bert")
    targets = [1, 2]
    expected = token_heatmap(lxt_lrp_bert(net("bert"), batch, targets), batch["attention_mask"])
    got = explain(compiled("bert", "torchscript", "lrp"), "bert", targets)["heatmap"]
    # as test_tokens.test_lrp_matches_lxt: a map scaled by a small positive maximum spans ±10⁴ here, so
    # the bound is LXT's own float32 floor
    floor = np.abs(token_heatmap(lxt_lrp_bert(net("bert"), batch, targets, torch.float32).double(),
                                 batch["attention_mask"]) - expected).max()
    assert np.abs(got - expected).max() <= max(1e-4, 3.0 * floor), (np.abs(got - expected).max(), floor)
    assert min(pearson(a, b) for a, b in zip(got, expected)) >= 0.99999
