"""Baseline methods compiled by the same engine (issue 4), against Captum on the same torch.nn
model in float64. The compiled map is the spec's output applied to the method's per-channel
attribution: Σ_c A / max A per sample (max |A| when max A ≤ 0)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, Saliency

import agf_onnx
from agf_onnx.cli import main
from agf_onnx.compiler.methods import METHODS, Kind

from . import architectures, models, oracle, zoo
from .runtime import run

NETS = {"vgg": models.seeded(models.VGGish(), seed=41),
        "resnet": models.seeded(models.ResNetish(models.BasicBlock, (2, 1), (8, 16)), seed=42)}
CAPTUM = {"gradient": (Saliency, {"abs": True}), "gradient-x-input": (InputXGradient, {})}


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("method", CAPTUM)
def test_gradient_methods_match_captum(method, net):
    model = NETS[net]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    targets = np.array([4, 0, 7])
    compiled = agf_onnx.compile(models.export(model, fold=False), method=method)
    heatmaps = run(compiled, {"x": images.numpy(), "target": targets})["heatmap"]
    attribution, options = CAPTUM[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum sets requires_grad itself
        expected = attribution(copy.deepcopy(model).double()).attribute(
            images.double(), target=torch.from_numpy(targets), **options).detach()
    np.testing.assert_allclose(heatmaps, oracle.heatmap(expected).numpy(), atol=2e-5, rtol=1e-4)


def test_every_method_keeps_the_interface_and_is_documented():
    proto = models.export(NETS["resnet"])
    x = torch.randn(2, 3, 32, 32).numpy()
    for name, method in METHODS.items():
        assert method.summary and method.formula, f"{name} is not documented"
        if method.kind is Kind.ATTENTION:  # a transformer method: refused by name on a CNN
            with pytest.raises(agf_onnx.CompileError, match="--method chefer: no attention"):
                agf_onnx.compile(proto, method=name)
            continue
        compiled = agf_onnx.compile(proto, method=name)
        outputs = run(compiled, {"x": x, "target": np.array([1])})
        assert outputs["heatmap"].shape == (2, 1, 32, 32) and np.isfinite(outputs["heatmap"]).all()
        assert {p.key: p.value for p in compiled.metadata_props}["agf_onnx.method"] == name


def test_cli_method_flag(tmp_path):
    import onnx

    source, out = tmp_path / "m.onnx", tmp_path / "m_grad.onnx"
    onnx.save(models.export(NETS["vgg"]), source)
    assert main(["compile", str(source), "-o", str(out), "--method", "gradient-x-input", "-q"]) == 0
    maps = run(onnx.load(out), {"x": torch.randn(1, 3, 32, 32).numpy()})["heatmap"]
    assert np.isfinite(maps).all() and maps.shape == (1, 1, 32, 32)


def gradcam_oracle(model, layer, images, targets):
    from captum.attr import LayerAttribution, LayerGradCam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cam = LayerGradCam(model, layer).attribute(images.double(), target=torch.from_numpy(targets),
                                                   relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(images.shape[2:]), interpolate_mode="bilinear").detach()
    peak = cam.flatten(1).abs().max(1).values.reshape(-1, 1, 1, 1)
    return torch.where(peak > 0, cam / torch.where(peak > 0, peak, torch.ones_like(peak)), cam).numpy()


def test_gradcam_matches_captum_at_the_last_conv():
    model = copy.deepcopy(NETS["vgg"]).double()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = np.array([2, 5, 9])
    compiled = agf_onnx.compile(models.export(NETS["vgg"]), method="gradcam")
    heatmaps = run(compiled, {"x": images.numpy(), "target": targets})["heatmap"]
    last_conv = [m for m in model.features if isinstance(m, torch.nn.Conv2d)][-1]
    np.testing.assert_allclose(heatmaps, gradcam_oracle(model, last_conv, images, targets), atol=2e-5)


def test_gradcam_at_a_named_layer():
    model = copy.deepcopy(NETS["resnet"]).double()
    proto = models.export(NETS["resnet"], fold=False)
    node = "/layers/layers.0/layers.0.1/conv2/Conv"
    assert node in {n.name for n in proto.graph.node}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = np.array([1, 6])
    heatmaps = run(agf_onnx.compile(proto, method="gradcam", layer=node), {"x": images.numpy(), "target": targets})
    expected = gradcam_oracle(model, model.layers[0][1].conv2, images, targets)
    np.testing.assert_allclose(heatmaps["heatmap"], expected, atol=2e-5)
    with pytest.raises(agf_onnx.CompileError, match="--layer: no node 'nope'"):
        agf_onnx.compile(proto, method="gradcam", layer="nope")
    with pytest.raises(agf_onnx.CompileError, match="explains at the image"):
        agf_onnx.compile(proto, method="gradient", layer=node)


def test_integrated_gradients_matches_captum():
    from captum.attr import IntegratedGradients

    model = NETS["resnet"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    targets = np.array([3, 8])
    compiled = agf_onnx.compile(models.export(model, fold=False), method="integrated-gradients",
                                options={"steps": 20})
    heatmaps = run(compiled, {"x": images.numpy(), "target": targets})["heatmap"]
    expected = IntegratedGradients(copy.deepcopy(model).double()).attribute(
        images.double(), target=torch.from_numpy(targets), n_steps=20).detach()
    np.testing.assert_allclose(heatmaps, oracle.heatmap(expected).numpy(), atol=2e-5)


def test_smoothgrad_without_noise_is_saliency_and_its_seed_is_fixed():
    proto = models.export(NETS["vgg"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)).numpy()
    silent = run(agf_onnx.compile(proto, method="smoothgrad", options={"samples": 3, "noise": 0.0}), {"x": images})
    np.testing.assert_allclose(silent["heatmap"], run(agf_onnx.compile(proto, method="gradient"), {"x": images})
                               ["heatmap"], atol=1e-6)
    noisy = [run(agf_onnx.compile(proto, method="smoothgrad", options={"samples": 4, "seed": s}), {"x": images})
             ["heatmap"] for s in (7, 7, 8)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0], noisy[2])


def test_smoothgrad_agrees_with_captum_statistically():
    """Both average |∇| over 200 noisy copies: they agree as well as two of our own runs do."""
    from captum.attr import NoiseTunnel

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    targets = [1, 2]
    options = {"samples": 200, "noise": 0.1}
    ours = [run(agf_onnx.compile(models.export(NETS["vgg"]), method="smoothgrad", options={**options, "seed": s}),
                {"x": images.numpy(), "target": np.array(targets)})["heatmap"] for s in (1, 2)]
    model = copy.deepcopy(NETS["vgg"]).double()
    for i, target in enumerate(targets):
        spread = float(images[i].max() - images[i].min())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captum = NoiseTunnel(Saliency(model)).attribute(images[i:i + 1].double(), target=target, nt_samples=200,
                                                            nt_type="smoothgrad", stdevs=0.1 * spread).detach()
        reference = oracle.heatmap(captum).numpy()[0]
        ours_vs_captum = np.corrcoef(ours[0][i].ravel(), reference.ravel())[0, 1]
        ours_vs_ours = np.corrcoef(ours[0][i].ravel(), ours[1][i].ravel())[0, 1]
        assert ours_vs_captum > 0.93 and abs(ours_vs_captum - ours_vs_ours) < 0.03


@pytest.mark.parametrize("method, alpha, beta", [("lrp", 1, 0), ("lrp-ab", 2, 1)])
def test_lrp_matches_zennit(method, alpha, beta):
    from .zennit_oracle import lrp_alpha_beta

    model = copy.deepcopy(NETS["vgg"])
    for module in model.modules():  # the authors' αβ rule ignores biases; Zennit's counts them
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    targets = np.array([1, 4])
    compiled = agf_onnx.compile(models.export(model), method=method)
    assert not [n for n in compiled.graph.node if "/vjp/" in n.name], "LRP needs no gradient stream"
    heatmaps = run(compiled, {"x": images.numpy(), "target": targets})["heatmap"]
    expected = lrp_alpha_beta(model.double(), images.double(), targets, alpha, beta)
    np.testing.assert_allclose(heatmaps, oracle.heatmap(expected).numpy(), atol=1e-4, rtol=1e-4)


def test_lrp_matches_captum_where_its_rules_coincide():
    """Captum's LRP has no z^B rule; with non-negative images (minimum 0) and a non-negative first
    layer, z^B is the α1β0 rule, which Captum then applies to every layer."""
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule

    model = copy.deepcopy(NETS["vgg"])
    for module in model.modules():
        if getattr(module, "bias", None) is not None:  # the authors' rule ignores biases; Captum's counts them
            module.bias.data.zero_()
    model.features[0].weight.data = model.features[0].weight.data.abs()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    images[:, :, 0, 0] = 0
    targets = np.array([2, 6])
    heatmaps = run(agf_onnx.compile(models.export(model), method="lrp"), {"x": images.numpy(), "target": targets})
    reference = copy.deepcopy(model).double()
    for module in reference.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.rule = Alpha1_Beta0_Rule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        relevance = LRP(reference).attribute(images.double(), target=torch.as_tensor(targets)).detach()
    np.testing.assert_allclose(heatmaps["heatmap"], oracle.heatmap(relevance).numpy(), atol=1e-5)


def _softmax_target(y, hot):
    p = torch.softmax(y, 1)
    return hot * (p * (1 - p) + 1e-8)


def _softmax_others(y, hot):
    p = torch.softmax(y, 1)
    return (1 - hot) * (p * hot).sum(1, keepdim=True) * p


CONTRASTIVE_SEEDS = {  # (target seed, others seed) from the definitions (Gu et al. 2018; Iwana et al. 2019)
    "clrp": (lambda y, hot: y * hot, lambda y, hot: (1 - hot) * (y * hot).sum(1, keepdim=True) / (y.shape[1] - 1)),
    "sglrp": (_softmax_target, _softmax_others),
}


@pytest.mark.parametrize("method", CONTRASTIVE_SEEDS)
def test_contrastive_lrp_matches_its_definition_over_zennit(method):
    from .zennit_oracle import lrp_alpha_beta

    model = copy.deepcopy(NETS["vgg"])
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    targets = np.array([1, 4])
    heatmaps = run(agf_onnx.compile(models.export(model), method=method), {"x": images.numpy(), "target": targets})
    double, x = model.double(), images.double()
    target_seed, others_seed = CONTRASTIVE_SEEDS[method]
    target_relevance = lrp_alpha_beta(double, x, targets, 1, 0, start=target_seed)
    others = lrp_alpha_beta(double, x, targets, 1, 0, start=others_seed)
    ratio = target_relevance.flatten(1).sum(1) / others.flatten(1).sum(1)
    expected = target_relevance - others * ratio.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(heatmaps["heatmap"], oracle.heatmap(expected).numpy(), atol=1e-4, rtol=1e-4)


def fullgrad_oracle(model, images, targets):
    """FullGrad from its definition (Srinivas & Fleuret 2019, the authors' fullgrad.py): the
    post-processed input-gradient plus every conv/BatchNorm bias-gradient, upsampled."""
    import torch.nn.functional as F

    def post(t):
        t = t.abs()
        t = t - t.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
        return t / (t.flatten(1).max(1).values.reshape(-1, 1, 1, 1) + 1e-6)

    model = copy.deepcopy(model).double().eval()
    x = images.double().requires_grad_(True)
    outputs, biases = [], []

    def keep(module, _, out):
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            bias = module.bias
        elif isinstance(module, torch.nn.BatchNorm2d):
            bias = module.bias - module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)
        else:
            return
        out.retain_grad()
        outputs.append(out)
        biases.append(bias.detach())

    hooks = [m.register_forward_hook(keep) for m in model.modules()]
    model(x)[torch.arange(len(x)), torch.as_tensor(targets)].sum().backward()
    for hook in hooks:
        hook.remove()
    cam = post(x.grad * x).sum(1, keepdim=True)
    for out, bias in zip(outputs, biases):
        term = post(out.grad * bias.reshape(1, -1, 1, 1))
        cam = cam + F.interpolate(term, size=x.shape[2:], mode="bilinear", align_corners=True).sum(1, keepdim=True)
    return (cam / cam.flatten(1).max(1).values.reshape(-1, 1, 1, 1)).detach().numpy()


@pytest.mark.parametrize("net", NETS)
def test_fullgrad_matches_its_definition(net):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    targets = np.array([1, 5])
    compiled = agf_onnx.compile(models.export(NETS[net], fold=False), method="fullgrad")
    heatmaps = run(compiled, {"x": images.numpy(), "target": targets})["heatmap"]
    np.testing.assert_allclose(heatmaps, fullgrad_oracle(NETS[net], images, targets), atol=2e-5)


@pytest.mark.parametrize("method", ["agf", "gradcam", "integrated-gradients", "clrp", "rap", "fullgrad"])
def test_top_k_gives_every_class_map_in_one_run(method):
    proto = models.export(NETS["resnet"], fold=False, softmax=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(12)).numpy()
    outputs = run(agf_onnx.compile(proto, method=method, top_k=3), {"x": images})
    order = np.argsort(-outputs["y"], 1, kind="stable")[:, :3]
    np.testing.assert_array_equal(outputs["classes"], order)
    assert outputs["heatmaps"].shape == (3, 3, 32, 32)
    single = agf_onnx.compile(proto, method=method)
    for k in range(3):  # the same maps as explaining each class on its own
        expected = run(single, {"x": images, "target": order[:, k]})["heatmap"][:, 0]
        np.testing.assert_allclose(outputs["heatmaps"][:, k], expected, atol=1e-4)
    np.testing.assert_allclose(outputs["heatmaps"][:, 0], outputs["heatmap"][:, 0], atol=1e-4)


def test_top_k_bad_values_are_refused():
    proto = models.export(NETS["vgg"])
    with pytest.raises(agf_onnx.CompileError, match="--top-k 11: must be between 1 and the number of classes"):
        agf_onnx.compile(proto, top_k=11)


def test_top_k_of_a_replicated_method_nests_the_copies():
    proto = models.export(NETS["resnet"], fold=False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(14)).numpy()
    # smoothgrad without noise is the saliency map: its K maps must be those of `gradient --top-k`
    noiseless = run(agf_onnx.compile(proto, method="smoothgrad", top_k=3, options={"noise": 0.0, "samples": 3}),
                    {"x": images})
    gradient = run(agf_onnx.compile(proto, method="gradient", top_k=3), {"x": images})
    np.testing.assert_array_equal(noiseless["classes"], gradient["classes"])
    np.testing.assert_allclose(noiseless["heatmaps"], gradient["heatmaps"], atol=1e-5)


def test_rap_matches_its_definition():
    from .rap_oracle import rap

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    targets = np.array([1, 4, 7])
    compiled = agf_onnx.compile(models.export(NETS["vgg"]), method="rap")
    assert not [n for n in compiled.graph.node if "/vjp/" in n.name], "RAP needs no gradient stream"
    heatmaps = run(compiled, {"x": images.numpy(), "target": targets})["heatmap"]
    expected = rap(copy.deepcopy(NETS["vgg"]).double(), images.double(), targets)
    np.testing.assert_allclose(heatmaps, oracle.heatmap(expected).numpy(), atol=1e-4, rtol=1e-4)


def test_rap_needs_a_dense_layer_at_the_logits():
    with pytest.raises(agf_onnx.CompileError, match="rap starts at a Gemm or MatMul .* Conv"):
        agf_onnx.compile(zoo.zoo_model("squeezenet"), method="rap")


BATCH_NETS = {"shufflenet": architectures.ShuffleNetish, "resnet": lambda: models.ResNetish(models.BasicBlock, (2, 1), (8, 16)),
              "densenet": architectures.DenseNetish, "mobilenetv3": architectures.MobileNetV3ish,
              "inception": architectures.Inceptionish}


@pytest.mark.parametrize("name", ["shufflenet", *(pytest.param(n, marks=pytest.mark.slow) for n in BATCH_NETS
                                                   if n != "shufflenet")])
def test_every_method_explains_each_sample_as_if_alone(name):
    """A batch's maps equal each sample's map alone, for every method (the token models' version is in
    test_tokens.py): channel shuffles, concatenations and squeeze-excite gates keep the batch apart."""
    model = models.export(models.seeded(BATCH_NETS[name](), seed=5))
    images = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    failures = []
    for method in sorted(set(METHODS) - {"chefer"}):  # chefer: no attention in a CNN
        compiled = agf_onnx.compile(model, method=method)
        together = run(compiled, {"x": images})["heatmap"]
        for i in range(len(images)):
            alone = run(compiled, {"x": images[i:i + 1]})["heatmap"][0]
            worst = float(np.abs(together[i] - alone).max())
            if worst > 1e-4 * max(float(np.abs(alone).max()), 1e-12):
                failures.append(f"{method} sample {i}: max|Δ| {worst:.2e}")
    assert not failures, "\n".join(failures)
