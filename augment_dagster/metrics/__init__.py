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
    p, y = _preds(preds).astype(np.int64).reshape(-1), _np(labels).astype(np.int64).reshape(-1)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    for name, a in (("prediction", p), ("label", y)):
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} out of range 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def per_class_accuracy(preds, labels, num_classes: int) -> np.ndarray:
    cm = confusion_matrix(preds, labels, num_classes)
    n = cm.sum(1)
    return np.where(n > 0, np.diag(cm) / np.maximum(n, 1), np.nan)


def mean_per_class_accuracy(preds, labels, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of their accuracy (DA-Fusion/DIAGen's headline metric)."""
    pc = per_class_accuracy(preds, labels, num_classes)
    pc = pc[~np.isnan(pc)]
    return float(pc.mean()) if len(pc) else float("nan")


def episode_ci(accs) -> tuple[float, float]:
    """(mean, 1.96·std/√n) of per-episode accuracies (GeNIe's reporting; population std as in its code)."""
    a = np.asarray([x for x in accs if x == x], dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(1.96 * a.std() / np.sqrt(len(a)))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances [len(a), len(b)] (scipy cdist: identical points give exactly 0)."""
    from scipy.spatial.distance import cdist

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return cdist(a.reshape(len(a), -1), b.reshape(len(b), -1), "euclidean")


def _radii(feats: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(feats, feats)
    np.fill_diagonal(d, np.inf)  # exclude self
    k = min(k, len(feats) - 1)  # tiny sets: the farthest other point
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(query: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Fraction of ``query`` points inside the k-NN manifold of ``ref``: ∃φ∈ref with ‖x−φ‖ ≤ r_k(φ)."""
    if len(query) == 0 or len(ref) < 2:
        return float("nan")
    r = _radii(ref, k)
    d = _pairwise(query, ref)
    return float((d <= r[None, :]).any(1).mean())


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold),
    k-NN radii (k=3) with exact pairwise distances."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _np(real_feats).astype(np.float64).reshape(len(real_feats), -1)
    fake = _np(fake_feats).astype(np.float64).reshape(len(fake_feats), -1)
    if len(real) and len(fake) and real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    return _coverage(fake, real, k), _coverage(real, fake, k)


def diversity(feats, labels=None) -> float:
    """Mean pairwise L2 distance (within class, then averaged over classes, when labels are given)."""
    f = _np(feats).astype(np.float64)
    f = f.reshape(len(f), -1)
    if labels is None:
        if len(f) < 2:
            return 0.0
        d = _pairwise(f, f)
        return float(d[np.triu_indices(len(f), 1)].mean())
    lab = _np(labels).reshape(-1)
    if len(lab) != len(f):
        raise ValueError(f"{len(lab)} labels for {len(f)} feature rows")
    vals = [diversity(f[lab == c]) for c in np.unique(lab) if (lab == c).sum() > 1]
    return float(np.mean(vals)) if vals else 0.0


def mean_std(values) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0 for a single value) over the non-NaN values; (nan, nan) if none."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


CONFUSION_MAX_SIDE_IN = 14.0  # the figure's side at most (inches at 90 dpi): bounded for any number of classes
CONFUSION_CELL_TEXT_MAX = 30  # counts written in the cells up to this many classes
CONFUSION_TICK_LABELS_MAX = 60  # class names on the axes up to this many classes


def confusion_plot_png(cm, class_names) -> bytes:
    """PNG of a confusion matrix (rows = true, columns = predicted); Agg canvas, no pyplot state.

    Up to 30 classes each cell shows its count; up to 60 the axes name the classes; beyond, a colour scale only.
    The figure's side grows with the classes up to 14 inches, so its memory and time are bounded (a figure and a
    text per cell at 128 classes was a 5,900-px canvas with 16,384 text artists, > 1 GB). The counts themselves
    are in the metrics manifest (``confusion_id``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    names = [str(c) for c in class_names]
    n = len(names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    counts = n <= CONFUSION_CELL_TEXT_MAX  # few enough classes to write each cell's count (else a colour scale)
    side = min(1.5 + 0.5 * n, CONFUSION_MAX_SIDE_IN)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cm, cmap="Blues", **({} if counts else {"interpolation": "nearest"}))
    if n <= CONFUSION_TICK_LABELS_MAX:
        fs = 8 if counts else 5
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, rotation=45 if counts else 90, ha="right", fontsize=fs)
        ax.set_yticks(range(n))
        ax.set_yticklabels(names, fontsize=fs)
    else:
        ax.set_title(f"{n} classes (class order as in the manifest's confusion_id)", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if counts:
        hi = cm.max() if cm.size else 0
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                v = cm[i, j]
                txt = f"{int(v)}" if float(v).is_integer() else f"{float(v):.2f}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if hi and v > hi / 2 else "black")
    else:
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    # fixed margins for the rotated tick labels instead of tight_layout (which draws the figure an extra time)
    m = 1.1 / side if counts else 0.08
    fig.subplots_adjust(left=m, bottom=m, right=1 - 0.15 / side - (0 if counts else 0.08),
                        top=1 - 0.15 / side - (0.03 if n > CONFUSION_TICK_LABELS_MAX else 0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
