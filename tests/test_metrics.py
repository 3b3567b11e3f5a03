"""Metrics: improved precision/recall, confusion matrix, per-class accuracy, diversity, mean/std, plot."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from augment_dagster.metrics import (
    accuracy,
    confusion_matrix,
    confusion_plot_png,
    diversity,
    mean_std,
    per_class_accuracy,
    precision_recall,
)


def test_precision_recall_identical_sets():
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(30, 5))
    fake = rng.normal(size=(20, 5)) + 1000.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_outlier_lowers_precision_by_one_over_n_fake():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(50, 4))
    fake = real[:20].copy()  # every fake point is a real point -> inside the real manifold
    p0, _ = precision_recall(real, fake, k=3)
    assert p0 == 1.0
    fake_out = fake.copy()
    fake_out[7] = 1e3  # one far outlier
    p1, _ = precision_recall(real, fake_out, k=3)
    assert p1 == pytest.approx(p0 - 1.0 / len(fake), abs=1e-12)


def test_precision_recall_hand_example():
    # 1-D sets; real = {0, 1, 2, 3}, k=1 -> every real radius is 1 (nearest other point)
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [3.9], [10.0], [-1.0]])  # inside, inside (3.9 ≤ 3+1), outside, inside (|-1-0| = 1)
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(3 / 4)
    # fake radii (k=1): 0.5->1.5 (to -1), 3.9->3.4 (to 0.5), 10->6.1, -1->1.5; real points reached:
    # 0 (from 0.5 / -1), 1 (0.5: 0.5 ≤ 1.5), 2 (3.9: 1.9 ≤ 3.4), 3 (3.9: 0.9) -> recall 1
    assert r == pytest.approx(1.0)


def test_confusion_matrix_and_per_class_accuracy_hand_example():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 1, 0, 1, 1, 0])
    cm = confusion_matrix(preds, labels, 3)
    expected = np.array([[2, 1, 0],
                         [0, 2, 0],
                         [1, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    np.testing.assert_allclose(per_class_accuracy(preds, labels, 3), [2 / 3, 1.0, 0.0])
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # logits are argmax-ed; torch tensors accepted
    logits = torch.nn.functional.one_hot(torch.as_tensor(preds), 3).float()
    assert accuracy(logits, torch.as_tensor(labels)) == pytest.approx(4 / 6)
    # a class with no samples gives NaN per-class accuracy
    pc = per_class_accuracy(np.array([0, 1]), np.array([0, 1]), 3)
    assert pc[0] == 1.0 and pc[1] == 1.0 and np.isnan(pc[2])
    with pytest.raises(ValueError):
        confusion_matrix(np.array([3]), np.array([0]), 3)


def test_diversity():
    same = np.ones((5, 3))
    assert diversity(same) == 0.0
    pts = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert diversity(pts) == pytest.approx(5.0)
    # within class then averaged: class 0 pair distance 5, class 1 pair distance 1 -> 3
    feats = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [11.0, 0.0]])
    assert diversity(feats, labels=np.array([0, 0, 1, 1])) == pytest.approx(3.0)


def test_mean_std():
    assert mean_std([2.0]) == (2.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and s == pytest.approx(1.0)  # ddof=1


def test_confusion_plot_png():
    png = confusion_plot_png(np.array([[3, 1], [0, 4]]), ["cat", "dog"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_plot_is_bounded_for_many_classes():
    """128 classes: the figure's side is capped and no per-cell text is drawn (memory and time bounded); the
    image is still a readable PNG of at most 14 in x 90 dpi per side."""
    import io
    import resource

    from PIL import Image

    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, size=(128, 128))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    png = confusion_plot_png(cm, [f"class{i:03d}" for i in range(128)])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    w, h = Image.open(io.BytesIO(png)).size
    assert w <= 14 * 90 and h <= 14 * 90 and w > 600
    assert grown_mb < 200, grown_mb  # the uncapped figure grew the process by > 1 GB
    small = Image.open(io.BytesIO(confusion_plot_png(np.array([[3, 1], [0, 4]]), ["cat", "dog"])))
    assert small.size == (225, 225)  # 2.5 in at 90 dpi: small matrices keep their layout
