"""SmoothGrad's noise is a pure function of (seed, copy, element): the same seed and image give the
same map in every session, at every batch position, alone or among other images; the noise itself
is standard normal and uncorrelated (checked statistically)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import agf_onnx
from agf_onnx.compiler.methods import counter_normal

from . import models
from .runtime import run, session

PRIME = 2**31 - 1
ROUND_CONSTANTS = (0x3C6EF372, 0x1B873593, 0x5BD1E995, 0x27D4EB2D)


def mimc(x: int) -> int:
    """The hash of the definition, in Python integers (no int64 overflow to hide)."""
    x %= PRIME
    for constant in ROUND_CONSTANTS:
        x = pow((x + constant) % PRIME, 5, PRIME)
    return x


def normal_at(index: int, seed: int) -> float:
    """Element ``index`` of the noise by the definition: Box–Muller on two hashed counters."""
    key = mimc(seed)
    u = [((mimc(mimc(2 * index + j) + key) >> 7) + 0.5) / 2**24 for j in (0, 1)]
    return float(np.sqrt(-2 * np.log(u[0])) * np.cos(2 * np.pi * u[1]))


def test_noise_follows_its_definition():
    noise = counter_normal((4, 1, 3, 5, 7), seed=11).ravel()
    for index in (0, 1, 2, 57, 419):
        assert noise[index] == pytest.approx(normal_at(index, 11), abs=1e-12)


def test_noise_is_standard_normal_and_uncorrelated():
    shape = (25, 1, 3, 64, 64)
    noise = counter_normal(shape, seed=0)
    flat = noise.ravel()
    bound = 5 / np.sqrt(flat.size)  # five standard errors of a mean or a correlation
    assert abs(flat.mean()) < bound and abs(flat.std() - 1) < 5 * np.sqrt(0.5 / flat.size)
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(flat)) < 5 * np.sqrt(24 / flat.size)
    neighbours = [(flat[:-1], flat[1:]),                                  # next element
                  (noise[:, :, :, :-1].ravel(), noise[:, :, :, 1:].ravel()),  # next row
                  (noise[:-1].ravel(), noise[1:].ravel()),                # next copy
                  (flat, counter_normal(shape, seed=1).ravel())]          # next seed
    for a, b in neighbours:
        assert abs(np.corrcoef(a, b)[0, 1]) < bound


def test_more_copies_keep_the_first_ones():
    np.testing.assert_array_equal(counter_normal((3, 1, 2, 4, 4), 5), counter_normal((6, 1, 2, 4, 4), 5)[:3])


def test_smoothgrad_map_is_the_same_in_every_session_position_and_batch():
    net = models.seeded(models.VGGish(), seed=41)
    compiled = agf_onnx.compile(models.export(net), method="smoothgrad", options={"samples": 6, "seed": 3})
    rng = np.random.default_rng(0)
    image, others = rng.standard_normal((1, 3, 32, 32), np.float32), rng.standard_normal((3, 3, 32, 32), np.float32)
    target = np.array([2])
    alone = run(compiled, {"x": image, "target": target})["heatmap"][0]
    again = session(compiled).run(["heatmap"], {"x": image, "target": target})[0][0]  # a second session
    np.testing.assert_array_equal(alone, again)
    for position in (0, 2, 3):
        batch = np.insert(others, position, image[0], axis=0)
        targets = np.insert(np.array([0, 1, 4]), position, 2)
        in_batch = run(compiled, {"x": batch, "target": targets})["heatmap"][position]
        np.testing.assert_allclose(in_batch, alone, atol=1e-6)  # measured: equal to the last bit on the CPU
