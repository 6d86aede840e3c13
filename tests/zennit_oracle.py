"""Zennit as an LRP oracle. Zennit imports torchvision at import time, and torchvision does not
import beside the CPU torch used here; Zennit's torchvision canonizers are not needed for these
tests, so a stand-in module takes torchvision's place (installed with --no-deps, see README)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch


def _stand_in_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    root, models, resnet = (types.ModuleType(n) for n in ("torchvision", "torchvision.models",
                                                           "torchvision.models.resnet"))
    for module in (root, models, resnet):  # importlib.util.find_spec (transformers asks it) needs a spec
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
    resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
    root.models, models.resnet = models, resnet
    sys.modules.update({"torchvision": root, "torchvision.models": models, "torchvision.models.resnet": resnet})


def lrp_alpha_beta(model: torch.nn.Module, images: torch.Tensor, targets, alpha: float, beta: float,
                   start=None) -> torch.Tensor:
    """Relevance at the image: αβ on every conv and dense layer, ZBox with the per-sample image
    bounds on the first conv, relevance passed through ReLU, started from ``start(y, onehot)``
    (default: y ⊙ onehot(t))."""
    _stand_in_torchvision()
    from zennit.attribution import Gradient
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import AlphaBeta, Norm, Pass, ZBox
    from zennit.types import Activation, AvgPool, Convolution, Linear

    low = images.flatten(1).min(1).values.reshape(-1, 1, 1, 1) * torch.ones_like(images)
    high = images.flatten(1).max(1).values.reshape(-1, 1, 1, 1) * torch.ones_like(images)
    composite = SpecialFirstLayerMapComposite(
        layer_map=[(Activation, Pass()), (AvgPool, Norm()), (Convolution, AlphaBeta(alpha, beta)),
                   (Linear, AlphaBeta(alpha, beta))],
        first_map=[(Convolution, ZBox(low, high))])
    with Gradient(model, composite) as attributor:
        output = model(images)
        one_hot = torch.zeros_like(output)
        one_hot[torch.arange(len(images)), torch.as_tensor(targets)] = 1
        seed = (start or (lambda y, hot: y * hot))(output.detach(), one_hot)
        _, relevance = attributor(images, seed)
    return relevance.detach()
