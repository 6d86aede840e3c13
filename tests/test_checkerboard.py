"""AGF's checkerboard on strided convs (docs/algorithm.md, "The checkerboard on strided convs"):
the pattern is the method's own (the transposed-conv VJP of a stride-2 conv), present alike in the
compiled graph and in the float64 oracle of the authors' rules."""

from __future__ import annotations

import numpy as np
import torch

import agf_onnx

from . import models, oracle
from .runtime import run


def parity_means(maps: np.ndarray) -> np.ndarray:
    """Mean |map| over each pixel parity (i mod 2, j mod 2), relative to the mean over all: ``[N, 2, 2]``."""
    magnitude = np.abs(maps)
    phases = np.stack([np.stack([magnitude[:, i::2, j::2].mean((1, 2)) for j in range(2)], 1) for i in range(2)], 1)
    return phases / magnitude.mean((1, 2))[:, None, None]


def test_the_checkerboard_of_a_stride_2_stem_is_the_oracles_too():
    net = models.seeded(models.ResNetish(stem_kernel=7), seed=0)  # 7×7 stride-2 stem conv
    assert net.conv1.stride == (2, 2)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = run(agf_onnx.compile(models.export(net, 32)), {"x": x.numpy(), "target": np.full(4, -1)})
    ours = parity_means(compiled["heatmap"][:, 0])
    theirs = parity_means(oracle.explain(net, x).numpy()[:, 0])
    spread = ours.reshape(4, -1).max(1) / ours.reshape(4, -1).min(1)
    assert (spread > 1.2).all(), f"no checkerboard: parity means spread by {spread}"
    assert len({int(np.argmax(image)) for image in ours}) == 1, "the same parity leads on every image: systematic"
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
