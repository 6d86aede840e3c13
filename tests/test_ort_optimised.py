"""End to end: the file ONNX Runtime's optimiser writes explains as the unoptimised file does.

ONNX Runtime writes the optimised file itself (``SessionOptions.optimized_model_filepath`` at
ORT_ENABLE_EXTENDED; ``onnxruntime.transformers.optimizer`` for the ViT), from the TorchScript
export of a small net. Two paths are checked:

- the public one, ``agf_onnx.compile(optimised)``: the compiled model keeps the contrib nodes and
  its original outputs are bit-identical to the optimised file's (both run with ONNX Runtime's
  optimisations off); the explanation is computed over the standard-op view (``deployed.py``,
  which decomposes with ``contrib.decompose``);
- ``agf_onnx.compile(contrib.decompose(optimised))``: the decomposition alone is explainable.

Either way the heatmap equals the unoptimised file's, r ≥ 0.9999 per sample (measured: r =
1.0000000 on every case here; max |Δ| ≤ 3e-4 of maps with peak 1, from the float32 round-off of
the fused kernels' activations that the view reads).

Grad-CAM is given its layer by name: its default, the last Conv in file order, is another conv
after ONNX Runtime re-sorts the nodes (ResNet: the downsample 1×1 conv comes last in the
TorchScript file, conv2 in ONNX Runtime's); the named conv keeps its name through the fusion and
the decomposition.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import agf_onnx
from agf_onnx.compiler import contrib

from . import architectures, models, token_models
from .runtime import run
from .test_contrib import Fusable, _cnn, images, ort_optimised, tanh_vit, transformer_optimised

MIN_R = 0.9999

#: net → (the unoptimised export, token model?)
NETS = {
    "resnet": (lambda: _cnn(models.ResNetish()), False),
    "mobilenetv2": (lambda: _cnn(architectures.MobileNetV2ish()), False),
    "vgg": (lambda: _cnn(models.VGGish()), False),
    "fusable": (lambda: _cnn(Fusable()), False),
    "vit": (lambda: token_models.export(token_models.vit(0)), True),
    "vit-tanh": (lambda: token_models.export(tanh_vit()), True),
}
OPTIMISERS = {
    "extended": ort_optimised,
    "transformer-optimiser": lambda model: transformer_optimised(model, "vit", 2, 16),
}


@functools.cache
def plain(net: str) -> onnx.ModelProto:
    return NETS[net][0]()


@functools.cache
def optimised(net: str, optimiser: str) -> onnx.ModelProto:
    return OPTIMISERS[optimiser](plain(net))


def methods(net: str) -> list[str]:
    return ["agf", "gradcam", "lrp"] + (["chefer"] if NETS[net][1] else [])


def explained(model: onnx.ModelProto, net: str, method: str) -> dict[str, np.ndarray]:
    """All outputs of ``model`` compiled with ``method``, on two images, top class, ONNX Runtime's
    optimisations off."""
    layer = None
    if method == "gradcam" and not NETS[net][1]:
        layer = [n.name for n in plain(net).graph.node if n.op_type == "Conv"][-1]
    compiled = agf_onnx.compile(model, method=method, layer=layer)
    return run(compiled, {**images(), "target": np.array([-1, -1], np.int64)}, optimize=False)


@functools.cache
def unoptimised_heatmap(net: str, method: str) -> np.ndarray:
    return explained(plain(net), net, method)["heatmap"]


def assert_same_map(net: str, method: str, heatmap: np.ndarray) -> None:
    reference = unoptimised_heatmap(net, method)
    assert heatmap.shape == reference.shape and np.isfinite(heatmap).all()
    for i in range(len(heatmap)):
        r = np.corrcoef(heatmap[i].ravel(), reference[i].ravel())[0, 1]
        assert r >= MIN_R, f"{net} {method} sample {i}: r = {r:.6f} against the unoptimised file's map"


CASES = [("resnet", "extended"), ("vit", "extended"), ("vit", "transformer-optimiser")]
SLOW_CASES = [("mobilenetv2", "extended"), ("vgg", "extended"), ("fusable", "extended"),
              ("vit-tanh", "extended"), ("vit-tanh", "transformer-optimiser")]


def _cases():
    for net, optimiser in CASES + SLOW_CASES:
        marks = [pytest.mark.slow] if (net, optimiser) in SLOW_CASES else []
        for method in methods(net):
            yield pytest.param(net, optimiser, method, marks=marks, id=f"{net}-{optimiser}-{method}")


@pytest.mark.parametrize("net,optimiser,method", list(_cases()))
def test_optimised_file_explains_as_the_unoptimised_one(net, optimiser, method):
    """The public path: contrib nodes kept, original outputs bit-identical, the same map."""
    model = optimised(net, optimiser)
    assert any(n.domain == contrib.MICROSOFT for n in model.graph.node), "ONNX Runtime fused nothing here"
    outputs = explained(model, net, method)
    original = run(model, images(), optimize=False)
    for name, value in original.items():
        np.testing.assert_array_equal(outputs[name], value, err_msg=f"original output '{name}' changed")
    assert_same_map(net, method, outputs["heatmap"])


@pytest.mark.parametrize("net,optimiser,method", list(_cases()))
def test_decomposed_optimised_file_explains_as_the_unoptimised_one(net, optimiser, method):
    """The decomposition alone, compiled as a plain model, gives the unoptimised file's map."""
    decomposed = contrib.decompose(optimised(net, optimiser))
    assert_same_map(net, method, explained(decomposed, net, method)["heatmap"])
