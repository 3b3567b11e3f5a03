"""Metrics: accuracy, per-class accuracy, confusion matrix, improved precision/recall (Kynkäänniemi et al.
2019), diversity, mean ± std. Plain numpy/torch; matplotlib imported only to draw."""
from __future__ import annotations

import io

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _preds(logits_or_preds) -> np.ndarray:
    a = _np(logits_or_preds)
    return a.argmax(1) if a.ndim == 2 else a


def accuracy(logits_or_preds, labels) -> float:
    p, y = _preds(logits_or_preds), _np(labels)
    return float((p == y).mean()) if len(y) else float("nan")


def confusion_matrix(preds, labels, num_classes: int) -> np.ndarray:
    """cm[true, pred] counts."""
    p, y = _preds(preds).astype(int), _np(labels).astype(int)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def per_class_accuracy(preds, labels, num_classes: int) -> np.ndarray:
    cm = confusion_matrix(preds, labels, num_classes)
    n = cm.sum(1)
    return np.where(n > 0, np.diag(cm) / np.maximum(n, 1), np.nan)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _radii(feats: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(feats, feats)
    np.fill_diagonal(d, np.inf)  # exclude self
    k = min(k, len(feats) - 1)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(query: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Fraction of ``query`` points inside the k-NN manifold of ``ref``: ∃φ∈ref with ‖x−φ‖ ≤ r_k(φ)."""
    if len(query) == 0 or len(ref) < 2:
        return float("nan")
    r = _radii(ref, k)
    d = _pairwise(query, ref)
    return float((d <= r[None, :] + 1e-12).any(1).mean())


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold),
    k-NN radii (k=3) with exact pairwise distances."""
    real, fake = _np(real_feats).astype(np.float64), _np(fake_feats).astype(np.float64)
    return _coverage(fake, real, k), _coverage(real, fake, k)


def diversity(feats, labels=None) -> float:
    """Mean pairwise L2 distance (within class, then averaged over classes, when labels are given)."""
    f = _np(feats).astype(np.float64)
    if labels is None:
        if len(f) < 2:
            return 0.0
        d = _pairwise(f, f)
        return float(d[np.triu_indices(len(f), 1)].mean())
    lab = _np(labels)
    vals = [diversity(f[lab == c]) for c in np.unique(lab) if (lab == c).sum() > 1]
    return float(np.mean(vals)) if vals else 0.0


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def confusion_plot_png(cm, class_names) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(class_names), 1 + 0.6 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
