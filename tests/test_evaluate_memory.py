"""evaluate's memory bound: the forward activations one image costs a compiled model (original path
and its clones, counted by hand here) and the number of images per session run sized from them."""

from __future__ import annotations

import numpy as np
import pytest

import agf_onnx
from agf_onnx import evaluate
from agf_onnx.evaluate import PEAK_PER_FORWARD_BYTE, forward_bytes_per_image, images_per_run
from agf_onnx.explain import Explainer

from .test_bad_inputs import small_classifier

#: small_classifier's tensors for one 8×8 image, float32: Conv and Relu [4, 8, 8], pool [4, 1, 1],
#: flatten [4], logits [5]
ONE_PATH = (256 + 256 + 4 + 4 + 5) * 4
#: what a clone keeps: the gradient reads the Conv and Relu outputs; the pool, flatten and logits of a
#: clone are linear in what feeds them, nothing reads their values, and the compiler drops them
ONE_CLONE = (256 + 256) * 4


@pytest.mark.parametrize("method, options, copies", [
    ("agf", {}, 0),
    ("integrated-gradients", {"steps": 10}, 10),   # the original path and one clone per step
    ("smoothgrad", {"samples": 7}, 7),
])
def test_forward_bytes_count_the_path_and_its_replicas(method, options, copies):
    compiled = agf_onnx.compile(small_classifier(), method=method, options=options)
    assert forward_bytes_per_image(compiled) == ONE_PATH + copies * ONE_CLONE


def test_top_k_copies_count_too():
    assert forward_bytes_per_image(agf_onnx.compile(small_classifier(), top_k=3)) == (1 + 3) * ONE_PATH


@pytest.mark.parametrize("budget_in_images, batch_size, expected", [
    (5, 16, 5),      # the budget binds
    (5.9, 16, 5),    # rounded down
    (40, 16, 16),    # the batch size binds
    (0.2, 16, 1),    # never fewer than one image
])
def test_images_per_run_follow_the_budget(budget_in_images, batch_size, expected):
    compiled = agf_onnx.compile(small_classifier(), method="integrated-gradients", options={"steps": 10})
    per_image = PEAK_PER_FORWARD_BYTE * (ONE_PATH + 10 * ONE_CLONE)
    assert images_per_run(compiled, batch_size, budget=int(budget_in_images * per_image)) == expected


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
    block for each, so evaluate's explainers turn it off (and plain explainers keep the default)."""
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
    seen.clear()
    Explainer(agf_onnx.compile(small_classifier()), "cpu", preset="unit")
    assert seen == [True]
