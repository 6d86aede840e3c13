"""A picture of the built-in benchmark: test canvases with two items, their class-coded masks, and
one method's map for each of the two classes (class sensitivity at a glance).

    python tools/benchmark_figure.py tools/out/bench/vgg.onnx tools/out/bench/test \\
        [--method agf] [--count 6] [--out docs/benchmark_vgg_agf.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from agf_onnx.evaluate import load_dataset  # noqa: E402
from agf_onnx.runtime.explain import Explainer, blend  # noqa: E402
from agf_onnx.runtime.plots import PALETTE  # noqa: E402


def _mask_picture(mask: np.ndarray) -> np.ndarray:
    """Background black, class k in the k-th plot colour (black itself left out)."""
    colours = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in PALETTE if c != "#000000"]
    return np.array([(0, 0, 0)] + colours, np.uint8)[np.minimum(mask, len(colours))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--method", default="agf")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--scale", type=int, default=2, help="pixel magnification")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmark.png"))
    args = parser.parse_args()
    names = open(os.path.join(args.data, "classes.txt")).read().split("\n")
    samples = [s for s in load_dataset(args.data) if len(s.labels) >= 2][:args.count]
    explainer = Explainer(agf_onnx.compile(args.model, method=args.method), "cpu", preset="symmetric")
    photos = explainer.prepare([s.image for s in samples])
    rows, font = [], ImageFont.load_default()
    for sample, photo in zip(samples, photos):
        mask = np.asarray(Image.open(sample.mask))
        first, second = sample.label, sorted(sample.labels - {sample.label})[0]
        tiles = [photo, _mask_picture(mask)]
        captions = ["canvas", "mask"]
        for cls in (first, second):
            explanation = explainer.explain_photos(photo[None], target=cls)
            tiles.append(blend(photo, explanation.heatmaps[0, 0]))
            captions.append(f"{args.method}: {names[cls]}")
        row = []
        for tile, caption in zip(tiles, captions):
            picture = Image.fromarray(tile).resize((tile.shape[1] * args.scale, tile.shape[0] * args.scale),
                                                   Image.NEAREST)
            framed = Image.new("RGB", (picture.width + 6, picture.height + 16), "white")
            framed.paste(picture, (3, 14))
            ImageDraw.Draw(framed).text((3, 1), caption, fill="black", font=font)
            row.append(np.asarray(framed))
        rows.append(np.concatenate(row + [np.full((row[0].shape[0], 12, 3), 255, np.uint8)], 1))
    columns = 3
    rows += [np.full_like(rows[0], 255)] * (-len(rows) % columns)
    grid = [np.concatenate(rows[i:i + columns], 1) for i in range(0, len(rows), columns)]
    Image.fromarray(np.concatenate(grid, 0)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
