"""Heatmaps of deployed forms against the same network in float32 (docs/deployed-formats.md).

For each net of ``tests/deployed_forms.py`` and each fp16/int8 form, the Pearson r between the
form's heatmap and the float32 export's, per image, over a batch of random images; both explain
the float32 network's top class (so that a class flip of the quantised model does not count as
a different map). Also the largest difference of the logits, relative to their largest magnitude.

    python tools/deployed_fidelity.py [--images 8] [--methods agf,gradcam,lrp]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from tests import deployed_forms  # noqa: E402
from tests.runtime import run  # noqa: E402

FORMS = ("fp16-keep-io", "fp16", "int8-qdq", "int8-qoperator", "int8-dynamic")


def heatmaps(model, method: str, images: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heatmap, scores as float32) of ``model`` compiled with ``method``."""
    compiled = agf_onnx.compile(model, method=method)
    feeds = deployed_forms.feeds(model, len(images))
    feeds[model.graph.input[0].name] = images.astype(feeds[model.graph.input[0].name].dtype)
    outputs = run(compiled, {**feeds, "target": target})
    return outputs["heatmap"], outputs[model.graph.output[0].name].astype(np.float32)


def correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(first, second)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--methods", default="agf,gradcam,lrp,chefer")
    args = parser.parse_args()
    images = deployed_forms.images(args.images, seed=7)
    print("| net | method | " + " | ".join(FORMS) + " |")
    print("|---|---|" + "---|" * len(FORMS))
    for name in deployed_forms.NETS:
        reference = deployed_forms.fp32(name)
        scores = run(reference, {"x": images})["y"]
        target = scores.argmax(1)
        for method in args.methods.split(","):
            if method not in deployed_forms.methods_for(name):
                continue
            expected, _ = heatmaps(reference, method, images, target)
            cells = []
            for key in FORMS:
                got, logits = heatmaps(deployed_forms.build(key, name), method, images, target)
                r = correlations(expected, got)
                drift = np.abs(logits - scores).max() / np.abs(scores).max()
                cells.append(f"{np.median(r):.4f} (min {r.min():.3f}; logits {drift:.1%})")
            print(f"| {name} | {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
