"""The α-mixing sampler (DA-Fusion's synthetic probability, DIAGen's Eq. 2).

Draw a real image n (class-balanced: P(n) ∝ 1/count(class n), else uniform); with probability α replace it
by a synthetic image m of n's group with probability w_m / Σ_group w. So

    P_real(n) = (1 − α)·P(n),   P_syn(n, m) = α·P(n)·w_nm / Σ_j w_nj

(groups with zero total weight keep the real image). A synthetic item that belongs to several groups
(class pools) sums over them.
"""
from __future__ import annotations

import numpy as np


class MixingSampler:
    def __init__(self, real_labels, groups=None, syn_weights=None, alpha: float = 0.0, seed: int = 0,
                 class_balanced: bool = True):
        self.real_labels = np.asarray(real_labels)
        n = len(self.real_labels)
        if n == 0:
            raise ValueError("MixingSampler needs at least one real image")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha (synthetic probability) must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.w = np.asarray(syn_weights if syn_weights is not None else [], dtype=np.float64)
        if (self.w < 0).any() or not np.isfinite(self.w).all():
            raise ValueError("synthetic weights must be finite and >= 0")
        self.groups = [np.asarray(g, dtype=np.int64) for g in (groups if groups is not None else [[]] * n)]
        if len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} groups for {n} real images")
        for g in self.groups:
            if len(g) and (g.min() < 0 or g.max() >= len(self.w)):
                raise ValueError(f"group index out of range (0..{len(self.w) - 1})")
        if class_balanced:
            _, inv, counts = np.unique(self.real_labels, return_inverse=True, return_counts=True)
            p = 1.0 / counts[inv]
        else:
            p = np.ones(n)
        self.p_pick = p / p.sum()
        self.group_w = np.array([self.w[g].sum() if len(g) else 0.0 for g in self.groups])
        self.rng = np.random.default_rng(seed)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact P_real [N] and P_syn [S] (they sum to 1)."""
        has = self.group_w > 0
        a = np.where(has, self.alpha, 0.0)
        p_real = self.p_pick * (1.0 - a)
        p_syn = np.zeros(len(self.w))
        for n, g in enumerate(self.groups):
            if has[n]:
                np.add.at(p_syn, g, self.p_pick[n] * self.alpha * self.w[g] / self.group_w[n])
        return p_real, p_syn

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k draws -> (is_synthetic bool[k], index[k]) (real index or synthetic index)."""
        n = self.rng.choice(len(self.p_pick), size=k, p=self.p_pick)
        coin = self.rng.random(k) < self.alpha
        is_syn = coin & (self.group_w[n] > 0)
        idx = n.copy()
        for j in np.nonzero(is_syn)[0]:
            g = self.groups[n[j]]
            idx[j] = g[self.rng.choice(len(g), p=self.w[g] / self.group_w[n[j]])]
        return is_syn, idx
