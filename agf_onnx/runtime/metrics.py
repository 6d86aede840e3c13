"""The paper's evaluation metrics as plain NumPy (spec "How the paper evaluates"), independent of
how the heatmaps were made.

- Perturbation: remove a share of an image's pixels by heatmap rank (all channels, set to 0 in
  un-normalised image space), classify, count top-1 hits; the score is the area under
  accuracy-vs-share over 10 %, 20 %, …, 90 % (trapezoids, accuracy in percent, so 80 is the most).
- Segmentation: the heatmap against an object mask, as the authors' ImageNet-Segmentation code:
  the map min–max scaled to [0, 1]; foreground where it is positive (signed maps: their positive
  part) or above its mean (non-negative maps); pixel accuracy over all pixels; average precision of
  the scaled map as a two-class score (background 1 − s, foreground s) for the mask.
- Class sensitivity: the share of a map's positive mass inside each labelled object's mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FRACTIONS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def removal_order(heatmap: np.ndarray, highest_first: bool) -> np.ndarray:
    """Flat pixel indices in the order they are removed: lowest-ranked first for negative
    perturbation, highest first for positive; ties keep raster order."""
    scores = heatmap.reshape(-1).astype(np.float64)
    return np.argsort(-scores if highest_first else scores, kind="stable")


def perturb(photos: np.ndarray, heatmaps: np.ndarray, fractions=FRACTIONS, highest_first: bool = False) -> np.ndarray:
    """``[F·N, H, W, C]``: for each share (outer) and image (inner), the photo with that share of its
    pixels set to 0, chosen by ``removal_order``. ``photos`` ``[N, H, W, C]``, ``heatmaps`` ``[N, H, W]``."""
    count, height, width = heatmaps.shape
    pixels = height * width
    out = np.repeat(photos[None], len(fractions), axis=0).reshape(len(fractions), count, pixels, -1)
    for n in range(count):
        order = removal_order(heatmaps[n], highest_first)
        for f, fraction in enumerate(fractions):
            out[f, n, order[:int(round(fraction * pixels))]] = 0
    return out.reshape(len(fractions) * count, *photos.shape[1:])


def hits(top: np.ndarray, labels: list[set[int]]) -> np.ndarray:
    """Whether each top-1 class is one of its image's labels; ``top`` ``[F·N]`` as ``perturb`` orders it."""
    top = top.reshape(-1, len(labels))
    return np.array([[int(c) in labels[n] for n, c in enumerate(row)] for row in top])


def perturbation_hits(photos: np.ndarray, heatmaps: np.ndarray, labels: list[set[int]],
                      classify: Callable[[np.ndarray], np.ndarray], fractions=FRACTIONS,
                      highest_first: bool = False) -> np.ndarray:
    """``[F, N]`` booleans: is the top-1 class of each perturbed image still one of its labels?
    ``classify`` maps photos ``[M, H, W, C]`` to top-1 classes ``[M]``."""
    return hits(classify(perturb(photos, heatmaps, fractions, highest_first)), labels)


def area_under_curve(accuracy_percent, fractions=FRACTIONS) -> float:
    """Trapezoidal area under accuracy (in percent) against the removed share."""
    accuracy, fractions = np.asarray(accuracy_percent, np.float64), np.asarray(fractions, np.float64)
    return float(np.sum((accuracy[1:] + accuracy[:-1]) / 2 * np.diff(fractions)))


def scaled(heatmap: np.ndarray) -> np.ndarray:
    """The map min–max scaled to [0, 1] (the positive part first for a signed map); 0 if constant."""
    values = heatmap.astype(np.float64)
    if values.min() < 0:
        values = np.maximum(values, 0)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def foreground(heatmap: np.ndarray) -> np.ndarray:
    """The predicted object: a signed map's positive part, else the scaled map above its mean."""
    if heatmap.min() < 0:
        return heatmap > 0
    values = scaled(heatmap)
    return values > values.mean()


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision–recall step curve, ``Σ (R_k − R_{k−1}) P_k`` over the distinct score
    thresholds from the highest down (scikit-learn's ``average_precision_score``); 0 without positives."""
    scores, truth = scores.reshape(-1).astype(np.float64), truth.reshape(-1).astype(bool)
    positives = truth.sum()
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(truth)[last_of_threshold]
    precision = true_positives / (last_of_threshold + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def segmentation(heatmap: np.ndarray, mask: np.ndarray) -> tuple[int, int, float]:
    """(correct pixels, pixels, average precision) of one ``[H, W]`` map against a boolean mask."""
    predicted = foreground(heatmap)
    score = scaled(heatmap)
    ap = average_precision(np.concatenate([1 - score.ravel(), score.ravel()]),
                           np.concatenate([~mask.ravel(), mask.ravel()]))
    return int((predicted == mask).sum()), int(mask.size), ap


def mass_shares(heatmap: np.ndarray, masks: list[np.ndarray]) -> list[float]:
    """The share of the map's positive mass inside each mask (0 where the map has none)."""
    positive = np.maximum(heatmap.astype(np.float64), 0)
    total = positive.sum()
    return [float(positive[mask].sum() / total) if total > 0 else 0.0 for mask in masks]
