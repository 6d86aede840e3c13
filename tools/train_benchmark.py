"""Train the built-in benchmark's classifiers on the CPU, seeded, and export them to ONNX.

    python tools/make_benchmark.py bench                   # the data first
    python tools/train_benchmark.py bench --arch vgg       # → bench/vgg.onnx
    python tools/train_benchmark.py bench --arch resnet    # → bench/resnet.onnx
    python tools/train_benchmark.py bench --arch vit --epochs 20 --threads 1
    python tools/train_benchmark.py bench --arch convnext --threads 1
    python tools/make_benchmark.py text --text && python tools/train_benchmark.py text --arch bert

    python tools/make_benchmark.py quick --quick && python tools/train_benchmark.py quick --arch vgg --quick
    agf-onnx evaluate quick/vgg_quick.onnx quick/test -o quick/eval --preset symmetric --methods agf,gradcam,lrp
                                                           # a first table in about a minute, labelled quick

A small VGG-style network (seven 3×3 conv/ReLU layers, four max pools, a three-layer classifier
on the flattened 4×4 map)
and a small ResNet-style one (stem, three BasicBlock stages with BatchNorm, global average pool),
both from ``tests/models.py``; a tiny ViT (timm's ``VisionTransformer`` layout: 8×8 patches,
class token, position embedding, four pre-norm blocks of width 64 with four heads, GELU MLPs)
and a tiny ConvNeXt (timm's layout: 4×4 stem, three stages of 7×7 depthwise blocks with
LayerNorm, GELU and layer scale, widths 32/64/96), both written here from ``torch.nn``.
All are trained multi-label (a sigmoid per class, binary cross-entropy) with
Adam on ``bench/train``. Inputs are the canvases scaled to [-1, 1] (``--preset symmetric`` for
``agf-onnx``); outputs are the ten class logits. Prints the test split's top-1 accuracy (the top
class is one of the items present). Same arguments, torch version and CPU thread count, same
weights (the order of float sums depends on the threads).

``--arch bert``: the text benchmark's tiny BERT (``tools/text_benchmark.py``), trained on
``DATA/train.csv`` and exported to ``DATA/bert.onnx``.
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


class Attention(nn.Module):
    """timm's ViT attention, written out (no fused kernel): one qkv projection, the heads split with
    ``reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)``, softmax(q kᵀ / √d) v, heads merged, projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's ``VisionTransformer`` at tiny width: patch embedding (a strided conv), class token,
    learned position embedding, pre-norm blocks, final LayerNorm, the class token's linear head."""

    def __init__(self, image: int, classes: int, patch: int = 8, width: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width, eps=1e-6), nn.Linear(width, classes)
        for module in self.modules():  # timm's init: truncated normal linear weights, zero biases
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        # x.shape[0], not len(x): the exporter records len() as a constant, fixing the batch size
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` map (timm's: permute, normalise, permute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + γ ⊙ Linear(GELU(Linear(LN(dwconv7×7(x))))), the pointwise layers channels-last as in timm."""

    def __init__(self, width: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))  # layer scale, as timm starts it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """timm's ``ConvNeXt`` at tiny width: a 4×4 stride-4 stem with LayerNorm2d, stages of blocks
    joined by LayerNorm2d + 2×2 stride-2 convs, global average pool, LayerNorm, linear head."""

    def __init__(self, classes: int, widths: tuple = (32, 64, 96), depths: tuple = (2, 2, 2)):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, 4), LayerNorm2d(widths[0], eps=1e-6)]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            if index:
                layers += [LayerNorm2d(widths[index - 1], eps=1e-6), nn.Conv2d(widths[index - 1], width, 2, 2)]
            layers += [ConvNeXtBlock(width) for _ in range(depth)]
        self.stages = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(widths[-1], eps=1e-6), nn.Linear(widths[-1], classes)
        for module in self.modules():  # timm's init: truncated normal conv and linear weights, zero biases
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stages(x).mean((2, 3))))


ARCHITECTURES = {
    "vgg": lambda size, classes: torchvision_init(VGGish(widths=(16, 16, "M", 32, 32, "M", 64, 64, "M", 128, "M"),
                                                         image=size, classes=classes, hidden=256)),
    "resnet": lambda size, classes: ResNetish(BasicBlock, layers=(1, 1, 1), planes=(16, 32, 64), stem=16,
                                              classes=classes),
    "vit": lambda size, classes: TinyViT(size, classes),
    "convnext": lambda size, classes: TinyConvNeXt(classes),
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


def fit(model: nn.Module, x: torch.Tensor, batch_loss, report, epochs: int, seed: int, batch: int,
        lr: float) -> nn.Module:
    """Adam with a one-cycle schedule over ``epochs`` seeded passes of ``x``, each batch flipped
    horizontally at random (items keep their class, canvases their rotation); ``batch_loss(images,
    index)`` is the loss of a batch, ``report(model)`` what each epoch prints after the loss."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=epochs * -(-len(x) // batch))

    def flipped_loss(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = x[index]
        flip = torch.rand(len(index), generator=generator) < 0.5
        return batch_loss(torch.where(flip[:, None, None, None], images.flip(-1), images), index)

    def print_epoch(epoch: int, loss: float, seconds: float) -> None:
        print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, {report(model)} ({seconds:.0f} s)", flush=True)

    return run_epochs(model, optimiser, schedule, len(x), flipped_loss, print_epoch, epochs, seed, batch)


def run_epochs(model: nn.Module, optimiser, schedule, count: int, batch_loss, after_epoch, epochs: int, seed: int,
               batch: int) -> nn.Module:
    """``epochs`` seeded passes over ``count`` samples in shuffled batches (also the text benchmark's
    BERT): ``batch_loss(index, generator)`` is a batch's loss, ``after_epoch(epoch, mean loss,
    seconds)`` runs after each pass, the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        began, total = time.perf_counter(), 0.0
        for index in torch.randperm(count, generator=generator).split(batch):
            loss = batch_loss(index, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        model.eval()
        after_epoch(epoch, total / count, time.perf_counter() - began)
    return model.eval()


#: Training epochs: the README's benchmark, and ``--quick``'s first look.
EPOCHS, QUICK_EPOCHS = 12, 2


def train(data: pathlib.Path, arch: str, epochs: int, seed: int, batch: int = 64, lr: float = 2e-3) -> nn.Module:
    torch.manual_seed(seed)
    classes = len((data / "train" / "classes.txt").read_text().split("\n")) - 1
    x, y = load_split(data / "train", classes)
    model = ARCHITECTURES[arch](x.shape[-1], classes)
    loss_fn = nn.BCEWithLogitsLoss()
    return fit(model, x, lambda images, index: loss_fn(model(images), y[index]),
               lambda model: f"train top-1 {top1_accuracy(model, x[:1000], y[:1000]):.1%}", epochs, seed, batch, lr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=pathlib.Path, help="the folder make_benchmark.py wrote (with train/ and test/)")
    parser.add_argument("--arch", choices=sorted([*ARCHITECTURES, "bert"]), required=True)
    parser.add_argument("--epochs", type=int, help=f"default {EPOCHS}; --quick {QUICK_EPOCHS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads (default: all); on a busy machine one thread is often faster")
    parser.add_argument("-o", "--output", type=pathlib.Path, help="default: DATA/ARCH.onnx (--quick: DATA/ARCH_quick.onnx)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs, the model named ARCH_quick.onnx and marked quick in its metadata: "
                             "with make_benchmark.py --quick, a first table in about a minute (not the README's)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else QUICK_EPOCHS if args.quick else EPOCHS
    if args.arch == "bert":
        from tools import text_benchmark

        return text_benchmark.train_main(args.data, args.output, args.epochs, args.seed, args.threads)
    torch.set_num_threads(max(1, args.threads))
    began = time.perf_counter()
    model = train(args.data, args.arch, epochs, args.seed)
    classes = len((args.data / "train" / "classes.txt").read_text().split("\n")) - 1
    x, y = load_split(args.data / "test", classes)
    output = args.output or args.data / f"{args.arch}{'_quick' if args.quick else ''}.onnx"
    exported = export(model, x.shape[-1])
    training = len((args.data / "train" / "labels.csv").read_text().splitlines()) - 1
    preset = f"quick preset: {training} training canvases, {epochs} epochs (a first look, not the README's table)" \
        if args.quick else f"{training} training canvases, {epochs} epochs"
    onnx.helper.set_model_props(exported, {"agf_onnx.benchmark": preset})
    onnx.save(exported, output)
    print(f"{output}: test top-1 {top1_accuracy(model, x, y):.1%} on {len(x)} canvases, "
          f"trained in {time.perf_counter() - began:.0f} s ({preset})")


if __name__ == "__main__":
    main()
