"""A self-supervised model to explain with the paper's Algorithm 2: a RotNet-style network trained,
seeded on the CPU, to predict the rotation (0°, 90°, 180°, 270°) of the built-in benchmark's
canvases, without their class labels.

    python tools/make_benchmark.py tools/out/rotbench --train 2000 --test 200
    python tools/train_rotnet.py train tools/out/rotbench            # → rotnet.onnx, bank.npy, rotated/ (3 epochs)
    agf-onnx evaluate tools/out/rotbench/rotnet.onnx tools/out/rotbench/rotated --preset symmetric \\
        --ssl-bank tools/out/rotbench/bank.npy --ssl-mode diff --methods agf,gradcam,gradient,lrp -o …
    python tools/train_rotnet.py table EVAL_DIFF EVAL_SUM EVAL_NONE  # the README's Table 4 shape
    python tools/train_rotnet.py figure tools/out/rotbench --out docs/ssl_rotnet.png

``train`` trains a small VGG-style network (a stride-2 stem and three conv/BatchNorm/ReLU/max-pool
stages, a 128-wide embedding layer and a linear layer giving the four rotation logits) with Adam on every training
canvas in all four rotations (RotNet's recipe: the label of a rotated image is its rotation; a
horizontal flip before rotating keeps it), exports it to ONNX (input ``x`` in [-1, 1], ``--preset
symmetric``), writes the bank ``bank.npy``: the features (the input of the last linear layer,
``agf-onnx bank``'s default) of ``--bank`` upright training canvases, and ``rotated/``: the test
canvases, canvas i turned by (i mod 4)·90° counter-clockwise, labelled with that rotation, with
their object masks turned the same way (binary, 255 = an item). Same arguments, torch version and
CPU thread count, same weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys
import time

import numpy as np
import onnx
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from tests.models import export  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_benchmark import fit  # noqa: E402 - the same seeded training loop

ROTATIONS = ("0°", "90°", "180°", "270°")


class RotNet(nn.Module):
    """A stride-2 conv/BatchNorm/ReLU stem (16 channels), three conv/BatchNorm/ReLU/max-pool stages (32,
    64, 64 channels), then a two-layer head: flattened map → 128 features (ReLU) → the four rotation
    logits."""

    def __init__(self, size: int, widths: tuple[int, ...] = (16, 32, 64, 64), hidden: int = 128) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        channels = widths[0]
        for width in widths[1:]:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Sequential(nn.Linear(channels * (size // 2 ** len(widths)) ** 2, hidden), nn.ReLU())
        self.rotation = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.embedding(torch.flatten(self.features(x), 1)))


def load_canvases(folder: pathlib.Path, limit: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The canvases of one split ``[N, 3, S, S]`` in [-1, 1] and their ``labels.csv`` rows."""
    with open(folder / "labels.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))[:limit]
    images = np.stack([np.asarray(Image.open(folder / row["file"]).convert("RGB")) for row in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, rows


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in all four rotations (counter-clockwise, as ``np.rot90``) and the rotation labels."""
    turned = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return turned, torch.arange(4).repeat_interleave(len(images))


def accuracy(model: nn.Module, images: torch.Tensor) -> float:
    x, y = rotations(images)
    with torch.no_grad():
        top = torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)]).argmax(1)
    return float((top == y).float().mean())


def train(data: pathlib.Path, epochs: int, seed: int, limit: int | None, batch: int = 16,
          lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    x, _ = load_canvases(data / "train", limit)
    model = RotNet(x.shape[-1])
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        images, labels = rotations(images)
        return loss_fn(model(images), labels)

    return fit(model, x, batch_loss, lambda model: f"train rotation accuracy {accuracy(model, x[:250]):.1%}", epochs,
               seed, batch, lr)


def write_rotated(data: pathlib.Path) -> pathlib.Path:
    """``rotated/``: test canvas i turned by (i mod 4)·90°, label = the rotation, its mask turned too."""
    out = data / "rotated"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    with open(data / "test" / "labels.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    written = []
    for i, row in enumerate(rows):
        turns = i % 4
        image = np.rot90(np.asarray(Image.open(data / "test" / row["file"]).convert("RGB")), turns)
        mask = np.rot90(np.asarray(Image.open(data / "test" / row["mask"])) > 0, turns)
        name = pathlib.Path(row["file"]).name
        Image.fromarray(np.ascontiguousarray(image)).save(out / "images" / name)
        Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8) * 255)).save(out / "masks" / name)
        written.append({"file": f"images/{name}", "label": turns, "mask": f"masks/{name}"})
    with open(out / "labels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["file", "label", "mask"])
        writer.writeheader()
        writer.writerows(written)
    (out / "classes.txt").write_text("\n".join(ROTATIONS) + "\n")
    return out


def command_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    began = time.perf_counter()
    model = train(args.data, args.epochs, args.seed, args.train)
    trained = time.perf_counter() - began
    x, _ = load_canvases(args.data / "test")
    output = args.data / "rotnet.onnx"
    onnx.save(export(model, x.shape[-1]), output)
    print(f"{output}: test rotation accuracy {accuracy(model, x):.1%} on {len(x)} canvases × 4 rotations, "
          f"trained in {trained:.0f} s")
    rotated = write_rotated(args.data)
    print(f"{rotated}: {len(x)} rotated test canvases with labels.csv (label = rotation) and rotated masks")
    with open(args.data / "train" / "labels.csv", newline="") as stream:
        files = [args.data / "train" / row["file"] for row in list(csv.DictReader(stream))[:args.bank]]
    began = time.perf_counter()
    bank = agf_onnx.bank(output, files, output=args.data / "bank.npy", preset="symmetric")
    print(f"{args.data / 'bank.npy'}: float32 {list(bank.shape)} from {len(files)} upright training canvases "
          f"({time.perf_counter() - began:.1f} s; `agf-onnx bank {output} … --preset symmetric` writes the same)")


# -- the README's table and figure --------------------------------------------------------------

_ROWS = [("diff", "agf", "AGF-SSL Δ: head(L_I − L_N) (Algorithm 2)"),
         ("sum", "agf", "AGF-SSL Σ: head(L_I + L_N)"),
         ("none", "agf", "AGF, no neighbour: head(L_I)"),
         ("diff", "gradcam", "Grad-CAM, same t (Δ)"),
         ("diff", "gradient", "gradient, same t (Δ)"),
         ("diff", "lrp", "LRP, same t (Δ)")]


def command_table(args: argparse.Namespace) -> None:
    """One Markdown table from ``evaluate`` runs of the three modes (results.json each)."""
    runs = {}
    for folder in args.results:
        results = json.loads((pathlib.Path(folder) / "results.json").read_text())
        runs[results["settings"]["ssl_mode"]] = results
    lines = ["| explanation | t = rotation | negative AUC, t ↑ | negative AUC, rotation ↑ | positive AUC, t ↓ | "
             "positive AUC, rotation ↓ | pixel accuracy ↑ | mAP ↑ |", "|---|" + "---:|" * 7]
    for mode, method, title in _ROWS:
        entry = runs.get(mode, {}).get("methods", {}).get(method)
        if entry is None:
            continue
        p, s = entry["perturbation"], entry.get("segmentation", {})
        cells = [entry["ssl"]["target_is_label"], p["negative"]["predicted"]["auc"], p["negative"]["target"]["auc"],
                 p["positive"]["predicted"]["auc"], p["positive"]["target"]["auc"], s.get("pixel_accuracy"),
                 s.get("mAP")]
        lines.append(f"| {title} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    first = next(iter(runs.values()))
    print("\n".join(lines))
    print(f"\n{first['images']} rotated test canvases; rotation accuracy of the network before perturbation "
          f"{first['clean_accuracy']:.1f} %")


def command_figure(args: argparse.Namespace) -> None:
    """Rotated test canvases, their rotation, t and the neighbour, and the maps of AGF-SSL (Δ), AGF
    without a neighbour and Grad-CAM on the same t (the default font has no Δ: "diff")."""
    from agf_onnx.evaluate import load_dataset
    from agf_onnx.runtime.explain import Explainer, blend

    model, bank = args.data / "rotnet.onnx", np.load(args.data / "bank.npy")
    samples = load_dataset(args.data / "rotated")[args.first:args.first + args.count]
    columns = [("AGF-SSL diff", {"ssl_mode": "diff"}), ("AGF, no L_N", {"ssl_mode": "none"}),
               ("Grad-CAM, t", {"ssl_mode": "diff", "method": "gradcam"})]
    explainers = [Explainer(agf_onnx.compile(model, ssl_bank=bank, **options), "cpu", preset="symmetric")
                  for _, options in columns]
    photos = explainers[0].prepare([s.image for s in samples])
    font = ImageFont.load_default()
    explanations = [e.explain_photos(photos) for e in explainers]
    tiles = []
    for n, sample in enumerate(samples):
        t, neighbour = int(explanations[0].ssl_targets[n]), int(explanations[0].ssl_neighbours[n])
        column = [(photos[n], f"turned {ROTATIONS[sample.label]}")]
        column += [(blend(photos[n], e.heatmaps[n, 0]), f"{title}" + (f": t {ROTATIONS[t]}" if i == 0 else
                                                                        f": {ROTATIONS[int(e.targets[n, 0])]}"))
                   for i, ((title, _), e) in enumerate(zip(columns, explanations))]
        pictures = []
        for tile, caption in column:
            picture = Image.fromarray(tile).resize((tile.shape[1] * args.scale, tile.shape[0] * args.scale),
                                                   Image.NEAREST)
            framed = Image.new("RGB", (max(picture.width, 6 * len(caption)) + 8, picture.height + 16), "white")
            framed.paste(picture, (4, 14))
            ImageDraw.Draw(framed).text((4, 1), caption, fill="black", font=font)
            pictures.append(framed)
        width = max(p.width for p in pictures)
        stacked = Image.new("RGB", (width, sum(p.height for p in pictures) + 12), "white")
        top = 0
        for picture in pictures:
            stacked.paste(picture, (0, top))
            top += picture.height
        ImageDraw.Draw(stacked).text((4, top), f"L_N: bank row {neighbour}", fill="black", font=font)
        tiles.append(np.asarray(stacked))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, 1)).save(args.out)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_ = commands.add_parser("train", help="train, export, write rotated/ and bank.npy")
    train_.add_argument("data", type=pathlib.Path, help="the folder make_benchmark.py wrote (with train/ and test/)")
    train_.add_argument("--epochs", type=int, default=3)
    train_.add_argument("--train", type=int, help="only the first N training canvases (default: all)")
    train_.add_argument("--bank", type=int, default=500, help="upright training canvases in the bank (500)")
    train_.add_argument("--seed", type=int, default=0)
    table = commands.add_parser("table", help="the Table 4 shape from evaluate runs of diff, sum and none")
    table.add_argument("results", nargs="+", help="evaluate output folders (results.json inside)")
    figure = commands.add_parser("figure", help="rotated canvases, t and the maps")
    figure.add_argument("data", type=pathlib.Path)
    figure.add_argument("--out", default="docs/ssl_rotnet.png")
    figure.add_argument("--first", type=int, default=0, help="the first rotated canvas shown")
    figure.add_argument("--count", type=int, default=8)
    figure.add_argument("--scale", type=int, default=2, help="pixel magnification")
    args = parser.parse_args(argv)
    {"train": command_train, "table": command_table, "figure": command_figure}[args.command](args)


if __name__ == "__main__":
    main()
