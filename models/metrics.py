"""Detection metrics without scikit-learn: AUROC (tie-aware, Mann-Whitney), average precision (step-wise, as
scikit-learn defines it), sensitivity/specificity at a threshold (score >= threshold = abnormal), Dice."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in size")
    return y, s


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; ties count one half. NaN when one class is missing."""
    y, s = _check(labels, scores)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) * P_n (tied scores form one threshold). NaN without positives."""
    y, s = _check(labels, scores)
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Last index of each group of equal scores = one threshold.
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[distinct]
    predicted = distinct + 1
    precision = tp / predicted
    recall = tp / positives
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) calling ``score >= threshold`` abnormal; NaN for a missing class."""
    y, s = _check(labels, scores)
    predicted = s >= threshold
    sens = float(predicted[y].mean()) if y.any() else float("nan")
    spec = float((~predicted[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|); 1.0 when both are empty."""
    a = np.asarray(prediction).astype(bool)
    b = np.asarray(truth).astype(bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / total)


def top_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the highest ``fraction`` of ``values`` (at least one value); 0 when there are none. The image score
    of a map: a lesion is a few high pixels, so the mean of all of them would drown it."""
    values = np.asarray(values).ravel()
    if values.size == 0:
        return 0.0
    k = max(1, int(round(fraction * values.size)))
    return float(np.partition(values, values.size - k)[-k:].mean())


def threshold_at_specificity(normal_scores: np.ndarray, specificity: float) -> float:
    """The ``specificity`` quantile of normal scores: that share of normals scores below it."""
    values = np.asarray(normal_scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no normal scores to calibrate on")
    if not 0.0 < specificity < 1.0:
        raise ValueError("specificity must be between 0 and 1")
    return float(np.quantile(values, specificity))
