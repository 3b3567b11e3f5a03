"""Temperature scaling (Guo et al. 2017; DIAGen's filter, METHODS §2c): the T minimising
NLL(softmax(z/T), y) on validation logits. Dividing by T > 0 never changes the argmax."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.as_tensor(logits).detach().float().cpu()
    y = torch.as_tensor(labels).detach().long().cpu().reshape(-1)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"logits must be [N, C] with N == len(labels); got {tuple(z.shape)} and {len(y)} labels")
    return z, y


def nll(logits, labels, T: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T) at the labels."""
    z, y = _as_tensors(logits, labels)
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    if len(y) == 0:
        return float("nan")
    return float(F.cross_entropy(z / float(T), y))


def fit_temperature(logits, labels, max_iter: int = 500, lr: float = 0.01) -> float:
    """Fit T by LBFGS(lr=0.01, max_iter=500, strong-Wolfe line search) over log T (so T stays positive),
    starting at T = 1. (Without a line search, LBFGS at lr 0.01 needs all 500 iterations and still stops
    short of the optimum; with it, it converges in ~20 evaluations.)

    Returns 1.0 for empty input, and never returns a T whose NLL is worse than T = 1's."""
    z, y = _as_tensors(logits, labels)
    if len(y) == 0:
        return 1.0
    z = z.double()  # float64: the 1-D problem then converges in a few dozen evaluations
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    T = float(log_t.detach().exp())
    if not math.isfinite(T) or T <= 0:
        return 1.0
    # never worse than T = 1 (LBFGS can stall on degenerate inputs)
    with torch.no_grad():
        better = float(F.cross_entropy(z / T, y)) <= float(F.cross_entropy(z, y)) + 1e-12
    return T if better else 1.0
