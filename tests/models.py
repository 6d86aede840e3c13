"""Test classifiers built from plain ``torch.nn`` (torchvision does not import beside the CPU
torch used here), with seeded weights and BatchNorm statistics calibrated on random images so
that activations stay O(1), plus ONNX export helpers."""

from __future__ import annotations

import copy
import io
import warnings

import onnx
import torch
from torch import nn


class VGGish(nn.Module):
    """VGG layout without BatchNorm: conv/ReLU stacks, max pools, a 3-layer classifier."""

    def __init__(self, widths=(8, "M", 16, 16, "M", 32, "M"), image=32, classes=10, hidden=64):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        size = image // 2 ** widths.count("M")
        self.classifier = nn.Sequential(
            nn.Linear(channels * size * size, hidden), nn.ReLU(), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class ResNetish(nn.Module):
    """torchvision's ResNet layout, scaled down: stem conv/BN/ReLU/max pool, stages, GAP, fc."""

    def __init__(self, block=BasicBlock, layers=(1, 1), planes=(8, 16), stem=8, classes=10, stem_kernel=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, stem_kernel, 2 if stem_kernel == 7 else 1, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], stem
        for index, (count, width) in enumerate(zip(layers, planes)):
            blocks = []
            for i in range(count):
                blocks.append(block(inplanes, width, 2 if i == 0 and index > 0 else 1))
                inplanes = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def seeded(model: nn.Module, seed: int = 0, image: int = 32, calibrate: bool = True) -> nn.Module:
    """Seeded He-style weights; BatchNorm statistics calibrated on random images; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            if module.bias is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.05
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data = 1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
    if calibrate and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(16, 3, image, image, generator=generator))
    return model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every ``conv → BatchNorm`` pair fused into the conv (the BN becomes Identity)."""
    model = copy.deepcopy(model)
    for parent in model.modules():
        names = list(parent._modules)
        for before, after in zip(names, names[1:]):
            conv, norm = parent._modules[before], parent._modules[after]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                _fuse(conv, norm)
                parent._modules[after] = nn.Identity()
    return model


def _fuse(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach())
    conv.bias = nn.Parameter(((bias - norm.running_mean) * scale + norm.bias).detach())


def export(model: nn.Module, image: int = 32, *, dynamo: bool = False, fold: bool = True, opset: int = 17,
           softmax: bool = False) -> onnx.ModelProto:
    """``torch.onnx.export`` with a dynamic batch; ``softmax`` appends a trailing Softmax."""
    module = (nn.Sequential(model, nn.Softmax(dim=1)) if softmax else model).eval()  # a train-mode wrapper
    # would be restored after export with its children: the model would come back in train mode
    example = torch.randn(2, 3, image, image)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["x"], optimize=True,
                                        dynamic_shapes={"x": {0: torch.export.Dim("N")}}, verbose=False)
            return program.model_proto
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=opset,
                          do_constant_folding=fold)
    return onnx.load_from_string(buffer.getvalue())
