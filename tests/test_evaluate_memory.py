"""evaluate's memory bound: chunked runs give the maps of one run, and the sessions keep no arena
block per chunk size. How many images a run takes is sized from each model's measured cost
(``agf_onnx.runtime.budget``, ``tests/test_memory.py``)."""

from __future__ import annotations

import numpy as np

import agf_onnx
from agf_onnx import evaluate
from agf_onnx.runtime.explain import Explainer

from .test_bad_inputs import small_classifier


def test_chunked_runs_give_the_maps_of_one_run():
    compiled = agf_onnx.compile(small_classifier(), method="integrated-gradients", options={"steps": 4})
    explainer = Explainer(compiled, "cpu", preset="unit")
    photos = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    targets = np.array([0, 3, 1, 4, 2])
    whole = evaluate.Evaluation._heatmaps(explainer, photos, targets, per_run=5)
    np.testing.assert_allclose(evaluate.Evaluation._heatmaps(explainer, photos, targets, per_run=2), whole,
                               rtol=1e-6, atol=1e-7)
    assert whole.shape == (5, 8, 8) and np.isfinite(whole).all()


def test_evaluate_sessions_keep_no_arena_block_per_batch_size(tmp_path, monkeypatch):
    """Chunks of several sizes run through one session: ONNX Runtime's memory pattern would keep a
    block for each, so explainers turn it off unless asked."""
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def recording(model, options=None, **kwargs):
        seen.append(options.enable_mem_pattern if options is not None else None)
        return real(model, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    path = tmp_path / "small.onnx"
    import onnx

    onnx.save(small_classifier(), path)
    evaluation = evaluate.Evaluation(str(path), ["gradient"], provider="cpu", preset="unit")
    seen.clear()
    evaluation.explainer("gradient")
    assert seen and not any(seen)
    seen.clear()  # nor do plain explainers: the memory budget's measured cost holds only without it
    Explainer(agf_onnx.compile(small_classifier()), "cpu", preset="unit")
    assert seen == [False]
    seen.clear()
    Explainer(agf_onnx.compile(small_classifier()), "cpu", preset="unit", memory_pattern=True)
    assert seen == [True]
