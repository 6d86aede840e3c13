"""``agf-onnx bank``: the feature vectors of reference images for a self-supervised model (the
paper's Algorithm 2, ``ssl.py``), computed by running the model with its features tensor as an
extra output."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .bankfile import save_bank
from .compiler.ssl import features_model
from .runtime.explain import Explainer, ExplainError
from .runtime.report import progress_bar


def bank(model: onnx.ModelProto | str | os.PathLike, images: Sequence[Any], *, features: str | None = None,
         output: str | os.PathLike | None = None, batch_size: int = 16, provider: str = "auto",
         input_shapes: Mapping[str, Sequence[int | str]] | None = None, progress: bool = False,
         **preprocessing: Any) -> np.ndarray:
    """The feature vectors ``features(J)`` of reference images, flattened per image: float32 ``[B, D]``.

    Args:
        model: the original ONNX model (not a compiled one).
        images: paths, PIL images or ``[H, W, 3]`` arrays, prepared as ``agf_onnx.Explainer`` does.
        features: the tensor that feeds the head (default: the data input of the op that makes the logits).
        output: also write the bank to this ``.npy`` file (all at once: no half-written file).
        preprocessing: ``preset``, ``mean``, ``std``, ``size``, ``crop``, ``bgr`` as for ``Explainer``.
    """
    images = list(images)
    if not images:
        raise ExplainError("no reference images for the bank")
    if batch_size < 1:
        raise ExplainError(f"--batch-size {batch_size}: must be at least 1")
    augmented, features = features_model(model, features, input_shapes=input_shapes)
    runner = Explainer(augmented, provider, compile_original=False, batch_size=batch_size, **preprocessing)
    bar = progress_bar(len(images), "bank") if progress else None
    rows = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = runner.to_tensor(runner.prepare(chunk))
        values = runner.session.run([features], {runner.image_input: batch})[0]
        rows.append(np.asarray(values, np.float32).reshape(len(chunk), -1))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    result = np.concatenate(rows)
    if not np.isfinite(result).all():
        raise ExplainError(f"the features tensor '{features}' holds NaN or Inf for some images")
    if output is not None:
        save_bank(result, output)
    return result
