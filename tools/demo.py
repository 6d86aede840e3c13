"""End-to-end demo: export a classifier from ``torch.nn``, compile it with ``agf-onnx compile``,
run the compiled model in ONNX Runtime, and save the heatmap (``.npy`` and a red/blue PNG).

    python tools/demo.py [--out tools/out]

The network is the test suite's ResNet-style classifier with seeded weights, so the map shows
the pipeline working, not what a trained model looks at.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from agf_onnx.cli import main as agf_onnx_cli  # noqa: E402
from tests import models  # noqa: E402


def diverging(heatmap: np.ndarray) -> np.ndarray:
    """Signed map in [-1, 1] → RGB: blue (against) – white (0) – red (for)."""
    value = np.clip(heatmap, -1, 1)[..., None]
    white, red, blue = np.ones(3), np.array([0.8, 0.0, 0.0]), np.array([0.0, 0.2, 0.8])
    rgb = np.where(value >= 0, white + value * (red - white), white - value * (blue - white))
    return (rgb * 255).round().astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source, compiled = os.path.join(args.out, "resnet.onnx"), os.path.join(args.out, "resnet_agf.onnx")
    onnx.save(models.export(models.seeded(models.ResNetish(), image=64), 64, softmax=True), source)
    if agf_onnx_cli(["compile", source, "-o", compiled]) != 0:
        raise SystemExit(1)

    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(compiled, providers=["CPUExecutionProvider"])
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    image = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy])[None].astype(np.float32)
    probabilities, heatmap = session.run(["y", "heatmap"], {"x": image})
    print(f"top class {probabilities[0].argmax()} (p = {probabilities[0].max():.3f}); heatmap {heatmap.shape}, "
          f"range [{heatmap.min():.3f}, {heatmap.max():.3f}]")
    np.save(os.path.join(args.out, "heatmap.npy"), heatmap)
    picture = np.repeat(np.repeat(diverging(heatmap[0, 0]), 4, 0), 4, 1)
    write_png(os.path.join(args.out, "heatmap.png"), picture)
    print(f"wrote {args.out}/heatmap.npy and {args.out}/heatmap.png")


if __name__ == "__main__":
    main()
