"""Run compiled models in ONNX Runtime on the CPU (what CI has)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(3)  # the overridable 'target' initializer draws a warning per session


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # no fusions: ONNX Runtime fuses Conv+BN only where the conv has one reader
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict, outputs=None, optimize: bool = True) -> dict:
    """Run ``model`` on ``feeds`` (numpy arrays); returns {output name: array}."""
    sess = session(model, optimize)
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {k: np.asarray(v) for k, v in feeds.items()})))
