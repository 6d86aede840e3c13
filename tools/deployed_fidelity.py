"""Heatmaps of deployed forms against the same network in float32 (docs/deployed-formats.md).

For each net of ``tests/deployed_forms.py`` and each fp16/int8 form, the Pearson r between the
form's heatmap and the float32 export's, per image, over a batch of random images; both explain
the float32 network's top class (so that a class flip of the quantised model does not count as
a different map; Grad-CAM at the same layer, which the quantisers' node order could change).
Also the largest difference of the logits, relative to their largest magnitude.

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


def default_layer(model) -> str:
    """The node whose output Grad-CAM explains by default in ``model``."""
    from agf_onnx import modelfile
    from agf_onnx.compiler import passes
    from agf_onnx.compiler.methods import get_method
    from agf_onnx.compiler.planning import plan

    found = plan(passes.canonicalise(modelfile.load(model)), method=get_method("gradcam"))
    return found.graph.producer[found.layer].name


def same_layer(model, name: str) -> str:
    """The node of ``model``'s view that computes what the float32 node ``name`` computes (the
    quantisers keep the name, or append ``_quant``)."""
    from agf_onnx import modelfile
    from agf_onnx.compiler import deployed

    view = deployed.explained_view(modelfile.load(model)).model if deployed.needs_view(model) else model
    return next(node.name for node in view.graph.node if node.name in (name, f"{name}_quant"))


def heatmaps(model, method: str, images: np.ndarray, target: np.ndarray,
             layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(heatmap, scores as float32) of ``model`` compiled with ``method`` (Grad-CAM at ``layer``)."""
    compiled = agf_onnx.compile(model, method=method, layer=layer)
    feeds = deployed_forms.feeds(model, len(images))
    feeds[model.graph.input[0].name] = images.astype(feeds[model.graph.input[0].name].dtype)
    outputs = run(compiled, {**feeds, "target": target})
    return outputs["heatmap"], outputs[model.graph.output[0].name].astype(np.float32)


def correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per image; NaN where either map is constant (Grad-CAM's all-zero maps)."""
    return np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] if a.std() and b.std() else np.nan
                     for a, b in zip(first, second)])


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
            layer = default_layer(reference) if method == "gradcam" else None
            expected, _ = heatmaps(reference, method, images, target, layer)
            cells = []
            for key in FORMS:
                form = deployed_forms.build(key, name)
                got, logits = heatmaps(form, method, images, target, layer and same_layer(form, layer))
                r = correlations(expected, got)
                drift = np.abs(logits - scores).max() / np.abs(scores).max()
                constant = f"; {np.isnan(r).sum()} constant" if np.isnan(r).any() else ""
                cells.append(f"{np.nanmedian(r):.4f} (min {np.nanmin(r):.3f}{constant}; logits {drift:.1%})"
                             if not np.isnan(r).all() else f"— (constant maps; logits {drift:.1%})")
            print(f"| {name} | {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
