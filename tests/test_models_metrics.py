"""Metric code against cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.models.metrics import (
    auroc,
    average_precision,
    dice,
    sensitivity_specificity,
    threshold_at_specificity,
    top_mean,
)


def test_auroc_hand_computed() -> None:
    # Positives 0.8, 0.4; negatives 0.5, 0.1. Pairs (pos > neg): (0.8,0.5) (0.8,0.1) (0.4,0.1) = 3 of 4.
    assert auroc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert auroc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(7 / 8)
    assert auroc([1, 0], [0.0, 1.0]) == 0.0
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_average_precision_hand_computed() -> None:
    # Ranked: 0.9 (pos) 0.8 (neg) 0.7 (pos) 0.1 (neg): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    # All tied: one threshold, precision = prevalence.
    assert average_precision([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.25)
    assert average_precision([1, 1, 0], [3, 2, 1]) == pytest.approx(1.0)


def test_sensitivity_specificity_at_threshold() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.2, 0.5, 0.3, 0.1, 0.0])
    sens, spec = sensitivity_specificity(labels, scores, 0.5)  # score >= 0.5 is abnormal
    assert sens == pytest.approx(2 / 3)
    assert spec == pytest.approx(3 / 4)


def test_dice_hand_computed() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert dice(a, b) == pytest.approx(4 / 6)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(np.ones(3), np.zeros(3)) == 0.0


def test_threshold_at_specificity() -> None:
    normals = np.arange(101, dtype=float)  # 0..100
    assert threshold_at_specificity(normals, 0.95) == pytest.approx(95.0)
    with pytest.raises(ValueError):
        threshold_at_specificity(normals, 1.5)


def test_top_mean_hand_computed() -> None:
    values = np.array([1.0, 9.0, 3.0, 7.0, 5.0, 2.0, 8.0, 4.0, 6.0, 10.0])
    assert top_mean(values, 0.2) == pytest.approx(9.5)  # the top 2 of 10
    assert top_mean(values, 0.01) == 10.0  # at least one value
    assert top_mean(np.zeros(0), 0.5) == 0.0
