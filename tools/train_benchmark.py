"""Train the built-in benchmark's classifiers on the CPU, seeded, and export them to ONNX.

    python tools/make_benchmark.py bench                 # the data first
    python tools/train_benchmark.py bench --arch vgg     # → bench/vgg.onnx
    python tools/train_benchmark.py bench --arch resnet  # → bench/resnet.onnx

A small VGG-style network (seven 3×3 conv/ReLU layers, four max pools, a three-layer classifier
on the flattened 4×4 map)
and a small ResNet-style one (stem, three BasicBlock stages with BatchNorm, global average pool),
both from ``tests/models.py``, trained multi-label (a sigmoid per class, binary cross-entropy) with
Adam on ``bench/train``. Inputs are the canvases scaled to [-1, 1] (``--preset symmetric`` for
``agf-onnx``); outputs are the ten class logits. Prints the test split's top-1 accuracy (the top
class is one of the items present). Same arguments, torch version and CPU thread count, same
weights (the order of float sums depends on the threads).
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys
import time

import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.models import BasicBlock, ResNetish, VGGish, export  # noqa: E402

ARCHITECTURES = {
    "vgg": lambda size, classes: torchvision_init(VGGish(widths=(16, 16, "M", 32, 32, "M", 64, 64, "M", 128, "M"),
                                                         image=size, classes=classes, hidden=256)),
    "resnet": lambda size, classes: ResNetish(BasicBlock, layers=(1, 1, 1), planes=(16, 32, 64), stem=16,
                                              classes=classes),
}


def torchvision_init(model: nn.Module) -> nn.Module:
    """torchvision's VGG initialisation (He normal, fan-out, for convs; N(0, 0.01) for linear layers; zero
    biases): without BatchNorm, PyTorch's default initialisation leaves a plain VGG slow to start."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model


def load_split(folder: pathlib.Path, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, S, S]`` in [-1, 1] and multi-hot targets ``[N, classes]`` of one split."""
    with open(folder / "labels.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    images = np.stack([np.asarray(Image.open(folder / row["file"]).convert("RGB")) for row in rows])
    targets = np.zeros((len(rows), classes), np.float32)
    for i, row in enumerate(rows):
        targets[i, [int(c) for c in row["labels"].split()]] = 1
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.from_numpy(targets)


def top1_accuracy(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        top = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1)
    return float(targets[torch.arange(len(x)), top].mean())


def train(data: pathlib.Path, arch: str, epochs: int, seed: int, batch: int = 64, lr: float = 2e-3) -> nn.Module:
    torch.manual_seed(seed)
    classes = len((data / "train" / "classes.txt").read_text().split("\n")) - 1
    x, y = load_split(data / "train", classes)
    model = ARCHITECTURES[arch](x.shape[-1], classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=epochs * -(-len(x) // batch))
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        began, total = time.perf_counter(), 0.0
        for index in torch.randperm(len(x), generator=generator).split(batch):
            images = x[index]
            flip = torch.rand(len(index), generator=generator) < 0.5  # horizontal flips: items keep their class
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = loss_fn(model(images), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        model.eval()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}, train top-1 "
              f"{top1_accuracy(model, x[:1000], y[:1000]):.1%} ({time.perf_counter() - began:.0f} s)", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=pathlib.Path, help="the folder make_benchmark.py wrote (with train/ and test/)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=pathlib.Path, help="default: DATA/ARCH.onnx")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    began = time.perf_counter()
    model = train(args.data, args.arch, args.epochs, args.seed)
    classes = len((args.data / "train" / "classes.txt").read_text().split("\n")) - 1
    x, y = load_split(args.data / "test", classes)
    output = args.output or args.data / f"{args.arch}.onnx"
    onnx.save(export(model, x.shape[-1]), output)
    print(f"{output}: test top-1 {top1_accuracy(model, x, y):.1%} on {len(x)} canvases, "
          f"trained in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
