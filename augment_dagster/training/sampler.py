"""The α-mixing sampler (DA-Fusion's synthetic probability, DIAGen's Eq. 2; METHODS §1.4, §2c).

Draw a real image n (class-balanced: P(n) ∝ 1/count(class n), else uniform 1/N); with probability α
replace it by a synthetic image m of n's group with probability w_m / Σ_group w. So

    P_real(n) = (1 − α·[W_n > 0])·P(n),   P_syn(m) = Σ_{n: m ∈ group n} α·P(n)·w_m / W_n,   W_n = Σ_{j∈group n} w_j

(groups with zero total weight keep the real image). A synthetic item that belongs to several groups
(class pools shared by every real image of a class) sums over them. Pure numpy, no torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class MixingSampler:
    """Seeded, vectorised sampler over real indices [0, N) and synthetic indices [0, S).

    Args:
        real_labels: class label of each real image, shape [N].
        groups: for each real image n, the synthetic indices that may replace it (DA-Fusion/DIAGen: the
            synthetics guided by n; methods without a same-class guide pass the class pool). None = no synthetics.
        syn_weights: weight w_m >= 0 per synthetic image, shape [S] (None with groups = all ones).
        alpha: probability of replacing the drawn real image by a synthetic one.
        seed: seed of the ``np.random.Generator`` used by :meth:`draw`.
        class_balanced: P(n) ∝ 1/count(class(n)) (DIAGen's WeightedRandomSampler) instead of uniform.
    """

    def __init__(self, real_labels, groups: Sequence | None = None, syn_weights=None, alpha: float = 0.0,
                 seed: int = 0, class_balanced: bool = True):
        self.real_labels = np.asarray(real_labels)
        if self.real_labels.ndim != 1:
            raise ValueError(f"real_labels must be 1-D, got shape {self.real_labels.shape}")
        n = len(self.real_labels)
        if n == 0:
            raise ValueError("MixingSampler needs at least one real image")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha (synthetic probability) must be in [0, 1], got {alpha}")
        self.alpha = alpha

        if syn_weights is None:
            s = 0 if groups is None else 1 + max((int(np.max(g)) for g in groups if len(g)), default=-1)
            syn_weights = np.ones(s)
        self.w = np.asarray(syn_weights, dtype=np.float64).reshape(-1)
        if not np.isfinite(self.w).all():
            raise ValueError("synthetic weights must be finite")
        if (self.w < 0).any():
            raise ValueError(f"synthetic weights must be >= 0 (min is {self.w.min()})")
        S = len(self.w)

        if groups is None:
            groups = [()] * n
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries but there are {n} real images (one group per real image)")
        self.groups = []
        for i, g in enumerate(groups):
            g = np.asarray(g).reshape(-1)
            if len(g) and not np.issubdtype(g.dtype, np.integer):
                raise ValueError(f"group {i} must hold integer synthetic indices, got dtype {g.dtype}")
            g = g.astype(np.int64)
            if len(g) and (g.min() < 0 or g.max() >= S):
                raise ValueError(f"group {i} has synthetic index {int(g.min() if g.min() < 0 else g.max())} "
                                 f"out of range 0..{S - 1} ({S} synthetic weights)")
            self.groups.append(g)
        self.class_balanced = bool(class_balanced)

        if class_balanced:
            _, inv, counts = np.unique(self.real_labels, return_inverse=True, return_counts=True)
            p = 1.0 / counts[inv.reshape(-1)]
        else:
            p = np.ones(n)
        self.p_pick = p / p.sum()

        # flattened (CSR) groups for vectorised within-group weighted choice
        lens = np.array([len(g) for g in self.groups], dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self._flat = np.concatenate(self.groups) if lens.sum() else np.zeros(0, np.int64)
        fw = self.w[self._flat]
        self._cum = np.cumsum(fw)
        self.group_w = np.array([self.w[g].sum() for g in self.groups]) if S else np.zeros(n)
        self.has_syn = self.group_w > 0
        # last positive-weight position of each group (guards float round-off at the upper end)
        pos = np.nonzero(fw > 0)[0]
        owner = np.repeat(np.arange(n), lens)
        self._last = np.full(n, -1, dtype=np.int64)
        if len(pos):
            self._last[owner[pos]] = pos  # increasing order: the last write wins
        self._cum_before = np.where(self._start > 0, self._cum[np.maximum(self._start - 1, 0)] if len(self._cum) else 0.0, 0.0)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def num_real(self) -> int:
        return len(self.real_labels)

    @property
    def num_synthetic(self) -> int:
        return len(self.w)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact marginal probabilities (p_real [N], p_syn [S]) of one draw; together they sum to 1."""
        a = np.where(self.has_syn, self.alpha, 0.0)
        p_real = self.p_pick * (1.0 - a)
        p_syn = np.zeros(len(self.w))
        for n in np.nonzero(self.has_syn)[0]:
            g = self.groups[n]
            np.add.at(p_syn, g, self.p_pick[n] * self.alpha * self.w[g] / self.group_w[n])
        return p_real, p_syn

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k i.i.d. draws -> (is_synthetic bool[k], index[k]); index is a real index where is_synthetic is False,
        else a synthetic index. Reproducible: the stream depends only on the seed and the sequence of calls."""
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        n = self.rng.choice(len(self.p_pick), size=k, p=self.p_pick)
        u_coin = self.rng.random(k)
        u_pick = self.rng.random(k)
        is_syn = (u_coin < self.alpha) & self.has_syn[n]
        idx = n.astype(np.int64)
        if is_syn.any():
            ns = n[is_syn]
            target = self._cum_before[ns] + u_pick[is_syn] * self.group_w[ns]
            pos = np.searchsorted(self._cum, target, side="right")
            pos = np.clip(pos, self._start[ns], self._last[ns])
            idx[is_syn] = self._flat[pos]
        return is_syn, idx
