"""Generate the built-in multi-object benchmark for ``agf-onnx evaluate``, deterministically.

Each canvas holds one to three items of different classes, each tinted with its own colour, at
random non-overlapping positions on a textured background. The items come from Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``: ten clothing
classes) or, where it is absent, from the handwritten digits that scikit-learn bundles (ten
digit classes, upscaled from 8×8). Every canvas has a pixel mask (0: background, k + 1: an item
of class k) drawn from the same pixels the item paints, and multi-label targets.

    python tools/make_benchmark.py OUT [--train 6000] [--test 500] [--size 64] [--seed 0]
                                       [--source auto|fashion|digits] [--quick]

``--quick`` (600 training and 50 test canvases) with ``train_benchmark.py --quick`` gives a first
table in about a minute (on two idle cores; 3 minutes measured on the project's shared 2-core
machine at load 15): the pipeline end to end and the table's shape, not the README's numbers. Its
models are named ``ARCH_quick.onnx`` (so is every table made from them) and marked in their
metadata; in that time the networks learn little (test top-1 about 20 % on the digits source,
where the README's models reach far more), so the methods' scores are close together.

writes ``OUT/train`` and ``OUT/test``, each with ``images/*.png``, ``masks/*.png``,
``labels.csv`` (``file,label,labels,mask``: ``label`` is the class of the largest item,
``labels`` all classes present, space-separated) and ``classes.txt``. The test split draws its
items from the source's own test set. Same arguments, same files.

``--text``: the text benchmark instead (``tools/text_benchmark.py``: sequences of dictionary words
whose label is decided by planted cue words; ``OUT/train.csv``, ``OUT/test.csv``,
``OUT/tokenizer.json``; ``--train``, ``--test``, ``--seed`` apply).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import pathlib
import sys

import numpy as np
from PIL import Image

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]
#: An item's pixels: where its intensity exceeds this share of its maximum.
MASK_THRESHOLD = 0.25


def _read_idx(path: pathlib.Path) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_items(split: str, source: str = "auto") -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Item images ``[M, h, w]`` in [0, 1], their classes ``[M]``, the class names and the source used."""
    if source not in ("auto", "fashion", "digits"):
        raise ValueError(f"--source {source}: expected auto, fashion or digits")
    if source in ("auto", "fashion") and (FASHION / "train-images-idx3-ubyte.gz").exists():
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        labels = _read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return images, labels, FASHION_CLASSES, "fashion-mnist"
    if source == "fashion":
        raise FileNotFoundError(f"{FASHION}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    from sklearn.datasets import load_digits

    digits = load_digits()
    # a fixed split of the 1797 digits: every fifth one is kept for the test canvases
    chosen = np.arange(len(digits.target)) % 5 == 0 if split != "train" else np.arange(len(digits.target)) % 5 != 0
    upscaled = np.stack([np.asarray(Image.fromarray((image / 16.0 * 255).astype(np.uint8)).resize((24, 24),
                                                                                                 Image.BILINEAR))
                         for image in digits.images[chosen]]).astype(np.float32) / 255.0
    return upscaled, digits.target[chosen].astype(np.int64), DIGIT_CLASSES, "scikit-learn digits"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour field with faint stripes: texture that is not evidence for any class."""
    coarse = rng.uniform(0.15, 0.55, (4, 4, 3))
    field = np.stack([np.asarray(Image.fromarray((coarse[..., c] * 255).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC), np.float32) / 255.0 for c in range(3)], -1)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    y, x = np.mgrid[:size, :size]
    stripes = 0.06 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    return np.clip(field + stripes[..., None], 0, 1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright colour (HSV with S, V ≥ 0.6), so items stand out from the background."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.85, 1.0)
    rgb = np.asarray(Image.new("HSV", (1, 1), tuple(int(v * 255) for v in (hue, saturation, value))).convert("RGB"),
                     np.float32)[0, 0] / 255.0
    return rgb


def make_canvas(rng: np.random.Generator, items: np.ndarray, classes: np.ndarray, size: int = 64,
                by_class: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One canvas: RGB uint8 ``[size, size, 3]``, mask uint8 (0 background, k + 1 for class k) and the
    classes placed, largest item first."""
    by_class = by_class or {int(c): np.flatnonzero(classes == c) for c in np.unique(classes)}
    image = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    wanted = rng.choice(sorted(by_class), size=int(rng.integers(1, 4)), replace=False)
    boxes, placed = [], []
    for cls in wanted:
        item = items[rng.choice(by_class[int(cls)])]
        side = int(round(item.shape[0] * rng.uniform(0.8, 1.25)))
        side = min(side, size)
        item = np.asarray(Image.fromarray((item * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR),
                          np.float32) / 255.0
        for _ in range(50):  # a free spot: bounding boxes never overlap, so masks are disjoint
            top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if all(top + side <= t or t + s <= top or left + side <= l or l + s <= left for t, l, s in boxes):
                break
        else:
            continue
        peak = item.max()
        if peak <= 0:
            continue
        pixels = item > MASK_THRESHOLD * peak  # the item paints exactly the pixels of its mask
        region = (slice(top, top + side), slice(left, left + side))
        shade = _colour(rng) * (0.55 + 0.45 * item / peak)[..., None]  # the item's own texture, in its colour
        image[region] = np.where(pixels[..., None], shade, image[region])
        mask[region][pixels] = int(cls) + 1
        boxes.append((top, left, side))
        placed.append((int(pixels.sum()), int(cls)))
    order = [cls for _, cls in sorted(placed, key=lambda p: -p[0])]
    return (image * 255).round().astype(np.uint8), mask, order


def generate(out: pathlib.Path | str, count: int, seed: int = 0, size: int = 64, split: str = "test",
             source: str = "auto", quiet: bool = True) -> dict:
    """Write ``count`` canvases of one split to ``out``; returns a summary."""
    out = pathlib.Path(out)
    items, classes, names, used = load_items(split, source)
    by_class = {int(c): np.flatnonzero(classes == c) for c in np.unique(classes)}
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows, made = [], 0
    progress = None if quiet else _progress(count, split)
    while made < count:
        image, mask, placed = make_canvas(rng, items, classes, size, by_class)
        if not placed:
            continue
        name = f"{made:05d}.png"
        Image.fromarray(image).save(out / "images" / name)
        Image.fromarray(mask).save(out / "masks" / name)
        rows.append({"file": f"images/{name}", "label": placed[0], "labels": " ".join(map(str, placed)),
                     "mask": f"masks/{name}"})
        made += 1
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    with open(out / "labels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["file", "label", "labels", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return {"images": count, "source": used, "size": size, "seed": seed, "split": split,
            "multi_object": sum(1 for r in rows if " " in r["labels"])}


#: Canvases per split: the README's benchmark, and ``--quick``'s first look (a table in about a minute
#: with ``train_benchmark.py --quick``; its numbers are not the README's).
FULL = {"train": 6000, "test": 500}
QUICK = {"train": 600, "test": 50}


def _progress(total: int, split: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="canvas", desc=split, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--train", type=int, help=f"training canvases (default {FULL['train']}; --quick "
                                                     f"{QUICK['train']})")
    parser.add_argument("--test", type=int, help=f"test canvases (default {FULL['test']}; --quick {QUICK['test']})")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=["auto", "fashion", "digits"], default="auto")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small preset ({QUICK['train']} training, {QUICK['test']} test canvases) for a first "
                             "table in about a minute with train_benchmark.py --quick: not the README's numbers")
    parser.add_argument("--text", action="store_true",
                        help="the text benchmark (tools/text_benchmark.py): random dictionary words, planted cue words")
    args = parser.parse_args(argv)
    if args.text:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
        from tools import text_benchmark

        text_benchmark.main(["make", str(args.out), *(f"--{k}={v}" for k in ("train", "test", "seed")
                                                      if (v := getattr(args, k)) is not None)])
        return
    preset = QUICK if args.quick else FULL
    args.train = preset["train"] if args.train is None else args.train
    args.test = preset["test"] if args.test is None else args.test
    for split, count in (("train", args.train), ("test", args.test)):
        if count:
            summary = generate(args.out / split, count, args.seed, args.size, split, args.source, quiet=False)
            print(f"{args.out / split}: {summary['images']} canvases from {summary['source']}, "
                  f"{summary['multi_object']} with several items")


if __name__ == "__main__":
    main()
