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
from agf_onnx.methods import METHODS

from . import models, oracle
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
